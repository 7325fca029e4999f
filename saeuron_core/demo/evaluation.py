"""Mini-UnlearnCanvas: measure concept erasure on the demo model with its classifier.

Every run generates one image per (object, style) prompt and seed, so a run covers the whole
8 x 8 grid, and the classifier reads object and style off each image. For an erased concept ``c``
of kind K (object or style) and the other kind K':

* **UA** (unlearning accuracy): share of images prompted with ``c`` where the K head does *not* read ``c``;
* **IRA** (in-domain retain): K-head accuracy on images prompted with the other concepts of kind K;
* **CRA** (cross-domain retain): K'-head accuracy on all images (is the object still right when a
  style is erased, and the other way round).

Artifact measures that need no VLM: the classifier's confidence in the retained (K') label on the
erased concept's images, and how far the hooked block's activations on those images move from the
clean activations of prompts without the concept (per-channel mean and standard deviation).

Methods, on the same seeds: ``none``, ``negative_prompt`` (the concept's name as negative prompt),
``ablate`` (SAeUron feature ablation) and ``replace`` (detect and replace).

Several SAEs on different blocks can be evaluated together (as SAeUron hooks one block for objects
and another for styles): a concept is erased by every SAE whose library has it, all their blocks
hooked in the same generation (as chained Concept Eraser nodes do in ComfyUI).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Optional, Sequence, Union

import torch
from torch import Tensor

from ..erasure.eraser import ConceptEraser
from ..erasure.options import EraseOptions
from ..errors import ConfigError
from ..hosts.hooks import BlockCall, pipeline_hook
from ..sae.library import concept_names
from ..sae.model import TopKSAE

METHODS = ("none", "negative_prompt", "ablate", "replace")
# Detect-and-replace on the shipped demo SAEs: the later block where the objects are drawn again from the prompt
# (EVALUATION.md, "Detect and replace"), replaced with what the first object block detects.
DEMO_REPLACE_ALSO_AT: dict[str, list[str]] = {"down_blocks.2.attentions.1": ["up_blocks.1.attentions.0"]}
SAEs = Union[TopKSAE, Sequence[TopKSAE]]


@dataclass
class EvalSettings:
    """How images are generated and erased during an evaluation."""

    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    guidance: float = 3.0
    scheduler: str = "ddim"
    ablate_strength: float = 10.0
    ablate_strength_at: dict[str, float] = field(default_factory=dict)  # hook point -> strength of the SAE there
    ablate_strength_of: dict[str, float] = field(default_factory=dict)  # concept -> its own strength (wins over both)
    replace_strength: float = 1.0
    threshold_scale: float = 1.0
    min_coverage: float = 0.0  # erase a concept only in images where it fires on this share of the feature map
    min_coverage_of: dict[str, float] = field(default_factory=dict)  # concept -> its own gate (wins over the common)
    detect_with: dict[str, str] = field(default_factory=dict)  # concept -> library entry that reads its coverage
    dilation: int = 1
    replace_source: str = "uncond"
    neighbors: int = 1  # replace_source "nearest": the mean of this many nearest undetected patches
    # replace: detecting hook point -> later blocks where what it detected is replaced too
    replace_also_at: dict[str, list[str]] = field(default_factory=dict)
    start: float = 0.0  # the SAE methods act on this window of the denoising (0 = first step)
    end: float = 1.0
    batch_size: int = 64

    def block_strength(self, hook_point: str) -> float:
        """Ablation strength of the SAE at ``hook_point``: that block's if set, else the common one."""
        return self.ablate_strength_at.get(hook_point, self.ablate_strength)

    def strength_for(self, concept: str, hook_point: str) -> float:
        """Ablation strength of ``concept`` at ``hook_point``: its own if chosen, else that block's."""
        return self.ablate_strength_of.get(concept, self.block_strength(hook_point))

    def gate_options(self, concepts: Sequence[str]) -> dict[str, Any]:
        """The eraser's ``min_coverage`` and ``detect_with`` for these concepts."""
        return {"min_coverage": {c: self.min_coverage_of.get(c, self.min_coverage) for c in concepts},
                "detect_with": {c: e for c, e in self.detect_with.items() if c in concepts}}


def concept_owners(saes: Sequence[TopKSAE]) -> dict[str, list[int]]:
    """``{concept: indices of the SAEs whose library has it}``: every one of them erases that concept."""
    owners: dict[str, list[int]] = {}
    for i, s in enumerate(saes):
        for name in concept_names(s):
            owners.setdefault(name, []).append(i)
    return owners


@dataclass
class Grid:
    """Prompts of the object x style grid with their labels."""

    prompts: list[str]
    objects: Tensor  # [P] object id of each prompt
    styles: Tensor   # [P] style id of each prompt
    object_names: list[str]
    style_names: list[str]

    def kind_of(self, concept: str) -> tuple[str, int]:
        """``("object" | "style", id)`` of a concept name."""
        if concept in self.object_names:
            return "object", self.object_names.index(concept)
        if concept in self.style_names:
            return "style", self.style_names.index(concept)
        raise ConfigError(f"concept {concept!r} is neither an object ({', '.join(self.object_names)}) "
                          f"nor a style ({', '.join(self.style_names)}) of the demo grid")


def demo_grid() -> Grid:
    """The demo dataset's 8 x 8 prompts."""
    from .dataset import OBJECTS, STYLES, all_prompts

    pairs = all_prompts()
    return Grid([p for _, _, p in pairs], torch.tensor([o for o, _, _ in pairs]), torch.tensor([s for _, s, _ in pairs]),
                list(OBJECTS), list(STYLES))


