"""The demo model's training schedule: the learning rate at each step and each step's own seed."""

from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, a: Any) -> float:
    """Linear warm-up, then cosine decay to ``a.min_lr_frac * a.lr`` at ``a.total_steps``, counted from
    ``a.restart_at`` (``a``: the training script's arguments: ``lr``, ``warmup``, ``total_steps``, ``restart_at``,
    ``min_lr_frac``)."""
    step -= a.restart_at
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    prog = min(1.0, (step - a.warmup) / max(1, a.total_steps - a.restart_at - a.warmup))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def step_seed(seed: int, step: int) -> int:
    """Per-step data/noise seed, independent of any RNG state (so resuming is exact)."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63)
