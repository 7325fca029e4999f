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


@dataclass(frozen=True)
class EraseOptions:
    """An eraser's options, validated on construction (a :class:`ConfigError` says what is expected).

    Each field's ``metadata["help"]`` is the one description the CLI shows.
    """

    method: Method = field(default="ablate", metadata=_help(
        "ablate (push the concept's features negative) or replace (swap the patches where they fire)",
        choices=("ablate", "replace")))
    strength: float = field(default=1.0, metadata=_help(
        f"ablate: gamma = -strength (0-{MAX_ABLATE_STRENGTH:g}); replace: share of replacement (0-1)"))
    start: float = field(default=0.0, metadata=_help("start of the window (fraction of denoising, 0 = first step)"))
    end: float = field(default=1.0, metadata=_help("end of the window (fraction of denoising)"))
    cfg: Literal["both", "cond", "uncond"] = field(default="both", metadata=_help(
        "CFG halves to edit", choices=("both", "cond", "uncond")))
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
        "feature map (0: everywhere they fire); a mapping gives each concept its own"))
    detect_with: Optional[Mapping[str, str]] = field(default=None, metadata=_help(
        "with min_coverage: {concept: library entry} whose features read the concept's coverage"))
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