@dataclass
class RunOutput:
    """Images of one run (prompt-major, seeds inner) and the classifier's reading of them."""

    images: Tensor        # uint8 [P * S, 3, H, W]
    objects: Tensor       # [P * S] predicted object
    styles: Tensor        # [P * S] predicted style
    object_prob: Tensor   # [P * S, n_objects] softmax
    style_prob: Tensor    # [P * S, n_styles]
    act_mean: dict[str, Tensor]  # hook point -> [P, C] per-prompt mean of that block's (cond) output
    act_sq: dict[str, Tensor]    # hook point -> [P, C] per-prompt mean of its square
    seconds: float


class _ActivationStats:
    """Per-prompt running mean of the hooked block's conditional output and of its square."""

    def __init__(self, n_prompts: int) -> None:
        self.n_prompts = n_prompts
        self.sum: Optional[Tensor] = None
        self.sq: Optional[Tensor] = None
        self.count = torch.zeros(n_prompts, dtype=torch.float64)
        self.groups = torch.zeros(0, dtype=torch.long)

    def add(self, tokens: Tensor) -> None:
        rows = tokens.detach().double().cpu()
        if self.sum is None:
            self.sum = torch.zeros(self.n_prompts, rows.shape[-1], dtype=torch.float64)
            self.sq = torch.zeros_like(self.sum)
        self.sum.index_add_(0, self.groups, rows.sum(1))
        self.sq.index_add_(0, self.groups, (rows * rows).sum(1))
        self.count.index_add_(0, self.groups, torch.full((rows.shape[0],), float(rows.shape[1]), dtype=torch.float64))

    def means(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.sq is not None, "no activations were recorded"
        n = self.count.clamp_min(1)[:, None]
        return self.sum / n, self.sq / n


class Evaluator:
    """Runs erasure methods on the demo grid and scores them with the demo classifier."""

    def __init__(self, pipe: Any, sae: SAEs, classifier: Any, settings: EvalSettings,
                 grid: Optional[Grid] = None, progress: Optional[Callable[[str], None]] = None) -> None:
        if not settings.seeds or settings.steps < 1 or settings.batch_size < 1:
            raise ConfigError("evaluation needs at least one seed, steps >= 1 and batch_size >= 1")
        EraseOptions(start=settings.start, end=settings.end, min_coverage=settings.min_coverage)  # checks them
        self.saes = [sae] if isinstance(sae, TopKSAE) else list(sae)
        if not self.saes:
            raise ConfigError("evaluation needs at least one SAE")
        self.hook_points: list[str] = []
        for s in self.saes:
            if not s.config.hook_point:
                raise ConfigError("an SAE does not say where it hooks; evaluation needs its hook point")
            if s.config.hook_point in self.hook_points:
                raise ConfigError(f"two SAEs hook {s.config.hook_point}; give one SAE per block")
            self.hook_points.append(s.config.hook_point)
        stray = sorted(set(settings.replace_also_at) - set(self.hook_points))
        if stray:
            raise ConfigError(f"replace_also_at names {', '.join(stray)} as detecting blocks but no SAE hooks them "
                              f"(the SAEs hook {', '.join(self.hook_points)})")
        unknown = sorted(set(settings.ablate_strength_at) - set(self.hook_points))
        if unknown:
            raise ConfigError(f"an ablate strength is set for {', '.join(unknown)} but no SAE hooks it "
                              f"(the SAEs hook {', '.join(self.hook_points)})")
        self.pipe, self.classifier, self.settings = pipe, classifier, settings
        self.grid = grid or demo_grid()
        self.progress = progress or (lambda msg: None)
        self.owners = concept_owners(self.saes)
        # concepts of the grid without a library entry cannot be erased by SAE methods
        self.missing = [c for c in self.grid.object_names + self.grid.style_names if c not in self.owners]
        for what, names in (("an ablate strength", settings.ablate_strength_of),
                            ("a min_coverage", settings.min_coverage_of), ("a detector", settings.detect_with)):
            stray = sorted(set(names) - set(self.owners))
            if stray:
                raise ConfigError(f"{what} is set for {', '.join(map(repr, stray))} but no SAE's concept library has it")
        for i, sae in enumerate(self.saes):  # every SAE that erases a gated concept needs its detector entry
            mine = [c for c in settings.detect_with if i in self.owners.get(c, [])]
            lacking = [settings.detect_with[c] for c in mine if settings.detect_with[c] not in sae.concepts]
            if lacking:
                raise ConfigError(f"the SAE at {self.hook_points[i]} erases {', '.join(map(repr, mine))} but its "
                                  f"library lacks the detector {', '.join(map(repr, lacking))}")

    def ablate_strength(self, i: int) -> float:
        """Ablation strength of the ``i``-th SAE (its block's override, else the common one)."""
        return self.settings.block_strength(self.hook_points[i])

    def concept_strength(self, concept: str, i: int) -> float:
        """Ablation strength of ``concept`` at the ``i``-th SAE: its own if chosen, else that SAE's."""
        return self.settings.strength_for(concept, self.hook_points[i])

    def hook_point_of(self, concept: str) -> str:
        """Where the activation shift of ``concept`` is read: the first block that erases it (else the first SAE's)."""
        return self.hook_points[self.owners.get(concept, [0])[0]]

    # -------------------------------------------------------------- generation

    def _erasers(self, method: str, concepts: Sequence[str]) -> dict[str, ConceptEraser]:
        """One eraser per SAE that erases some of ``concepts``, by hook point."""
        if method in ("none", "negative_prompt"):
            return {}
        if method not in ("ablate", "replace"):
            raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        lacking = [c for c in concepts if c not in self.owners]
        if lacking:
            raise ConfigError(f"no SAE's concept library has {', '.join(map(repr, lacking))}")
        s = self.settings
        out = {}
        for i, sae in enumerate(self.saes):
            mine = [c for c in concepts if i in self.owners[c]]
            if not mine:
                continue
            if method == "ablate":
                out[self.hook_points[i]] = ConceptEraser(sae, {c: self.concept_strength(c, i) for c in mine},
                                                         "ablate", start=s.start, end=s.end, **s.gate_options(mine))
            else:
                out[self.hook_points[i]] = ConceptEraser(
                    sae, mine, "replace", strength=s.replace_strength, threshold_scale=s.threshold_scale,
                    dilation=s.dilation, source=s.replace_source, neighbors=s.neighbors, start=s.start, end=s.end,
                    **s.gate_options(mine))
        return out

    def run(self, method: str, concepts: Sequence[str] = (), *, scheduler: Optional[str] = None,
            steps: Optional[int] = None) -> RunOutput:
        """Generate the whole grid once per seed with ``concepts`` erased by ``method``."""
        from ..hosts.diffusers import generate, set_scheduler
        from .classifier import predict_proba
        from .dataset import from_model_range

        s = self.settings
        erasers = self._erasers(method, concepts)
        negative = ", ".join(concepts) if method == "negative_prompt" else None
        prompts = self.grid.prompts
        work = [(i, seed) for i in range(len(prompts)) for seed in s.seeds]
        stats = {hp: _ActivationStats(len(prompts)) for hp in self.hook_points}

        def observer(hook_point: str) -> Callable[[BlockCall], Optional[Tensor]]:
            eraser = erasers.get(hook_point)

            def observe(call: BlockCall) -> Optional[Tensor]:
                new = eraser(call) if eraser is not None else None
                tokens = call.tokens if new is None else new
                stats[hook_point].add(tokens[call.is_cond])
                return new
            return observe

        old = self.pipe.scheduler
        set_scheduler(self.pipe, scheduler or s.scheduler)
        images: list[Tensor] = []
        t0 = time.perf_counter()
        try:
            with ExitStack() as hooks, torch.no_grad():
                for hp in self.hook_points:
                    hooks.enter_context(pipeline_hook(self.pipe, hp, observer(hp)))
                if method == "replace":  # detect at one block, replace at the later ones where the concept enters
                    for hp, points in s.replace_also_at.items():
                        for point in points if hp in erasers else ():
                            hooks.enter_context(pipeline_hook(self.pipe, point, erasers[hp].follower()))
                for begin in range(0, len(work), s.batch_size):
                    chunk = work[begin:begin + s.batch_size]
                    groups = torch.tensor([i for i, _ in chunk], dtype=torch.long)
                    for st in stats.values():
                        st.groups = groups
                    out = generate(self.pipe, [prompts[i] for i, _ in chunk], [seed for _, seed in chunk],
                                   steps=steps or s.steps, guidance_scale=s.guidance, output_type="latent",
                                   negative_prompt=[negative] * len(chunk) if negative else None)
                    images.append(from_model_range(out.images.float().cpu()))
        finally:
            self.pipe.scheduler = old
        seconds = time.perf_counter() - t0
        imgs = torch.cat(images)
        po, ps = predict_proba(self.classifier, imgs)
        moments = {hp: st.means() for hp, st in stats.items()}
        mean, sq = {hp: m[0] for hp, m in moments.items()}, {hp: m[1] for hp, m in moments.items()}
        label = f"{method}" + (f" [{', '.join(concepts)}]" if concepts else "")
        self.progress(f"{label}: {len(imgs)} images in {seconds:.1f}s")
        return RunOutput(imgs, po.argmax(1), ps.argmax(1), po, ps, mean, sq, seconds)

    # -------------------------------------------------------------- metrics

    def _labels(self) -> tuple[Tensor, Tensor]:
        n = len(self.settings.seeds)
        return self.grid.objects.repeat_interleave(n), self.grid.styles.repeat_interleave(n)

    def accuracy(self, out: RunOutput) -> dict[str, float]:
        """Object and style accuracy over the whole grid."""
        lo, ls = self._labels()
        return {"object": float((out.objects == lo).float().mean()), "style": float((out.styles == ls).float().mean())}

    def concept_metrics(self, out: RunOutput, concept: str, clean: RunOutput) -> dict[str, float]:
        """UA / IRA / CRA and the artifact measures of one erased concept."""
        kind, cid = self.grid.kind_of(concept)
        lo, ls = self._labels()
        label, pred = (lo, out.objects) if kind == "object" else (ls, out.styles)
        other_label, other_pred, other_prob = (ls, out.styles, out.style_prob) if kind == "object" else \
            (lo, out.objects, out.object_prob)
        target = label == cid
        ua = float((pred[target] != cid).float().mean())
        ira = float((pred[~target] == label[~target]).float().mean())
        cra = float((other_pred == other_label).float().mean())
        conf = float(other_prob[target].gather(1, other_label[target][:, None]).mean())
        return {"UA": ua, "IRA": ira, "CRA": cra, "retained_confidence": conf,
                "activation_shift": self.activation_shift(out, clean, concept),
                "misread": self.misreads(kind, label[~target], pred[~target])}

    def misreads(self, kind: str, label: Tensor, pred: Tensor) -> dict[str, int]:
        """``{"<true> as <read>": count}`` of the wrong readings among these images, most frequent first.

        Under a concept's erasure, over the other concepts' images of its kind, these are what IRA lost.
        """
        names = self.grid.object_names if kind == "object" else self.grid.style_names
        wrong = pred != label
        counts = Counter(f"{names[t]} as {names[r]}" for t, r in zip(label[wrong].tolist(), pred[wrong].tolist()))
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def misread_tiles(self, out: RunOutput, concept: Optional[str] = None) -> list[dict[str, Any]]:
        """The images whose reading went wrong, one dict each (prompt, seed, head, true and read label, why).

        Without ``concept`` (the clean run) every image a head misreads; with an erased ``concept``
        its own images still read as it (``"still"``: what UA missed) and the other images of its kind
        read wrong (``"lost"``: what IRA lost), in that order.
        """
        n = len(self.settings.seeds)
        lo, ls = self._labels()
        heads = {"object": (lo, out.objects, self.grid.object_names), "style": (ls, out.styles, self.grid.style_names)}
        if concept is None:
            picks = [(head, i, "misread") for head, (label, pred, _) in heads.items()
                     for i in (pred != label).nonzero().squeeze(1).tolist()]
            picks.sort(key=lambda p: p[1])
        else:
            head, cid = self.grid.kind_of(concept)
            label, pred, _ = heads[head]
            still = ((label == cid) & (pred == cid)).nonzero().squeeze(1).tolist()
            lost = ((label != cid) & (pred != label)).nonzero().squeeze(1).tolist()
            picks = [(head, i, "still") for i in still] + [(head, i, "lost") for i in lost]
        tiles = []
        for head, i, why in picks:
            label, pred, names = heads[head]
            tiles.append({"index": i, "prompt": self.grid.prompts[i // n], "seed": self.settings.seeds[i % n],
                          "head": head, "true": names[int(label[i])], "read": names[int(pred[i])], "why": why})
        return tiles

    def save_misread_sheet(self, out: RunOutput, path: str, concept: Optional[str] = None, scale: int = 6) -> list[dict[str, Any]]:
        """Write ``path`` (PNG sheet of :meth:`misread_tiles`, labelled ``true -> read``) and ``path`` + ``.json``.

        With nothing wrong only the JSON (an empty list) is written.
        """
        from PIL import Image

        from ..inspection import image_grid

        tiles = self.misread_tiles(out, concept)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".json", "w", encoding="utf-8") as f:
            json.dump(tiles, f, indent=1)
        if not tiles:
            return tiles
        band = 14  # a dark strip above each picture holds its label, so the label hides none of it
        h, w = out.images.shape[-2:]
        cells, labels = [], []
        for t in tiles:
            cell = Image.new("RGB", (w * scale, h * scale + band))
            pic = Image.fromarray(out.images[t["index"]].permute(1, 2, 0).numpy())
            cell.paste(pic.resize((w * scale, h * scale), Image.NEAREST), (0, band))
            cells.append(cell)
            labels.append(f"{t['true']} -> {t['read']}")
        cols = min(8, len(cells))
        while len(cells) % cols:
            cells.append(Image.new("RGB", cells[0].size, (255, 255, 255)))
            labels.append("")
        rows = [cells[r:r + cols] for r in range(0, len(cells), cols)]
        grid = image_grid(rows, labels=[labels[r:r + cols] for r in range(0, len(labels), cols)],
                          min_label_width=w * scale)
        grid.save(path)
        return tiles

    def clean_misreads(self, clean: RunOutput) -> dict[str, dict[str, int]]:
        """The wrong readings of each head over the whole grid of a run (of the clean run: where IRA starts)."""
        lo, ls = self._labels()
        return {"object": self.misreads("object", lo, clean.objects), "style": self.misreads("style", ls, clean.styles)}

    def activation_shift(self, out: RunOutput, clean: RunOutput, concept: str) -> float:
        """Distance of the block's per-channel statistics on the concept's prompts from clean concept-free ones.

        Mean over channels of ``|mean - mean_ref| / std_ref + |log(std / std_ref)|``, the reference being
        the clean run's prompts without the concept: 0 means in distribution. Measured at the (first)
        block where the concept is erased.
        """
        kind, cid = self.grid.kind_of(concept)
        hp = self.hook_point_of(concept)
        prompt_label = self.grid.objects if kind == "object" else self.grid.styles
        target = prompt_label == cid

        def moments(run: RunOutput, rows: Tensor) -> tuple[Tensor, Tensor]:
            mean, sq = run.act_mean[hp][rows].mean(0), run.act_sq[hp][rows].mean(0)
            return mean, (sq - mean * mean).clamp_min(1e-12).sqrt()

        m, sd = moments(out, target)
        m_ref, sd_ref = moments(clean, ~target)
        return float(((m - m_ref).abs() / sd_ref + (sd / sd_ref).log().abs()).mean())

    def per_concept(self, method: str, concepts: Sequence[str], clean: RunOutput, *, scheduler: Optional[str] = None,
                    steps: Optional[int] = None, misread_dir: Optional[str] = None) -> list[dict[str, Any]]:
        """One run per concept erased alone (``none`` reuses ``clean``), with its metrics.

        ``misread_dir``: also write each run's misread sheet there (:meth:`save_misread_sheet`).
        """
        rows = []
        for c in concepts:
            out = clean if method == "none" else self.run(method, [c], scheduler=scheduler, steps=steps)
            if misread_dir:
                self.save_misread_sheet(out, os.path.join(misread_dir, f"{method}-{c.replace(' ', '-')}.png"), c)
            rows.append({"concept": c, "kind": self.grid.kind_of(c)[0], **self.concept_metrics(out, c, clean)})
        return rows

    def multi_metrics(self, out: RunOutput, concepts: Sequence[str]) -> dict[str, float]:
        """UA over several erased concepts and retained accuracy of each head on the rest."""
        lo, ls = self._labels()
        erased = {"object": [], "style": []}
        for c in concepts:
            kind, cid = self.grid.kind_of(c)
            erased[kind].append(cid)
        ua_parts, retain = [], {}
        for kind, label, pred in (("object", lo, out.objects), ("style", ls, out.styles)):
            ids = torch.tensor(erased[kind], dtype=torch.long)
            hit = torch.isin(label, ids)
            for cid in erased[kind]:
                ua_parts.append(float((pred[label == cid] != cid).float().mean()))
            retain[kind] = float((pred[~hit] == label[~hit]).float().mean()) if (~hit).any() else float("nan")
        return {"UA": sum(ua_parts) / len(ua_parts), "RA_object": retain["object"], "RA_style": retain["style"]}


def mean_metrics(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Average of each key over rows (NaN-free rows only)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), float) and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


