"""Learning concepts: generate prompts with and without each concept through a pipeline, record the SAE's
features at the hooked block (conditional rows only, as SAeUron does) and add the scored concepts to the
SAE's library. One generation pass serves many concepts (each distinct prompt is generated once)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..hosts.diffusers import generate, set_scheduler
from ..hosts.hooks import check_sae_fits, denoiser, pipeline_hook
from ..sae.library import ConceptData, add_concept, check_concept_name
from ..sae.model import TopKSAE
from .stats import DEFAULT_MIN_SPECIFICITY, ConceptStats, check_selection


class ConceptRecorder:
    """Block-call function that feeds :class:`ConceptStats` from the conditional rows of each call.

    Before each generation set ``groups``: one group for every conditional row, however many the sampler
    makes (an ``int``; the ComfyUI Learn Concept node's sampler may batch or split the rows of one prompt),
    or one group id per prompt of the next pipeline call, in order (a tensor).
    """

    def __init__(self, sae: TopKSAE, stats: ConceptStats) -> None:
        self.sae, self.stats = sae, stats
        self.groups: int | torch.Tensor = 0

    def __call__(self, call: Any) -> None:
        if call.timesteps is None:
            raise ConfigError("scoring needs the timestep of each call: hook the UNet, not a lone block")
        rows = call.tokens[call.is_cond]
        per_prompt = not isinstance(self.groups, int)
        if per_prompt and rows.shape[0] != len(self.groups):
            raise ConfigError(f"expected {len(self.groups)} conditional rows per UNet call, got {rows.shape[0]}")
        if rows.shape[0]:
            with torch.no_grad():
                code = self.sae.on_device(rows.device).encode(rows)
            add = self.stats.add_groups if per_prompt else self.stats.add_to
            add(self.groups, call.timesteps[call.is_cond], code.values, code.indices)
        return None


def learn_concept(pipe: Any, sae: TopKSAE, name: str, positive: Sequence[str], negative: Sequence[str], *,
                  hook_point: Optional[str] = None, steps: int = 50, guidance_scale: float = 7.5,
                  scheduler: Optional[str] = None, seeds: Sequence[int] = (0,), batch_size: int = 4,
                  top_n: Optional[int] = None, quantile: Optional[float] = None,
                  min_specificity: float = DEFAULT_MIN_SPECIFICITY, bucket_width: float = 20.0,
                  height: Optional[int] = None, width: Optional[int] = None, progress: bool = True,
                  peak_specificity: Optional[float] = None) -> ConceptData:
    """Generate ``positive`` and ``negative`` prompts, score the SAE's features and add the concept to ``sae``.

    Activations are read from the conditional half only (as SAeUron does).
    """
    return learn_concepts(pipe, sae, {name: (positive, negative)}, hook_point=hook_point, steps=steps,
                          guidance_scale=guidance_scale, scheduler=scheduler, seeds=seeds, batch_size=batch_size,
                          top_n=top_n, quantile=quantile, min_specificity=min_specificity,
                          bucket_width=bucket_width, height=height, width=width, progress=progress,
                          peak_specificity=peak_specificity)[0]


def learn_concepts(pipe: Any, sae: TopKSAE, concepts: dict[str, tuple[Sequence[str], Sequence[str]]], *,
                   hook_point: Optional[str] = None, steps: int = 50, guidance_scale: float = 7.5,
                   scheduler: Optional[str] = None, seeds: Sequence[int] = (0,), batch_size: int = 4,
                   top_n: Optional[int] = None, quantile: Optional[float] = None,
                   min_specificity: float = DEFAULT_MIN_SPECIFICITY, bucket_width: float = 20.0,
                   height: Optional[int] = None, width: Optional[int] = None,
                   progress: bool = True, peak_specificity: Optional[float] = None) -> list[ConceptData]:
    """Learn several concepts ``{name: (positive prompts, negative prompts)}`` from one generation pass.

    Every distinct prompt is generated once per seed, whatever the number of concepts using it;
    each concept is then scored from the statistics of its own prompts and added to ``sae``.
    """
    if not concepts:
        raise ConfigError("learn_concepts: no concepts given")
    cleaned: dict[str, tuple[list[str], list[str]]] = {}
    for name, (positive, negative) in concepts.items():
        name = check_concept_name(name)
        pos, neg = [p for p in positive if p.strip()], [p for p in negative if p.strip()]
        if not pos or not neg:
            raise ConfigError(f"concept {name!r}: needs at least one positive and one negative prompt")
        cleaned[name] = (pos, neg)
    if steps < 1 or batch_size < 1 or not seeds:
        raise ConfigError("learn_concept: steps and batch_size must be >= 1 and at least one seed is needed")
    check_selection(top_n, quantile, min_specificity=min_specificity, peak_specificity=peak_specificity)
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("the SAE does not say where it hooks; pass hook_point (e.g. 'up_blocks.1.attentions.1')")
    check_sae_fits(denoiser(pipe), hook_point, sae)
    prompts = list(dict.fromkeys(p for pos, neg in cleaned.values() for p in pos + neg))
    group = {p: i for i, p in enumerate(prompts)}
    old_scheduler = pipe.scheduler
    if scheduler:
        set_scheduler(pipe, scheduler)
    max_t = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
    stats = ConceptStats(sae.n_latents, bucket_width=bucket_width, max_timestep=max_t, n_groups=len(prompts))
    record = ConceptRecorder(sae, stats)
    work = [(p, s) for s in seeds for p in prompts]
    label = next(iter(cleaned)) if len(cleaned) == 1 else f"{len(cleaned)} concepts"
    bar = tqdm(total=len(work), desc=f"learn {label}", unit="gen", disable=not progress)
    scheduler_name = type(pipe.scheduler).__name__
    try:
        with sae.kept_beside(denoiser(pipe)), pipeline_hook(pipe, hook_point, record, residual=sae.config.residual), \
                torch.no_grad():
            for begin in range(0, len(work), batch_size):
                chunk = work[begin:begin + batch_size]
                record.groups = torch.tensor([group[p] for p, _ in chunk], dtype=torch.long)
                generate(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps=steps,
                         guidance_scale=guidance_scale, height=height, width=width)
                bar.update(len(chunk))
    finally:
        bar.close()
        pipe.scheduler = old_scheduler
    learned = []
    for name, (pos, neg) in cleaned.items():
        merged = stats.merge([group[p] for p in pos], [group[p] for p in neg], peak=peak_specificity is not None)
        info = {"positive": pos, "negative": neg, "hook_point": hook_point, "steps": steps,
                "guidance_scale": guidance_scale, "scheduler": scheduler_name, "seeds": list(seeds),
                "tokens": {"positive": float(merged.tokens[0].sum()), "negative": float(merged.tokens[1].sum())}}
        learned.append(merged.result(name, top_n=top_n, quantile=quantile, min_specificity=min_specificity, info=info,
                                     peak_specificity=peak_specificity))
    for data in learned:
        add_concept(sae, data)
    return learned
