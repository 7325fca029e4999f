"""The metrics of a run from the classifier's readings: UA / IRA / CRA, the retained label's confidence,
the activation shift, several-at-once UA and retain accuracy, and their means per kind."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .generation import RunOutput
from .grid import Grid
from .misread import misread_counts

METRIC_KEYS = ("UA", "IRA", "CRA", "retained_confidence", "activation_shift")


def accuracy(grid: Grid, n_seeds: int, out: RunOutput) -> dict[str, float]:
    """Object and style accuracy over the whole grid."""
    lo, ls = grid.labels(n_seeds)
    return {"object": float((out.objects == lo).float().mean()), "style": float((out.styles == ls).float().mean())}


def concept_metrics(grid: Grid, n_seeds: int, out: RunOutput, concept: str, clean: RunOutput,
                    hook_point: str) -> dict[str, Any]:
    """UA / IRA / CRA and the artifact measures of one erased concept (its shift read at ``hook_point``)."""
    kind, cid = grid.kind_of(concept)
    lo, ls = grid.labels(n_seeds)
    label, pred = (lo, out.objects) if kind == "object" else (ls, out.styles)
    other_label, other_pred, other_prob = (ls, out.styles, out.style_prob) if kind == "object" else \
        (lo, out.objects, out.object_prob)
    target = label == cid
    ua = float((pred[target] != cid).float().mean())
    ira = float((pred[~target] == label[~target]).float().mean())
    cra = float((other_pred == other_label).float().mean())
    conf = float(other_prob[target].gather(1, other_label[target][:, None]).mean())
    return {"UA": ua, "IRA": ira, "CRA": cra, "retained_confidence": conf,
            "activation_shift": activation_shift(grid, hook_point, out, clean, concept),
            "misread": misread_counts(grid.names(kind), label[~target], pred[~target])}


def activation_shift(grid: Grid, hook_point: str, out: RunOutput, clean: RunOutput, concept: str) -> float:
    """Distance of the block's per-channel statistics on the concept's prompts from clean concept-free ones.

    Mean over channels of ``|mean - mean_ref| / std_ref + |log(std / std_ref)|``, the reference being
    the clean run's prompts without the concept: 0 means in distribution. Read at ``hook_point``.
    """
    kind, cid = grid.kind_of(concept)
    prompt_label = grid.objects if kind == "object" else grid.styles
    target = prompt_label == cid

    def moments(run: RunOutput, rows: Tensor) -> tuple[Tensor, Tensor]:
        mean, sq = run.act_mean[hook_point][rows].mean(0), run.act_sq[hook_point][rows].mean(0)
        return mean, (sq - mean * mean).clamp_min(1e-12).sqrt()

    m, sd = moments(out, target)
    m_ref, sd_ref = moments(clean, ~target)
    return float(((m - m_ref).abs() / sd_ref + (sd / sd_ref).log().abs()).mean())


def multi_metrics(grid: Grid, n_seeds: int, out: RunOutput, concepts: Sequence[str]) -> dict[str, float]:
    """UA over several erased concepts and retained accuracy of each head on the rest."""
    lo, ls = grid.labels(n_seeds)
    erased: dict[str, list[int]] = {"object": [], "style": []}
    for c in concepts:
        kind, cid = grid.kind_of(c)
        erased[kind].append(cid)
    ua_parts, retain = [], {}
    for kind, label, pred in (("object", lo, out.objects), ("style", ls, out.styles)):
        ids = torch.tensor(erased[kind], dtype=torch.long)
        hit = torch.isin(label, ids)
        for cid in erased[kind]:
            ua_parts.append(float((pred[label == cid] != cid).float().mean()))
        retain[kind] = float((pred[~hit] == label[~hit]).float().mean()) if (~hit).any() else float("nan")
    return {"UA": sum(ua_parts) / len(ua_parts), "RA_object": retain["object"], "RA_style": retain["style"]}


def mean_metrics(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Average of each key over rows (NaN-free rows only)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), float) and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def summary_by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean metrics of per-concept rows, separately for styles and objects (kinds present only)."""
    return {kind: mean_metrics([r for r in rows if r["kind"] == kind], METRIC_KEYS)
            for kind in ("style", "object") if any(r["kind"] == kind for r in rows)}