METRIC_KEYS = ("UA", "IRA", "CRA", "retained_confidence", "activation_shift")


def best_strengths(by_strength: dict[float, Sequence[dict[str, Any]]], min_retained: float = 0.0) -> dict[str, float]:
    """Per concept, the strength whose run has the best mean of UA, IRA and CRA (the lower one on ties).

    ``by_strength`` maps a strength to per-concept rows (``concept``, ``UA``, ``IRA``, ``CRA``,
    ``retained_confidence``), as a validation sweep measures them; SAeUron picks a multiplier per object
    class the same way. With ``min_retained`` > 0 a strength only counts for a concept if the classifier's
    confidence in the retained label of its images stays at least that high: a strength that "erases" by
    wrecking the picture wins UA but not this. The lowest strength stays eligible whatever its confidence.
    """
    if not by_strength:
        raise ConfigError("choosing strengths needs runs at one or more strengths")
    if not 0.0 <= min_retained <= 1.0:
        raise ConfigError(f"the retained-confidence floor is a share in [0, 1], got {min_retained}")
    best: dict[str, tuple[float, float]] = {}
    for strength in sorted(by_strength):
        for row in by_strength[strength]:
            if row["concept"] in best and row.get("retained_confidence", 1.0) < min_retained:
                continue
            value = (row["UA"] + row["IRA"] + row["CRA"]) / 3
            if row["concept"] not in best or value > best[row["concept"]][0] + 1e-9:
                best[row["concept"]] = (value, float(strength))
    return {c: s for c, (_, s) in best.items()}


