"""The metrics of a run from the classifier's readings: UA / IRA / CRA, the retained label's confidence,
the activation shift, several-at-once UA and retain accuracy, and their means per kind, each share and mean with
its 95% interval (:mod:`.intervals`).

A row keeps what its intervals are made from: ``counts`` (``[hits, images]`` of each share) and
``confidences`` (the retained label's confidence on each of the concept's images), so that the intervals of a
kind pool its concepts' images."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .generation import RunOutput
from .grid import Grid
from .intervals import bootstrap_mean, wilson
from .misread import misread_counts

METRIC_KEYS = ("UA", "IRA", "CRA", "retained_confidence", "activation_shift")
SHARES = ("UA", "IRA", "CRA")  # shares of images: Wilson intervals
DIGITS = 5  # per-image confidences are kept to this many decimals


def share(hits: Tensor) -> tuple[float, list[int]]:
    """The share of true entries in a bool tensor and its ``[hits, images]``."""
    return float(hits.float().mean()), [int(hits.sum()), int(hits.numel())]


def intervals(counts: dict[str, list[int]], confidences: Sequence[float] = ()) -> dict[str, list[float]]:
    """95% intervals: Wilson's for each ``[hits, images]`` count, a bootstrap for the mean confidence."""
    out = {key: list(wilson(*counts[key])) for key in counts}
    if len(confidences):
        out["retained_confidence"] = list(bootstrap_mean(confidences))
    return out


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
    (ua, ua_n), (ira, ira_n) = share(pred[target] != cid), share(pred[~target] == label[~target])
    cra, cra_n = share(other_pred == other_label)
    confidences = other_prob[target].gather(1, other_label[target][:, None]).flatten()
    counts = {"UA": ua_n, "IRA": ira_n, "CRA": cra_n}
    kept = [round(float(c), DIGITS) for c in confidences]
    return {"UA": ua, "IRA": ira, "CRA": cra, "retained_confidence": float(confidences.mean()),
            "activation_shift": activation_shift(grid, hook_point, out, clean, concept),
            "misread": misread_counts(grid.names(kind), label[~target], pred[~target]),
            "interval": intervals(counts, kept), "counts": counts, "confidences": kept}


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
    ua_parts, retain, counts = [], {}, {"UA": [0, 0]}
    for kind, label, pred in (("object", lo, out.objects), ("style", ls, out.styles)):
        ids = torch.tensor(erased[kind], dtype=torch.long)
        hit = torch.isin(label, ids)
        for cid in erased[kind]:
            part, (k, n) = share(pred[label == cid] != cid)
            ua_parts.append(part)
            counts["UA"] = [counts["UA"][0] + k, counts["UA"][1] + n]
        rest = (float("nan"), [0, 0]) if hit.all() else share(pred[~hit] == label[~hit])
        retain[kind], counts[f"RA_{kind}"] = rest
    return {"UA": sum(ua_parts) / len(ua_parts), "RA_object": retain["object"], "RA_style": retain["style"],
            "interval": intervals(counts), "counts": counts}


def mean_metrics(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Average of each key over rows (NaN-free rows only)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), float) and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def pooled(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean metrics of rows and, where every row keeps its counts, the intervals of their pooled images."""
    out: dict[str, Any] = mean_metrics(rows, METRIC_KEYS)
    if rows and all("counts" in r for r in rows):
        counts = {key: [sum(r["counts"][key][i] for r in rows) for i in (0, 1)] for key in SHARES}
        out["interval"] = intervals(counts, [c for r in rows for c in r.get("confidences", [])])
    return out


def summary_by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean metrics of per-concept rows, separately for styles and objects (kinds present only), with the 95%
    intervals of each kind's images pooled over its concepts."""
    return {kind: pooled([r for r in rows if r["kind"] == kind])
            for kind in ("style", "object") if any(r["kind"] == kind for r in rows)}
