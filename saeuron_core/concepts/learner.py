"""Learning concepts from generations that a host runs: :class:`ConceptLearner` checks the concepts, gathers the
SAE's feature statistics through a block function the host mounts, and scores each concept. The host (a diffusers
pipeline in :mod:`.learning`, ComfyUI's sampler in the Learn Concept node) only generates its prompts."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..errors import ConfigError
from ..sae.library import ConceptData, check_concept_name
from ..sae.model import TopKSAE
from .selection import Selection
from .stats import ConceptStats

ConceptSpec = Mapping[str, tuple[Sequence[str], Sequence[str]]]


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


def checked_concepts(concepts: ConceptSpec) -> dict[str, tuple[list[str], list[str]]]:
    """``{name: (positive, negative)}`` with checked names and blank prompts left out; each needs both kinds."""
    if not concepts:
        raise ConfigError("learn_concepts: no concepts given")
    cleaned: dict[str, tuple[list[str], list[str]]] = {}
    for name, (positive, negative) in concepts.items():
        name = check_concept_name(name)
        pos, neg = [p for p in positive if p.strip()], [p for p in negative if p.strip()]
        if not pos or not neg:
            raise ConfigError(f"concept {name!r}: needs at least one positive and one negative prompt")
        cleaned[name] = (pos, neg)
    return cleaned


class ConceptLearner:
    """Learns concepts ``{name: (positive prompts, negative prompts)}`` from one pass over their distinct prompts.

    The host mounts :attr:`recorder` at the SAE's block, generates every prompt of :attr:`prompts` (with each of
    its seeds), calling :meth:`feed` before each generation to say which prompts it samples, and then takes
    :meth:`results`. Each concept is scored from the statistics of its own prompts (a prompt listed twice counts
    twice), so learning several concepts together equals learning them one at a time. ``notes`` (``{name: {key:
    value}}``, e.g. the word and kind the prompts were built from) go into a concept's ``info`` after its prompts.
    """

    def __init__(self, sae: TopKSAE, concepts: ConceptSpec, selection: Optional[Selection] = None, *,
                 max_timestep: int = 1000, notes: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self.concepts = checked_concepts(concepts)
        self.notes = {check_concept_name(name): dict(note) for name, note in (notes or {}).items()}
        if set(self.notes) - set(self.concepts):
            raise ConfigError(f"notes for unknown concepts: {', '.join(sorted(set(self.notes) - set(self.concepts)))}")
        self.selection = selection if selection is not None else Selection()
        self.prompts = list(dict.fromkeys(p for pos, neg in self.concepts.values() for p in pos + neg))
        self._group = {p: i for i, p in enumerate(self.prompts)}
        self.stats = ConceptStats(sae.n_latents, bucket_width=self.selection.bucket_width, max_timestep=max_timestep,
                                  n_groups=len(self.prompts))
        self.recorder = ConceptRecorder(sae, self.stats)

    def feed(self, prompts: Union[str, Sequence[str]]) -> None:
        """Say what the next generation samples: one prompt for all its conditional rows (a ``str``), or one
        prompt per conditional row of each block call, in order (a list)."""
        try:
            if isinstance(prompts, str):
                self.recorder.groups = self._group[prompts]
            else:
                self.recorder.groups = torch.tensor([self._group[p] for p in prompts], dtype=torch.long)
        except KeyError as exc:
            raise ConfigError(f"{exc.args[0]!r} is not one of the prompts being learned") from None

    def results(self, settings: Mapping[str, Any]) -> list[ConceptData]:
        """Each concept scored, in the order given; ``settings`` (how the host generated: hook point, steps,
        guidance, scheduler, seeds) go into its ``info`` after the prompts, then the number of tokens seen with
        and without the concept."""
        learned = []
        for name, (pos, neg) in self.concepts.items():
            merged = self.stats.merge([self._group[p] for p in pos], [self._group[p] for p in neg],
                                      peak=self.selection.peak_specificity is not None)
            info = {"positive": pos, "negative": neg, **self.notes.get(name, {}), **settings,
                    "tokens": {"positive": float(merged.tokens[0].sum()), "negative": float(merged.tokens[1].sum())}}
            learned.append(merged.result(name, self.selection, info=info))
        return learned
