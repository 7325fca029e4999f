"""The :class:`Evaluator`: runs erasure methods on the demo grid with one or several SAEs and scores the
runs with the demo classifier (generation in :mod:`.generation`, metrics in :mod:`.scoring`, misread
sheets in :mod:`.misread`)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.erasure.options import ConceptsArg
from saeuron_core.errors import ConfigError
from saeuron_core.sae.model import TopKSAE

from . import misread, scoring
from .generation import ActivationStats, RunOutput, classify, generate_images, hooked, scheduler_set
from .grid import Grid, concept_owners, demo_grid
from .settings import METHODS, SAE_METHODS, EvalSettings

SAEs = Union[TopKSAE, Sequence[TopKSAE]]


def _hook_points(saes: Sequence[TopKSAE]) -> list[str]:
    """Where each SAE hooks: one SAE per block, each saying where."""
    if not saes:
        raise ConfigError("evaluation needs at least one SAE")
    points: list[str] = []
    for s in saes:
        if not s.config.hook_point:
            raise ConfigError("an SAE does not say where it hooks; evaluation needs its hook point")
        if s.config.hook_point in points:
            raise ConfigError(f"two SAEs hook {s.config.hook_point}; give one SAE per block")
        points.append(s.config.hook_point)
    return points


def _check_blocks(settings: EvalSettings, hook_points: Sequence[str]) -> None:
    """Refuse per-block settings for blocks that no SAE hooks."""
    for named, what in ((settings.replace_also_at, "replace_also_at names {} as detecting blocks but no SAE hooks them"),
                        (settings.ablate_strength_at, "an ablate strength is set for {} but no SAE hooks it")):
        stray = sorted(set(named) - set(hook_points))
        if stray:
            raise ConfigError(what.format(", ".join(stray)) + f" (the SAEs hook {', '.join(hook_points)})")


def _check_concepts(settings: EvalSettings, saes: Sequence[TopKSAE], hook_points: Sequence[str],
                    owners: dict[str, list[int]]) -> None:
    """Refuse per-concept settings for concepts no SAE erases, and detectors missing from an erasing SAE."""
    for what, names in (("an ablate strength", settings.ablate_strength_of),
                        ("a min_coverage", settings.min_coverage_of), ("a detector", settings.detect_with)):
        stray = sorted(set(names) - set(owners))
        if stray:
            raise ConfigError(f"{what} is set for {', '.join(map(repr, stray))} but no SAE's concept library has it")
    for i, sae in enumerate(saes):  # every SAE that erases a gated concept needs its detector entry
        mine = [c for c in settings.detect_with if i in owners.get(c, [])]
        lacking = [settings.detect_with[c] for c in mine if settings.detect_with[c] not in sae.concepts]
        if lacking:
            raise ConfigError(f"the SAE at {hook_points[i]} erases {', '.join(map(repr, mine))} but its "
                              f"library lacks the detector {', '.join(map(repr, lacking))}")


class Evaluator:
    """Runs erasure methods on the demo grid and scores them with the demo classifier."""

    def __init__(self, pipe: Any, sae: SAEs, classifier: Any, settings: EvalSettings,
                 grid: Optional[Grid] = None, progress: Optional[Callable[[str], None]] = None) -> None:
        if not settings.seeds or settings.steps < 1 or settings.batch_size < 1:
            raise ConfigError("evaluation needs at least one seed, steps >= 1 and batch_size >= 1")
        settings.erase_options("ablate")  # checks the window and the common gate
        self.saes = [sae] if isinstance(sae, TopKSAE) else list(sae)
        self.hook_points = _hook_points(self.saes)
        _check_blocks(settings, self.hook_points)
        self.pipe, self.classifier, self.settings = pipe, classifier, settings
        self.grid = grid or demo_grid()
        self.progress = progress or (lambda msg: None)
        self.owners = concept_owners(self.saes)
        # concepts of the grid without a library entry cannot be erased by SAE methods
        self.missing = [c for c in self.grid.object_names + self.grid.style_names if c not in self.owners]
        _check_concepts(settings, self.saes, self.hook_points, self.owners)

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
        """One eraser per SAE that erases some of ``concepts``, by hook point, with the settings' options."""
        if method in ("none", "negative_prompt"):
            return {}
        if method not in SAE_METHODS:
            raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        lacking = [c for c in concepts if c not in self.owners]
        if lacking:
            raise ConfigError(f"no SAE's concept library has {', '.join(map(repr, lacking))}")
        out = {}
        for i, sae in enumerate(self.saes):
            mine = [c for c in concepts if i in self.owners[c]]
            if not mine:
                continue
            # ablate: each concept at its own strength; replace: all at the options' strength
            named: ConceptsArg = {c: self.concept_strength(c, i) for c in mine} if method == "ablate" else mine
            out[self.hook_points[i]] = ConceptEraser(sae, named, options=self.settings.erase_options(method, mine))
        return out

    def run(self, method: str, concepts: Sequence[str] = (), *, scheduler: Optional[str] = None,
            steps: Optional[int] = None) -> RunOutput:
        """Generate the whole grid once per seed with ``concepts`` erased by ``method``."""
        s = self.settings
        erasers = self._erasers(method, concepts)
        negative = ", ".join(concepts) if method == "negative_prompt" else None
        # replace: detect at one block, replace at the later ones where the concept enters
        follow = s.replace_also_at if method == "replace" else {}
        stats = {hp: ActivationStats(len(self.grid.prompts)) for hp in self.hook_points}
        with scheduler_set(self.pipe, scheduler or s.scheduler):
            t0 = time.perf_counter()
            with torch.no_grad(), hooked(self.pipe, stats, erasers, follow):
                images = generate_images(self.pipe, self.grid.prompts, s.seeds, stats, steps=steps or s.steps,
                                         guidance=s.guidance, batch_size=s.batch_size, negative=negative)
        seconds = time.perf_counter() - t0
        out = classify(self.classifier, images, stats, seconds)
        label = f"{method}" + (f" [{', '.join(concepts)}]" if concepts else "")
        self.progress(f"{label}: {len(images)} images in {seconds:.1f}s")
        return out

    # -------------------------------------------------------------- metrics

    def _labels(self) -> tuple[Tensor, Tensor]:
        """``(object, style)`` labels of a run's images."""
        return self.grid.labels(len(self.settings.seeds))

    def accuracy(self, out: RunOutput) -> dict[str, float]:
        """Object and style accuracy over the whole grid."""
        return scoring.accuracy(self.grid, len(self.settings.seeds), out)

    def concept_metrics(self, out: RunOutput, concept: str, clean: RunOutput) -> dict[str, Any]:
        """UA / IRA / CRA and the artifact measures of one erased concept."""
        return scoring.concept_metrics(self.grid, len(self.settings.seeds), out, concept, clean,
                                       self.hook_point_of(concept))

    def activation_shift(self, out: RunOutput, clean: RunOutput, concept: str) -> float:
        """:func:`.scoring.activation_shift` at the (first) block where the concept is erased."""
        return scoring.activation_shift(self.grid, self.hook_point_of(concept), out, clean, concept)

    def multi_metrics(self, out: RunOutput, concepts: Sequence[str]) -> dict[str, float]:
        """UA over several erased concepts and retained accuracy of each head on the rest."""
        return scoring.multi_metrics(self.grid, len(self.settings.seeds), out, concepts)

    def misreads(self, kind: str, label: Tensor, pred: Tensor) -> dict[str, int]:
        """``{"<true> as <read>": count}`` of the wrong readings of the ``kind`` head among these images.

        Under a concept's erasure, over the other concepts' images of its kind, these are what IRA lost.
        """
        return misread.misread_counts(self.grid.names(kind), label, pred)

    def clean_misreads(self, clean: RunOutput) -> dict[str, dict[str, int]]:
        """The wrong readings of each head over the whole grid of a run (of the clean run: where IRA starts)."""
        lo, ls = self._labels()
        return {"object": self.misreads("object", lo, clean.objects), "style": self.misreads("style", ls, clean.styles)}

    def misread_tiles(self, out: RunOutput, concept: Optional[str] = None) -> list[dict[str, Any]]:
        """:func:`.misread.misread_tiles` of a run of this grid and these seeds."""
        return misread.misread_tiles(self.grid, self.settings.seeds, out, concept)

    def save_misread_sheet(self, out: RunOutput, path: str, concept: Optional[str] = None,
                           scale: int = 6) -> list[dict[str, Any]]:
        """Write the sheet of :meth:`misread_tiles` to ``path`` (PNG) and ``path`` + ``.json``; returns the tiles.

        With nothing wrong only the JSON (an empty list) is written.
        """
        tiles = self.misread_tiles(out, concept)
        misread.save_misread_sheet(tiles, out.images, path, scale)
        return tiles

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
