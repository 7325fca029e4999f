"""The prompts an evaluation generates (the demo's object x style grid) and which SAE erases which concept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from saeuron_core.errors import ConfigError
from saeuron_core.sae.library import concept_names
from saeuron_core.sae.model import TopKSAE


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

    def names(self, kind: str) -> list[str]:
        """The object or the style names (``kind`` ``"object"`` or ``"style"``)."""
        return self.object_names if kind == "object" else self.style_names

    def labels(self, n_seeds: int) -> tuple[Tensor, Tensor]:
        """``(object, style)`` labels of a run's images: prompt-major, ``n_seeds`` images per prompt."""
        return self.objects.repeat_interleave(n_seeds), self.styles.repeat_interleave(n_seeds)


def demo_grid() -> Grid:
    """The demo dataset's 8 x 8 prompts."""
    from ..dataset import OBJECTS, STYLES, all_prompts

    pairs = all_prompts()
    return Grid([p for _, _, p in pairs], torch.tensor([o for o, _, _ in pairs]), torch.tensor([s for _, s, _ in pairs]),
                list(OBJECTS), list(STYLES))


def concept_owners(saes: Sequence[TopKSAE]) -> dict[str, list[int]]:
    """``{concept: indices of the SAEs whose library has it}``: every one of them erases that concept."""
    owners: dict[str, list[int]] = {}
    for i, s in enumerate(saes):
        for name in concept_names(s):
            owners.setdefault(name, []).append(i)
    return owners
