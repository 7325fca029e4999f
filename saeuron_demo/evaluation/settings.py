"""How an evaluation generates and erases: :class:`EvalSettings`, the methods it compares, and the
:class:`~saeuron_core.erasure.options.EraseOptions` each SAE method's erasers are built with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from saeuron_core.erasure.options import EraseOptions

METHODS = ("none", "negative_prompt", "ablate", "replace")
SAE_METHODS = ("ablate", "replace")  # the methods that erase with the SAEs' concept libraries
# Detect-and-replace on the shipped demo SAEs: the later block where the objects are drawn again from the prompt
# (EVALUATION.md, "Detect and replace"), replaced with what the first object block detects.
DEMO_REPLACE_ALSO_AT: dict[str, list[str]] = {"down_blocks.2.attentions.1": ["up_blocks.1.attentions.0"]}

_ERASER = EraseOptions()  # the eraser's defaults, which the settings below that it reads share
#: the settings a replace eraser reads, by the name of the :class:`EraseOptions` field each one sets
REPLACE_OPTIONS = {"strength": "replace_strength", "threshold_scale": "threshold_scale", "dilation": "dilation",
                   "source": "replace_source", "neighbors": "neighbors"}


@dataclass
class EvalSettings:
    """How images are generated and erased during an evaluation.

    The fields are the report's ``settings`` (saved reports hold them by these names). The eraser's own
    options among them reach the erasers through :meth:`erase_options`.
    """

    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    guidance: float = 3.0
    scheduler: str = "ddim"
    ablate_strength: float = 10.0
    ablate_strength_at: dict[str, float] = field(default_factory=dict)  # hook point -> strength of the SAE there
    ablate_strength_of: dict[str, float] = field(default_factory=dict)  # concept -> its own strength (wins over both)
    replace_strength: float = _ERASER.strength
    threshold_scale: float = _ERASER.threshold_scale  # replace only: ablate keeps the eraser's default
    min_coverage: float = 0.0  # erase a concept only in images where it fires on this share of the feature map
    min_coverage_of: dict[str, float] = field(default_factory=dict)  # concept -> its own gate (wins over the common)
    detect_with: dict[str, str] = field(default_factory=dict)  # concept -> library entry that reads its coverage
    dilation: int = _ERASER.dilation
    replace_source: str = _ERASER.source
    neighbors: int = _ERASER.neighbors  # replace_source "nearest": the mean of this many nearest undetected patches
    # replace: detecting hook point -> later blocks where what it detected is replaced too
    replace_also_at: dict[str, list[str]] = field(default_factory=dict)
    start: float = _ERASER.start  # the SAE methods act on this window of the denoising (0 = first step)
    end: float = _ERASER.end
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

    def erase_options(self, method: str, concepts: Optional[Sequence[str]] = None) -> EraseOptions:
        """The options of a ``method`` (ablate or replace) eraser of ``concepts`` (validated on construction).

        Both methods act in the ``start``-``end`` window with each concept's gate (without ``concepts``:
        the common ``min_coverage``, no detectors). Only replace reads the replace settings (strength,
        threshold scale, dilation, source, neighbors); ablation takes its strengths per concept
        (:meth:`strength_for`) and leaves the rest at the eraser's defaults.
        """
        gates = self.gate_options(concepts) if concepts is not None else {"min_coverage": self.min_coverage}
        own = {option: getattr(self, name) for option, name in REPLACE_OPTIONS.items()} if method == "replace" else {}
        return EraseOptions(method=method, start=self.start, end=self.end, **own, **gates)  # type: ignore[arg-type]
