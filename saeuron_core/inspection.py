"""Looking inside a generation: which SAE features fire, where a concept is, and before/after grids.

:func:`inspect` generates one prompt with a hook on the SAE's block and keeps, per UNet call, only
small summaries of the conditional half: the most active features and, per named concept, a heat
map of its selected features (plus where they fire above threshold). :func:`compare_erasure`
generates prompts with and without an erasure for a before/after :func:`image_grid`.
Images are PIL images; nothing here needs matplotlib.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .erasure.eraser import erase
from .erasure.options import ConceptsArg, EraseOptions, Method
from .errors import ConfigError
from .hosts.diffusers import generate, set_scheduler
from .hosts.hooks import BlockCall, check_sae_fits, denoiser, pipeline_hook
from .sae.library import ConceptData, get_concept
from .sae.model import TopKSAE

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class StepRecord:
    """What one UNet call showed on the conditional half.

    ``step``: index of the UNet call (one per sampling step for first-order schedulers);
    ``top_ids``/``top_values``: the most active features by mean activation over the image's tokens;
    ``heat[c]``: ``[H, W]`` summed activation of concept ``c``'s selected features;
    ``fired[c]``: ``[H, W]`` bool, a selected feature is above its threshold;
    ``features[c]``: the selected feature ids at this timestep.
    """

    step: int
    timestep: float
    top_ids: list[int]
    top_values: list[float]
    heat: dict[str, Tensor] = field(default_factory=dict)
    fired: dict[str, Tensor] = field(default_factory=dict)
    features: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class InspectResult:
    """Per-step records and the final image of one inspected generation."""

    prompt: str
    image: "Image.Image"
    steps: list[StepRecord]
    concepts: list[str]
    spatial: tuple[int, int]

    def _check_concept(self, concept: str) -> None:
        if concept not in self.concepts:
            known = ", ".join(repr(c) for c in self.concepts) or "none"
            raise ConfigError(f"concept {concept!r} was not inspected; inspected concepts: {known}")

    def heatmap(self, concept: str, step: Optional[int] = None) -> Tensor:
        """``[image H, image W]`` float map in ``[0, 1]`` (mean over steps if ``step`` is None; zeros if never active)."""
        self._check_concept(concept)
        if not self.steps:
            raise ConfigError("no steps were recorded")
        if step is None:
            heat = torch.stack([r.heat[concept] for r in self.steps]).mean(0)
        else:
            if not -len(self.steps) <= step < len(self.steps):
                raise ConfigError(f"step {step} is out of range; {len(self.steps)} steps were recorded")
            heat = self.steps[step].heat[concept]
        width, height = self.image.size
        up = F.interpolate(heat[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        peak = float(up.max())
        return (up / peak).clamp_(0.0, 1.0) if peak > 0 else torch.zeros_like(up)

    def summary(self, per_line: int = 5) -> str:
        """One line per step: timestep, the top features (id:mean activation) and concept detections."""
        lines = []
        n_tokens = self.spatial[0] * self.spatial[1]
        for r in self.steps:
            top = " ".join(f"{i}:{v:.3g}" for i, v in zip(r.top_ids[:per_line], r.top_values[:per_line]))
            concepts = "".join(f" | {c}: {int(r.fired[c].sum())}/{n_tokens} fired" for c in self.concepts)
            lines.append(f"step {r.step:3d} t={r.timestep:6.1f}  top: {top}{concepts}")
        return "\n".join(lines)

    def overlay(self, concept: Optional[str] = None, step: Optional[int] = None, *, alpha: float = 0.6) -> "Image.Image":
        """The image with the concept's heat map in semi-transparent red (the plain image if ``concept`` is None)."""
        from PIL import Image

        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"overlay alpha must be between 0 and 1, got {alpha}")
        base = self.image.convert("RGB")
        if concept is None:
            return base
        heat = self.heatmap(concept, step)
        mask = Image.fromarray((heat * (alpha * 255)).round().to(torch.uint8).numpy())  # 2-D uint8: mode "L"
        return Image.composite(Image.new("RGB", base.size, (255, 0, 0)), base, mask)

    def save_overlay(self, path: str | os.PathLike, concept: Optional[str] = None, step: Optional[int] = None,
                     *, alpha: float = 0.6) -> Path:
        """Write :meth:`overlay` as a PNG."""
        return save_png(self.overlay(concept, step, alpha=alpha), path)


