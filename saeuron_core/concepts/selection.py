"""How a concept's features are selected, as one options object that the library, the CLI and the ComfyUI
node all build: :class:`Selection`. See :mod:`.stats` for the score and what specificity means."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError

MAX_CANDIDATES = 64
DEFAULT_MIN_SPECIFICITY = 0.5
DEFAULT_TOP_N = 3


def check_selection(top_n: Optional[int], quantile: Optional[float], candidates: int = MAX_CANDIDATES,
                    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
                    peak_specificity: Optional[float] = None) -> Optional[int]:
    """Validate the feature selection; returns ``top_n`` (3 when neither is given)."""
    if not isinstance(min_specificity, (int, float)) or not 0.0 <= min_specificity < 1.0:
        raise ConfigError(f"min_specificity must be in [0, 1), e.g. 0.5, got {min_specificity!r}")
    if peak_specificity is not None and (not isinstance(peak_specificity, (int, float))
                                         or not 0.0 <= peak_specificity < 1.0):
        raise ConfigError(f"peak_specificity must be in [0, 1) (or not given), e.g. 0.0, got {peak_specificity!r}")
    if top_n is not None and quantile is not None:
        raise ConfigError("select features with exactly one of top_n or quantile")
    if top_n is None and quantile is None:
        top_n = DEFAULT_TOP_N
    if top_n is not None and not 1 <= top_n <= candidates:
        raise ConfigError(f"top_n must be between 1 and {candidates}, got {top_n}")
    if quantile is not None and not 0.0 < quantile < 1.0:
        raise ConfigError(f"quantile must be in (0, 1), e.g. 0.9999, got {quantile}")
    return top_n


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Selection:
    """Which features a concept keeps, validated on construction (a :class:`ConfigError` says what is expected).

    ``top_n`` or ``quantile`` (at most one; neither: 3 per timestep), the specificity floors, and the width of the
    timestep buckets the statistics are gathered in. Each field's ``metadata["help"]`` is the one description the
    CLI shows.
    """

    top_n: Optional[int] = field(default=None, metadata=_help("features selected per timestep (default 3)"))
    quantile: Optional[float] = field(default=None, metadata=_help(
        "select features scoring above this quantile, e.g. 0.9999"))
    min_specificity: float = field(default=DEFAULT_MIN_SPECIFICITY, metadata=_help(
        "select only features with (m_c - m_o) / (m_c + m_o) at least this, from their mean activations with (m_c) "
        "and without (m_o) the concept; 0 = SAeUron's selection "
        "(default: saeuron_core.concepts.stats.DEFAULT_MIN_SPECIFICITY)"))
    peak_specificity: Optional[float] = field(default=None, metadata=_help(
        "also require that specificity against the single negative prompt where the feature is most active "
        "(keeps out features a sibling concept shares; default: not required)"))
    bucket_width: float = field(default=20.0, metadata=_help("timesteps per bucket"))

    def __post_init__(self) -> None:
        check_selection(self.top_n, self.quantile, MAX_CANDIDATES, self.min_specificity, self.peak_specificity)
        width = self.bucket_width
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ConfigError(f"bucket_width must be positive (timesteps per bucket), e.g. 20, got {width!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The fields' names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, base: Optional["Selection"] = None, **changes: Any) -> "Selection":
        """``base`` (default: the defaults) with ``changes``; an unknown name is refused with the known ones."""
        unknown = sorted(set(changes) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown selection option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the "
                              f"options are {', '.join(sorted(cls.names()))}")
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)

    def summary(self, candidates: int = MAX_CANDIDATES) -> dict[str, Any]:
        """The selection as a learned concept's ``info["selection"]`` records it (``top_n`` resolved)."""
        top_n = check_selection(self.top_n, self.quantile, candidates, self.min_specificity, self.peak_specificity)
        out: dict[str, Any] = {"top_n": top_n, "quantile": self.quantile, "min_specificity": self.min_specificity}
        if self.peak_specificity is not None:
            out["peak_specificity"] = self.peak_specificity
        return out
