"""95% intervals of the evaluation's figures: Wilson's for proportions (UA, IRA, CRA and the rates of other
sections, all shares of images), a percentile bootstrap over images for means (the retained confidence)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 2000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (NaNs when there are no trials)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 or n the bound is exactly 0 or 1; computed it can miss by a rounding error
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def bootstrap_mean(values: Sequence[float] | torch.Tensor, *, resamples: int = RESAMPLES, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per image), reproducible for a ``seed``."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return float("nan"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, x.numel(), (resamples, x.numel()), generator=generator)
    means = x[picks].mean(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(lo), float(hi)