def save_png(image: "Image.Image", path: str | os.PathLike) -> Path:
    """Write a PNG via a temp file in the same folder, so a crash never leaves half an image."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path}: expected a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _concept_list(concepts: Optional[str | Sequence[str]]) -> list[str]:
    if concepts is None:
        return []
    if isinstance(concepts, str):
        concepts = [concepts]
    return list(dict.fromkeys(concepts))


def _grid(call: BlockCall, n_tokens: int) -> tuple[int, int]:
    if call.spatial is not None:
        return call.spatial
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ConfigError(f"the hooked block's output has {n_tokens} tokens and no spatial layout; heat maps need one")
    return side, side


def _concept_activation(data: ConceptData, timestep: float, values: Tensor, indices: Tensor
                        ) -> tuple[Tensor, Tensor, list[int]]:
    """Per token: summed activation of the selected features, and whether any is above its threshold."""
    ids, thr = data.selected_at(timestep)
    ids = ids.to(indices.device)
    thr = thr.to(device=values.device, dtype=values.dtype)
    # [N, k, n] matches of each token's top-k ids against the selected features; absent = activation 0.
    act = (values[..., None] * (indices[..., None] == ids)).sum(1)
    return act.sum(-1), (act > thr).any(-1), ids.tolist()


class InspectRecorder:
    """Block-call function that records, per UNet call, the top features and concept heat maps.

    Only the first conditional row is analysed. Used by :func:`inspect` (diffusers) and by the
    ComfyUI Feature Inspector node alike.
    """

    def __init__(self, sae: TopKSAE, concepts: dict[str, ConceptData], top: int = 10) -> None:
        self.sae, self.concepts, self.top = sae, concepts, min(top, sae.n_latents)
        self.records: list[StepRecord] = []
        self.spatial: Optional[tuple[int, int]] = None

    @torch.no_grad()
    def __call__(self, call: BlockCall) -> None:
        rows = call.is_cond.nonzero().squeeze(1)
        if not len(rows) or call.timesteps is None:
            return None
        row = int(rows[0])
        code = self.sae.on_device(call.tokens.device).encode(call.tokens[row])  # [N, k]
        n_tokens = code.values.shape[0]
        h, w = _grid(call, n_tokens)
        mean = torch.zeros(self.sae.n_latents, device=code.values.device, dtype=torch.float32)
        mean.scatter_add_(0, code.indices.flatten(), code.values.flatten().float()).div_(n_tokens)
        top_values, top_ids = mean.topk(self.top)
        t = float(call.timesteps[row])
        rec = StepRecord(step=len(self.records), timestep=t, top_ids=top_ids.tolist(),
                         top_values=top_values.tolist())
        for name, concept in self.concepts.items():
            heat, fired, ids = _concept_activation(concept, t, code.values, code.indices)
            rec.heat[name] = heat.float().reshape(h, w).cpu()
            rec.fired[name] = fired.reshape(h, w).cpu()
            rec.features[name] = ids
        self.records.append(rec)
        self.spatial = self.spatial or (h, w)
        return None

    def result(self, prompt: str, image: "Image.Image") -> "InspectResult":
        return InspectResult(prompt=prompt, image=image, steps=self.records, concepts=list(self.concepts),
                             spatial=self.spatial or (0, 0))


@torch.no_grad()
def inspect(pipe: Any, sae: TopKSAE, prompt: str, *, concepts: Optional[str | Sequence[str]] = None,
            steps: int = 20, guidance_scale: float = 7.5, seed: int = 0, scheduler: Optional[str] = None,
            hook_point: Optional[str] = None, top: int = 10, height: Optional[int] = None,
            width: Optional[int] = None) -> InspectResult:
    """Generate ``prompt`` and record, per UNet call, the top features and the concepts' heat maps.

    Only the conditional half is analysed. ``concepts`` name entries of the SAE's library (unknown
    names raise with the known ones). The pipeline's scheduler is restored afterwards.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("inspect needs a non-empty prompt")
    if steps < 1 or top < 1:
        raise ConfigError(f"steps and top must be >= 1, got steps={steps}, top={top}")
    names = _concept_list(concepts)
    data = {name: get_concept(sae, name) for name in names}
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("the SAE does not say where it hooks; pass hook_point (e.g. 'up_blocks.1.attentions.1')")
    check_sae_fits(denoiser(pipe), hook_point, sae)
    record = InspectRecorder(sae, data, top)
    old_scheduler = pipe.scheduler
    try:
        if scheduler:
            set_scheduler(pipe, scheduler)
        with sae.kept_beside(denoiser(pipe)), pipeline_hook(pipe, hook_point, record, residual=sae.config.residual):
            out = generate(pipe, [prompt], [seed], steps=steps, guidance_scale=guidance_scale,
                           height=height, width=width, output_type="pil")
    finally:
        pipe.scheduler = old_scheduler
    return record.result(prompt, out.images[0])


# -- before / after comparisons ---------------------------------------------------------------

