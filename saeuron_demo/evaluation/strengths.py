"""Choosing each concept's ablation strength from a validation sweep (``scripts/sweep_demo_eval.py``).

The chosen strengths are kept as ``{concept: strength}`` JSON, read by
:func:`saeuron_demo.asset_files.load_concept_strengths`.
"""

from __future__ import annotations

from typing import Any, Sequence

from saeuron_core.errors import ConfigError


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
