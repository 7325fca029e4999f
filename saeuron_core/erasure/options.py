"""How an eraser edits, as one options object that the library, the CLI, the ComfyUI node and the demo
evaluation all build: :class:`EraseOptions`. Everything but the SAE, the concepts and where it hooks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from ..errors import ConfigError

Method = Literal["ablate", "replace"]
MAX_ABLATE_STRENGTH = 100.0
ConceptsArg = Union[str, Sequence[Union[str, tuple[str, float]]], Mapping[str, float]]
#: the fields that no CLI flag or node input offers, and why (see :class:`EraseOptions` for where the others are)
NOT_EXPOSED = {
    "seed": "only source 'sample' draws with it; the CLI and the node keep the default, so their draws repeat",
    "record_masks": "a switch for reading where replace detected (the demo's replace diagnostics), not a setting",
}


def normalize_concepts(concepts: ConceptsArg, strength: float) -> dict[str, float]:
    """``"cat"``, ``["cat", ("dog", 2.0)]`` or ``{"cat": 1.0}`` -> ``{name: strength}``."""
    if isinstance(concepts, str):
        concepts = [concepts]
    if isinstance(concepts, Mapping):
        return {str(k): float(v) for k, v in concepts.items()}
    out: dict[str, float] = {}
    for item in concepts:
        if isinstance(item, str):
            out[item] = float(strength)
        else:
            name, value = item
            out[str(name)] = float(value)
    return out


def check_coverage(name: Optional[str], value: float) -> None:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        which = f"min_coverage for {name!r}" if name is not None else "min_coverage"
        raise ConfigError(f"{which} must be between 0 and 1 (the share of the feature map where the concept's "
                          f"features must fire before the image is edited), got {value}")


def check_strength(method: str, name: Optional[str], value: float) -> None:
    upper = MAX_ABLATE_STRENGTH if method == "ablate" else 1.0
    if not math.isfinite(value) or not 0.0 <= value <= upper:
        meaning = "the negative multiplier gamma = -strength" if method == "ablate" else "the share of replacement"
        which = f"strength for {name!r}" if name is not None else "strength"
        raise ConfigError(f"{which} must be between 0 and {upper:g} for method {method!r} ({meaning}), got {value}")


def _help(text: str, **more: Any) -> Any:
    return {"help": text, **more}


def _node(name: str, widget: str, tooltip: str, **more: Any) -> dict[str, Any]:
    """``metadata["node"]`` of a field: the Concept Eraser node's input for it (see :class:`EraseOptions`)."""
    return {"input": name, "widget": widget, "tooltip": tooltip, **more}


