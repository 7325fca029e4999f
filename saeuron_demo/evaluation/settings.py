"""How an evaluation generates and erases: :class:`EvalSettings`, the methods it compares, and the
:class:`~saeuron_core.erasure.options.EraseOptions` each SAE method's erasers are built with."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from saeuron_core.erasure.options import EraseOptions
from saeuron_core.errors import ConfigError

METHODS = ("none", "negative_prompt", "ablate", "replace")
SAE_METHODS = ("ablate", "replace")  # the methods that erase with the SAEs' concept libraries
# Detect-and-replace on the shipped demo SAEs: the later block where the objects are drawn again from the prompt
# (EVALUATION.md, "Detect and replace"), replaced with what the first object block detects.
DEMO_REPLACE_ALSO_AT: dict[str, list[str]] = {"down_blocks.2.attentions.1": ["up_blocks.1.attentions.0"]}

#: the :class:`EraseOptions` fields a replace eraser takes from :attr:`EvalSettings.replace` (its other fields are the
#: evaluation's own: the window and the gates, which ablation shares; ablation keeps the eraser's defaults for these)
REPLACE_OPTIONS = ("strength", "threshold_scale", "dilation", "source", "neighbors")
_REPLACE = EraseOptions(method="replace")


@dataclass
class EvalSettings:
    """How images are generated and erased during an evaluation.

    ``replace`` holds the replace method's own eraser options (:data:`REPLACE_OPTIONS`); the window
    (``start``, ``end``) and the gates are the evaluation's, for both SAE methods. The erasers get them
    through :meth:`erase_options`. A report holds these settings flat (``report.settings_json``).
    """

    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    guidance: float = 3.0
    scheduler: str = "ddim"
    ablate_strength: float = 10.0
    ablate_strength_at: dict[str, float] = field(default_factory=dict)  # hook point -> strength of the SAE there
    ablate_strength_of: dict[str, float] = field(default_factory=dict)  # concept -> its own strength (wins over both)
    replace: EraseOptions = _REPLACE
    min_coverage: float = 0.0  # erase a concept only in images where it fires on this share of the feature map
    min_coverage_of: dict[str, float] = field(default_factory=dict)  # concept -> its own gate (wins over the common)
    detect_with: dict[str, str] = field(default_factory=dict)  # concept -> library entry that reads its coverage
    # replace: detecting hook point -> later blocks where what it detected is replaced too
    replace_also_at: dict[str, list[str]] = field(default_factory=dict)
    start: float = _REPLACE.start  # the SAE methods act on this window of the denoising (0 = first step)
    end: float = _REPLACE.end
    batch_size: int = 64

    def __post_init__(self) -> None:
        others = {f.name for f in fields(EraseOptions)} - set(REPLACE_OPTIONS)
        stray = sorted(n for n in others if getattr(self.replace, n) != getattr(_REPLACE, n))
        if stray:
            raise ConfigError(f"EvalSettings.replace is EraseOptions(method='replace', ...) with only the replace "
                              f"method's own options set ({', '.join(REPLACE_OPTIONS)}), not {', '.join(stray)}: the "
                              f"window and the gates are the evaluation's own settings, for both methods")

    def node_defaults(self) -> "EvalSettings":
        """The same generation with every erasure setting at the Concept Eraser node's defaults: its default
        strength for every concept on every block, no gate, the whole denoising, the SAE's own block only."""
        return EvalSettings(seeds=list(self.seeds), steps=self.steps, guidance=self.guidance,
                            scheduler=self.scheduler, ablate_strength=EraseOptions().strength,
                            batch_size=self.batch_size)

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
        the common ``min_coverage``, no detectors). Only replace reads :attr:`replace` (its
        :data:`REPLACE_OPTIONS`: strength, threshold scale, dilation, source, neighbors); ablation takes its
        strengths per concept (:meth:`strength_for`) and leaves the rest at the eraser's defaults.
        """
        gates = self.gate_options(concepts) if concepts is not None else {"min_coverage": self.min_coverage}
        own = {name: getattr(self.replace, name) for name in REPLACE_OPTIONS} if method == "replace" else {}
        return EraseOptions(method=method, start=self.start, end=self.end, **own, **gates)  # type: ignore[arg-type]