@torch.no_grad()
def compare_erasure(pipe: Any, sae: Union[TopKSAE, Sequence[TopKSAE]], concepts: ConceptsArg, prompts: Sequence[str], *,
                    method: Optional[Method] = None, seed: int = 0, steps: int = 20,
                    guidance_scale: float = 7.5, scheduler: Optional[str] = None, height: Optional[int] = None,
                    width: Optional[int] = None, batch_size: int = 4, hook_point: Optional[str] = None,
                    options: Optional[EraseOptions] = None,
                    **changes: Any) -> list[tuple["Image.Image", "Image.Image"]]:
    """``(before, after)`` images per prompt, all with the same seed; ``method``, ``options`` and option fields
    by name (``strength=...``) go to :func:`erase`.

    Several SAEs (on different blocks) erase the concepts at all their blocks at once; ``hook_point``
    then stays each SAE's own.
    """
    saes = [sae] if isinstance(sae, TopKSAE) else list(sae)
    if not saes or (len(saes) > 1 and hook_point):
        raise ConfigError("compare_erasure needs one SAE, or several without hook_point (each hooks its own block)")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("compare_erasure needs one or more prompts, none of them empty")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")

    def run() -> list["Image.Image"]:
        images: list[Image.Image] = []
        for begin in range(0, len(prompts), batch_size):
            chunk = prompts[begin:begin + batch_size]
            images += generate(pipe, chunk, [seed] * len(chunk), steps=steps, guidance_scale=guidance_scale,
                               height=height, width=width, output_type="pil").images
        return images

    old_scheduler = pipe.scheduler
    try:
        if scheduler:
            set_scheduler(pipe, scheduler)
        # The erased images come first so that bad options fail before anything is generated;
        # each prompt has its own seeded generator, so the order changes nothing.
        with contextlib.ExitStack() as erasing:
            for one in saes:
                erasing.enter_context(erase(pipe, one, concepts, method, hook_point=hook_point, options=options,
                                            **changes))
            after = run()
        before = run()
    finally:
        pipe.scheduler = old_scheduler
    return list(zip(before, after))


def image_grid(rows: Sequence[Sequence["Image.Image"]], *, labels: Optional[Sequence[Sequence[str]]] = None,
               min_label_width: int = 128) -> "Image.Image":
    """Paste equally sized images in a grid (no margins: the grid is exactly columns x rows cells).

    ``labels`` are drawn in the top-left corner of each cell when cells are at least
    ``min_label_width`` pixels wide (on smaller cells they would hide the image).
    """
    from PIL import Image, ImageDraw

    if not rows or not rows[0]:
        raise ConfigError("image_grid needs at least one row with one image")
    cols = len(rows[0])
    size = rows[0][0].size
    if any(len(r) != cols for r in rows) or any(im.size != size for r in rows for im in r):
        raise ConfigError("image_grid needs rows of the same length and images of the same size")
    w, h = size
    grid = Image.new("RGB", (cols * w, len(rows) * h))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB"), (x * w, y * h))
    if labels is not None and w >= min_label_width:
        draw = ImageDraw.Draw(grid)
        for y, row_labels in enumerate(labels):
            for x, text in enumerate(row_labels[:cols]):
                if not text:
                    continue
                text = text if len(text) <= w // 7 else text[: max(1, w // 7 - 3)] + "..."
                left, top, right, bottom = draw.textbbox((x * w + 4, y * h + 4), text)
                draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
                draw.text((x * w + 4, y * h + 4), text, fill=(255, 255, 255))
    return grid


def erasure_grid(pairs: Sequence[tuple["Image.Image", "Image.Image"]], prompts: Sequence[str]) -> "Image.Image":
    """Before | after grid, one row per prompt, labelled when the images are large enough."""
    labels = [[f"before: {p}", "after"] for p in prompts]
    return image_grid([list(pair) for pair in pairs], labels=labels)


# -- describing learned concepts -----------------------------------------------------------------

def describe_concept(data: ConceptData, *, n_timesteps: int = 3, n_features: int = 5) -> dict[str, Any]:
    """Short summary: observed buckets and the first selected features at a few observed timesteps (high t first)."""
    observed = data.observed.nonzero().squeeze(1).tolist()[::-1]
    if len(observed) > n_timesteps:
        pick = [round(i * (len(observed) - 1) / (n_timesteps - 1)) for i in range(n_timesteps)] if n_timesteps > 1 else [0]
        observed = [observed[i] for i in pick]
    selected = []
    for b in observed:
        n = int(data.n_selected[b])
        selected.append({"timestep": int(b * data.bucket_width), "n_selected": n,
                         "features": data.feature_ids[b, : min(n, n_features)].tolist()})
    return {"observed_buckets": int(data.observed.sum()), "n_buckets": data.n_buckets,
            "bucket_width": data.bucket_width, "selected": selected}


def format_concept(name: str, data: ConceptData, **kwargs: Any) -> str:
    """One line for ``saeuron info`` / ``learn-concept``: ``name: x/y buckets; t=980: [..] ...``."""
    d = describe_concept(data, **kwargs)
    parts = [f"t={s['timestep']}: {s['features']}" + ("..." if s["n_selected"] > len(s["features"]) else "")
             for s in d["selected"]]
    return f"{name}: {d['observed_buckets']}/{d['n_buckets']} timestep buckets observed; " + "  ".join(parts)