@dataclass(frozen=True)
class EraseOptions:
    """An eraser's options, validated on construction (a :class:`ConfigError` says what is expected).

    Each field's metadata says where the option is offered besides the library, so adding one is a change here:

    * ``help`` (and ``choices``): the one description the CLI shows;
    * ``cli``: ``saeuron erase`` offers it as ``--field-name`` (``saeuron eval`` offers the replace method's own,
      the evaluation's ``REPLACE_OPTIONS``);
    * ``node``: the Concept Eraser node's input for it: ``input`` (its name), ``widget`` (``float``, ``int``,
      ``boolean``, ``combo`` of the ``choices``, or ``pairs``: ``'key=value'`` text for a mapping), ``tooltip``,
      ``min``/``max``/``step``, ``optional``; its default is the field's.

    A field offered nowhere is in :data:`NOT_EXPOSED`, with the reason.
    """

    method: Method = field(default="ablate", metadata=_help(
        "ablate (push the concept's features negative) or replace (swap the patches where they fire)",
        choices=("ablate", "replace"), cli=True, node=_node(
            "method", "combo", "ablate (SAeUron): push the concept's features negative where they fire. Erases the "
            "most; best for styles and for several concepts at once, though the edited activations can lie far "
            "outside their usual range. replace: the features only detect where the concept is, and those patches "
            "(grown by one) get the unconditional half's, so activations stay in distribution and the rest of the "
            "picture is kept. Suited to one object, with replace_also_at naming the later block that draws it "
            "again; poor for styles.")))
    strength: float = field(default=1.0, metadata=_help(
        f"ablate: gamma = -strength (0-{MAX_ABLATE_STRENGTH:g}); replace: share of replacement (0-1)", cli=True,
        node=_node("strength", "float", "ablate: the negative multiplier (0 = off, below 1 pushes less hard, 1 = "
                   "SAeUron's style setting, up to 100); replace: share of replacement, 0 to 1.",
                   min=0.0, max=MAX_ABLATE_STRENGTH, step=0.05)))
    start: float = field(default=0.0, metadata=_help(
        "start of the window (fraction of denoising, 0 = first step)", cli=True, node=_node(
            "start_percent", "float", "Start erasing at this fraction of the denoising (0 = first step).",
            min=0.0, max=1.0, step=0.01)))
    end: float = field(default=1.0, metadata=_help("end of the window (fraction of denoising)", cli=True, node=_node(
        "end_percent", "float", "Stop erasing after this fraction of the denoising (1 = last step).",
        min=0.0, max=1.0, step=0.01)))
    cfg: Literal["both", "cond", "uncond"] = field(default="both", metadata=_help(
        "CFG halves to edit", choices=("both", "cond", "uncond"), cli=True,
        node=_node("cfg_half", "combo", "Which classifier-free guidance half to edit.")))
    threshold_scale: float = field(default=1.0, metadata=_help("multiply the firing thresholds"))
    dilation: int = field(default=1, metadata=_help("replace: grow the detection mask by this many patches"))
    source: Literal["sample", "nearest", "uncond"] = field(default="uncond", metadata=_help(
        "replace: where replacement patches come from (uncond: the unconditional row's patch at the same place)",
        choices=("sample", "nearest", "uncond")))
    neighbors: int = field(default=1, metadata=_help(
        "replace with source nearest: average this many nearest undetected patches"))
    seed: int = field(default=0, metadata=_help("replace with source sample: seed of the draws"))
    min_coverage: Union[float, Mapping[str, float]] = field(default=0.0, metadata=_help(
        "erase a concept only in images where its features fire on at least this share (0-1) of the hooked "
        "feature map (0: everywhere they fire); a mapping gives each concept its own", cli=True, node=_node(
            "min_coverage", "float", "Only touch an image where the concept's features fire on at least this share "
            "of the feature map (0 = wherever they fire). Keeps pictures without the concept as they were.",
            min=0.0, max=1.0, step=0.01, optional=True)))
    detect_with: Optional[Mapping[str, str]] = field(default=None, metadata=_help(
        "with min_coverage: {concept: library entry} whose features read the concept's coverage", node=_node(
            "detect_with", "pairs", "With min_coverage: another library entry that decides where the concept is, as "
            "'concept=entry' pairs separated by commas (e.g. 'solid=solid (detector)'). Empty: each concept's own "
            "features.", optional=True)))
    record_masks: bool = field(default=False, metadata=_help("keep each call's detection mask (inspection)"))

    def __post_init__(self) -> None:
        if self.method not in ("ablate", "replace"):
            raise ConfigError(f"method must be 'ablate' or 'replace', got {self.method!r}")
        check_strength(self.method, None, float(self.strength))
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ConfigError(f"the window needs 0 <= start <= end <= 1 (fractions of the denoising), got "
                              f"{self.start}..{self.end}")
        if self.cfg not in ("both", "cond", "uncond"):
            raise ConfigError(f"cfg must be 'both', 'cond' or 'uncond', got {self.cfg!r}")
        if self.source not in ("sample", "nearest", "uncond"):
            raise ConfigError(f"source must be 'sample', 'nearest' or 'uncond', got {self.source!r}")
        if not math.isfinite(self.threshold_scale) or self.threshold_scale < 0 or self.dilation < 0:
            raise ConfigError("threshold_scale must be >= 0 and dilation >= 0")
        if int(self.neighbors) != self.neighbors or self.neighbors < 1:
            raise ConfigError(f"neighbors must be a whole number >= 1 (how many of the nearest undetected patches "
                              f"are averaged into a replacement), got {self.neighbors}")
        if isinstance(self.min_coverage, Mapping):
            for name, value in self.min_coverage.items():
                check_coverage(str(name), float(value))
        else:
            check_coverage(None, float(self.min_coverage))
        if self.detect_with is not None and not isinstance(self.detect_with, Mapping):
            raise ConfigError("detect_with must map erased concepts to library entries, like {'solid': 'solid "
                              "(detector)'}")

    @classmethod
    def build(cls, base: Optional["EraseOptions"] = None, **changes: Any) -> "EraseOptions":
        """``base`` (default options) with ``changes``; ``None`` values leave a field as it is.

        An unknown name is refused with the list of known ones (not a ``TypeError`` from deep inside).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown eraser option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the "
                              f"options are {', '.join(sorted(known))}")
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)