def _read_json(path: str) -> Any:
    """A JSON file's content; a ConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ConfigError(f"{path} is not JSON ({e})") from None


def load_concept_strengths(path: str) -> dict[str, float]:
    """A JSON file ``{concept: strength}`` (as ``sweep_demo_eval.py --per-concept-out`` writes), checked."""
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in data.values()):
        raise ConfigError(f"{path} must hold an object {{concept: strength}} with numbers")
    return {str(k): float(v) for k, v in data.items()}


def load_gates(path: str) -> tuple[dict[str, float], dict[str, str]]:
    """A JSON file ``{concept: {"min_coverage": share, "detect_with": entry}}`` (``detect_with`` optional), checked;
    returns ``(min_coverage_of, detect_with)``."""
    data = _read_json(path)
    form = f'{path} must hold an object {{concept: {{"min_coverage": share, "detect_with": entry}}}}'
    if not isinstance(data, dict):
        raise ConfigError(form)
    coverage, detect = {}, {}
    for concept, gate in data.items():
        share = gate.get("min_coverage") if isinstance(gate, dict) else None
        entry = gate.get("detect_with", "") if isinstance(gate, dict) else None
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 <= share <= 1.0 \
                or not isinstance(entry, str) or set(gate) - {"min_coverage", "detect_with"}:
            raise ConfigError(f"{form}; {concept!r} has {gate!r} (min_coverage between 0 and 1)")
        coverage[str(concept)] = float(share)
        if entry:
            detect[str(concept)] = entry
    return coverage, detect


def summary_by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean metrics of per-concept rows, separately for styles and objects (kinds present only)."""
    return {kind: mean_metrics([r for r in rows if r["kind"] == kind], METRIC_KEYS)
            for kind in ("style", "object") if any(r["kind"] == kind for r in rows)}


def evaluate(pipe: Any, sae: SAEs, classifier: Any, settings: EvalSettings, *,
             methods: Sequence[str] = METHODS, concepts: Optional[Sequence[str]] = None,
             multi: Sequence[int] = (2, 4, 8), generalization: Optional[tuple[str, int]] = ("euler_a", 30),
             progress: Optional[Callable[[str], None]] = None, misread_dir: Optional[str] = None) -> dict[str, Any]:
    """Full mini-UnlearnCanvas evaluation; returns a JSON-ready report.

    ``misread_dir``: write there a sheet of the misread images of the clean run (``none.png``) and of
    each concept's erasure (``<method>-<concept>.png``: still read as the concept, then the other
    images of its kind read wrong), each with a ``.json`` list of prompt, seed and readings.
    """
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
    ev = Evaluator(pipe, sae, classifier, settings, progress=progress)
    grid = ev.grid
    concepts = list(concepts) if concepts else grid.object_names + grid.style_names
    for c in concepts:
        grid.kind_of(c)
    sae_methods = [m for m in methods if m in ("ablate", "replace")]
    lacking = [c for c in concepts if c in ev.missing]
    if sae_methods and lacking:
        raise ConfigError(f"no SAE's concept library has {', '.join(map(repr, lacking))}; learn them first "
                          f"(saeuron learn-concept) or evaluate other concepts")
    t0 = time.perf_counter()
    clean = ev.run("none")
    if misread_dir:
        ev.save_misread_sheet(clean, os.path.join(misread_dir, "none.png"))
    saes = [{"hook_point": hp, "concepts": [c for c in concepts if i in ev.owners.get(c, [])],
             "ablate_strength": ev.ablate_strength(i)} for i, hp in enumerate(ev.hook_points)]
    report: dict[str, Any] = {"settings": asdict(settings), "saes": saes,
                              "grid": {"objects": grid.object_names, "styles": grid.style_names},
                              "clean_accuracy": ev.accuracy(clean), "clean_misread": ev.clean_misreads(clean),
                              "per_concept": {}, "summary": {}}
    for method in methods:
        rows = ev.per_concept(method, concepts, clean, misread_dir=misread_dir if method != "none" else None)
        report["per_concept"][method] = rows
        report["summary"][method] = summary_by_kind(rows)
    if multi:
        report["multi"] = {}
        objs = [c for c in concepts if c in grid.object_names]
        stys = [c for c in concepts if c in grid.style_names]
        for method in [m for m in methods if m != "none"]:
            rows = []
            for n in multi:
                chosen = objs[:n // 2] + stys[:n - n // 2]
                if len(chosen) < n:
                    continue
                out = ev.run(method, chosen)
                rows.append({"n": n, "concepts": chosen, **ev.multi_metrics(out, chosen)})
            report["multi"][method] = rows
    if generalization and sae_methods:
        sched, steps = generalization
        clean_g = ev.run("none", scheduler=sched, steps=steps)
        report["generalization"] = {"scheduler": sched, "steps": steps, "clean_accuracy": ev.accuracy(clean_g),
                                    "summary": {}}
        for method in sae_methods:
            rows = ev.per_concept(method, concepts, clean_g, scheduler=sched, steps=steps)
            report["generalization"]["summary"][method] = summary_by_kind(rows)
    report["seconds"] = time.perf_counter() - t0
    return report


def _check_same(key: str, old: Any, new: Any) -> None:
    if old != new:
        raise ConfigError(f"cannot update the report: its {key.replace('_', ' ')} differ from this run's "
                          f"({old} against {new}); run the whole evaluation instead")


def _refuse_set_runs(has_set_runs: bool) -> None:
    if has_set_runs:
        raise ConfigError("cannot update a report with several-at-once or generalisation runs (only per-concept rows "
                          "merge): add --multi '' --generalization ''")


# Settings that hold one value per concept: an update may change them for the concepts it re-measures.
PER_CONCEPT_SETTINGS = ("ablate_strength_of", "min_coverage_of", "detect_with")


def _without(settings: dict[str, Any], concepts: Collection[str]) -> dict[str, Any]:
    """``settings`` with the per-concept entries of ``concepts`` left out."""
    out = dict(settings)
    for key in PER_CONCEPT_SETTINGS:
        out[key] = {c: v for c, v in (out.get(key) or {}).items() if c not in concepts}
    return out


def _changed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-concept settings that differ between two reports' settings: ``{key: {concept: new value}}``."""
    out = {}
    for key in PER_CONCEPT_SETTINGS:
        a, b = old.get(key) or {}, new.get(key) or {}
        diff = {c: b.get(c) for c in sorted(set(a) | set(b)) if a.get(c) != b.get(c)}
        if diff:
            out[key] = diff
    return out


def _with_defaults(report: dict[str, Any]) -> dict[str, Any]:
    # settings added after the report was written count as their defaults
    return {**json.loads(json.dumps(asdict(EvalSettings()))), **(report.get("settings") or {})}


# Settings that only detect-and-replace reads: a report may take new ones when every replace row is re-measured.
REPLACE_SETTINGS = ("replace_strength", "threshold_scale", "dilation", "replace_source", "neighbors",
                    "replace_also_at")


def _check_settings(report: dict[str, Any], settings: dict[str, Any], concepts: Collection[str],
                    whole: Collection[str] = ()) -> None:
    """Refuse ``settings`` that differ from ``report``'s other than in ``concepts``' own entries (and, when every
    replace row is re-measured, ``"replace"`` in ``whole``, the replace method's own settings)."""
    ignored = REPLACE_SETTINGS if "replace" in whole else ()
    old = {k: v for k, v in _without(_with_defaults(report), concepts).items() if k not in ignored}
    new = {k: v for k, v in _without(settings, concepts).items() if k not in ignored}
    _check_same("settings", old, new)


def _whole_methods(report: dict[str, Any], methods: Collection[str], concepts: Collection[str]) -> list[str]:
    """The SAE ``methods`` whose every per-concept row of ``report`` is among the re-measured ``concepts``."""
    return [m for m in methods if m not in ("none", "negative_prompt") and m in report.get("per_concept", {})
            and {r["concept"] for r in report["per_concept"][m]} <= set(concepts)]


def check_updatable(report: dict[str, Any], settings: EvalSettings, *, set_runs: bool = False,
                    concepts: Sequence[str] = (), methods: Sequence[str] = (), multi: bool = False) -> None:
    """Fail before generating anything when an update of ``report`` would be refused (other settings, or
    ``set_runs``: several-at-once or generalisation runs asked for).

    Only the re-measured ``concepts`` may have their own strength, gate or detector changed. When every row
    of a method is re-measured (``methods``), its several-at-once runs may be too (``multi``), and for
    ``replace`` its own settings (source, dilation, ...) may change.
    """
    whole = _whole_methods(report, methods, concepts)
    sae_methods = [m for m in methods if m not in ("none", "negative_prompt")]
    if multi and not (sae_methods and set(sae_methods) <= set(whole) and report.get("multi")):
        _refuse_set_runs(True)
    _refuse_set_runs(set_runs)
    _check_settings(report, json.loads(json.dumps(asdict(settings))), concepts, whole)


def update_report(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the per-concept rows that ``new`` re-measured, and its summaries recomputed.

    For re-evaluating only the concepts whose library or own settings (strength, gate, detector)
    changed: ``new`` must come from the same settings otherwise, grid and SAE blocks, and reproduce
    ``old``'s clean accuracy (the same model and seeds; generation is deterministic), and must not
    hold generalisation runs, which cannot be merged row by row. A method whose every row ``new``
    re-measures is replaced whole: its several-at-once runs too (``new`` must then hold them, with the
    same set sizes), and for ``replace`` its own settings may differ. The merged report takes ``new``'s
    settings, and its ``updates`` entry records the per-concept ones changed.
    """
    remeasured = {r["concept"] for rows in new["per_concept"].values() for r in rows}
    whole = [m for m in _whole_methods(old, list(new["per_concept"]), remeasured)
             if {r["concept"] for r in old["per_concept"][m]} <= {r["concept"] for r in new["per_concept"][m]}]
    _check_settings(old, new.get("settings") or {}, remeasured, whole)
    for key in ("grid", "clean_accuracy"):
        _check_same(key, old.get(key), new.get(key))
    if "clean_misread" in old and "clean_misread" in new:
        _check_same("clean_misread", old["clean_misread"], new["clean_misread"])
    blocks = [[(e["hook_point"], e["ablate_strength"]) for e in r.get("saes", [])] for r in (old, new)]
    if blocks[0] != blocks[1]:
        raise ConfigError(f"cannot update the report: its SAE blocks {blocks[0]} differ from this run's {blocks[1]}")
    new_multi = new.get("multi") or {}
    _refuse_set_runs(bool(new.get("generalization")))
    for method, rows in new_multi.items():
        sizes = [[r["n"] for r in runs.get(method, [])] for runs in (old.get("multi") or {}, new_multi)]
        if method not in whole or sizes[0] != sizes[1]:
            _refuse_set_runs(True)
    missing = [m for m in new["per_concept"] if m not in old["per_concept"]]
    if missing:
        raise ConfigError(f"cannot update the report: it has no {', '.join(missing)} rows to update")
    order = old["grid"]["objects"] + old["grid"]["styles"]
    concepts = sorted(remeasured, key=order.index)
    # Rows measured over every concept at once would go stale without a word.
    in_sets = sorted({c for method, rows in (old.get("multi") or {}).items()
                      if method in new["per_concept"] and method not in new_multi
                      for r in rows for c in r["concepts"]} & set(concepts), key=order.index)
    if in_sets or (old.get("generalization") and concepts):
        raise ConfigError("cannot update the report: its " + (f"several-at-once runs erase {', '.join(in_sets)}"
                          if in_sets else "generalisation summary covers every concept")
                          + "; run the whole evaluation instead")
    out = copy.deepcopy(old)
    out["settings"] = copy.deepcopy(new["settings"])
    for method, rows in new["per_concept"].items():
        merged = {r["concept"]: r for r in out["per_concept"][method]}
        merged.update({r["concept"]: r for r in rows})
        out["per_concept"][method] = sorted(merged.values(), key=lambda r: order.index(r["concept"]))
        out["summary"][method] = summary_by_kind(out["per_concept"][method])
    for method, runs in new_multi.items():
        out["multi"][method] = copy.deepcopy(runs)
    entry = {"concepts": concepts, "methods": list(new["per_concept"]), "seconds": new["seconds"]}
    changed = _changed(_with_defaults(old), new["settings"])
    if changed:
        entry["changed"] = changed
    replaced = {k: new["settings"].get(k) for k in REPLACE_SETTINGS
                if "replace" in whole and _with_defaults(old).get(k) != new["settings"].get(k)}
    if replaced:
        entry.setdefault("changed", {})["replace"] = replaced
    if new_multi:
        entry["multi"] = list(new_multi)
    out["updates"] = [*old.get("updates", []), entry]
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _summary_table(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| method | kind | UA | IRA | CRA | retained conf. | act. shift |", "|---|---|---|---|---|---|---|"]
    for method, by_kind in summary.items():
        for kind, m in by_kind.items():
            lines.append(f"| {method} | {kind} | {_pct(m['UA'])} | {_pct(m['IRA'])} | {_pct(m['CRA'])} | "
                         f"{_pct(m['retained_confidence'])} | {m['activation_shift']:.2f} |")
    return lines


def _counts(counts: dict[str, int], top: int = 3) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:top])
    rest = sum(list(counts.values())[top:])
    return (shown + (f", {rest} other" if rest else "")) or "none"


def _misread_lines(report: dict[str, Any], per: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The in-domain misreadings behind each IRA (reports from before they were counted have none)."""
    clean = report.get("clean_misread")
    if not clean and not any("misread" in r for rows in per.values() for r in rows):
        return []
    lines = ["", "Misread images of the other concepts of the erased one's kind (what IRA lost; most frequent "
                 "first, true label as read label):", ""]
    if clean:
        lines.append("- clean run, whole grid: objects " + _counts(clean["object"]) + "; styles "
                     + _counts(clean["style"]))
    for method, rows in per.items():
        cells = [f"{r['concept']}: {_counts(r['misread'])}" for r in rows if "misread" in r]
        if cells:
            lines.append(f"- {method}: " + "; ".join(cells))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a report from :func:`evaluate`."""
    s = report["settings"]
    per_sae = len(report.get("saes", [])) > 1 or bool(s.get("ablate_strength_at"))
    # the common strength is only worth a mention when no per-SAE line below gives the ones used
    common = "" if per_sae else f"ablate strength {s['ablate_strength']}, "
    lines = [f"Seeds {s['seeds']}, {s['steps']} {s['scheduler']} steps, CFG {s['guidance']}, {common}replace strength "
             f"{s['replace_strength']} (source {s.get('replace_source')}, dilation {s.get('dilation')}, "
             f"threshold x{s.get('threshold_scale')}"
             + "".join(f", also replaced at {', '.join(v)} from {k}" for k, v in (s.get("replace_also_at") or {}).items())
             + "); clean accuracy object "
             f"{_pct(report['clean_accuracy']['object'])}% / style {_pct(report['clean_accuracy']['style'])}%.", ""]
    if (s.get("start", 0.0), s.get("end", 1.0)) != (0.0, 1.0):
        lines += [f"The SAE methods act from {s['start']:g} to {s['end']:g} of the denoising.", ""]
    if s.get("min_coverage") or s.get("min_coverage_of"):
        of, by = s.get("min_coverage_of", {}), s.get("detect_with", {})
        gates = ([f"{100 * s['min_coverage']:g}% for every other concept"] if s.get("min_coverage") else []) + [
            f"{c} {100 * of.get(c, s['min_coverage']):g}%" + (f" (read by {by[c]!r})" if c in by else "")
            for c in dict.fromkeys([*of, *by])]
        lines += ["The SAE methods touch a concept only in images where its features fire on at least this share of "
                  "the feature map (min_coverage): " + ", ".join(gates) + ".", ""]
    if s.get("ablate_strength_of"):
        lines += ["Ablation strength per concept (chosen on validation): " + ", ".join(
            f"{c} {v:g}" for c, v in s["ablate_strength_of"].items()) + ".", ""]
    if per_sae:
        lines += ["SAEs: " + "; ".join(f"{e['hook_point']} for {', '.join(e['concepts']) or 'nothing'} (ablate "
                                       f"strength {e['ablate_strength']:g})" for e in report["saes"]) + ".", ""]
    lines += _summary_table(report["summary"])
    per = {m: rows for m, rows in report.get("per_concept", {}).items() if m != "none"}
    if per:
        methods = list(per)
        lines += ["", "Per concept (UA / IRA / CRA):", "",
                  "| concept | kind | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for i, row in enumerate(next(iter(per.values()))):
            cells = [f"{_pct(per[m][i]['UA'])} / {_pct(per[m][i]['IRA'])} / {_pct(per[m][i]['CRA'])}" for m in methods]
            lines.append(f"| {row['concept']} | {row['kind']} | " + " | ".join(cells) + " |")
        lines += _misread_lines(report, per)
    if report.get("multi"):
        lines += ["", "Several concepts at once (half objects, half styles):", "",
                  "| method | n | concepts | UA | retain object | retain style |", "|---|---|---|---|---|---|"]
        for method, rows in report["multi"].items():
            for r in rows:
                lines.append(f"| {method} | {r['n']} | {', '.join(r['concepts'])} | {_pct(r['UA'])} | "
                             f"{_pct(r['RA_object'])} | {_pct(r['RA_style'])} |")
    g = report.get("generalization")
    if g:
        lines += ["", f"Generalisation: {g['steps']} {g['scheduler']} steps (concepts learned with another sampler); "
                      f"clean accuracy object {_pct(g['clean_accuracy']['object'])}% / style "
                      f"{_pct(g['clean_accuracy']['style'])}%.", ""]
        lines += _summary_table(g["summary"])
    lines += ["", f"Evaluation time: {report['seconds']:.0f} s."]
    for u in report.get("updates", []):
        changed = "; ".join(f"{key.replace('_', ' ')} " + ", ".join(f"{c} {v}" for c, v in vals.items())
                            for key, vals in u.get("changed", {}).items())
        lines.append(f"Re-measured by an update: {', '.join(u['methods'])} rows of {', '.join(u['concepts'])} "
                     f"({u['seconds']:.0f} s)" + (f", with {changed}" if changed else "") + ".")
    return "\n".join(lines)


def load_report(path: str) -> dict[str, Any]:
    """Read a report written by :func:`save_report` (clear errors for a missing or foreign file)."""
    if not os.path.exists(path):
        raise ConfigError(f"no evaluation report at {path}")
    report = _read_json(path)
    if not isinstance(report, dict) or not {"settings", "grid", "clean_accuracy", "per_concept", "summary"} <= set(report):
        raise ConfigError(f"{path} is not an evaluation report from 'saeuron eval --json'")
    return report


def save_report(report: dict[str, Any], path: str) -> None:
    """Write the report as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
