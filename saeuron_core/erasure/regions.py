"""Paint where to erase: limit any block edit (ablation, replacement, with any gate) to a region of the picture.

A mask ``[H, W]`` or ``[M, H, W]`` (values 0..1, e.g. ComfyUI's MASK) is resized to each block's token grid
(area average, then at least half covered counts as inside) and the edit is kept only inside the painted region,
or only outside it. Picture ``i`` of a batch uses mask ``i % M``; the unconditional rows of a CFG batch use the
mask of their picture.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..hosts.hooks import BlockCall, HookFn

MaskMode = Literal["inside", "outside"]


class Mount(NamedTuple):
    """A block function and where it goes: the block's diffusers name, and whether it edits the block's update
    (``residual``) rather than its output."""

    point: str
    fn: HookFn
    residual: bool


def check_mask(mask: Tensor, mode: str = "inside") -> Tensor:
    """The mask as float ``[M, H, W]``; refuses what cannot be a painted region."""
    if mode not in ("inside", "outside"):
        raise ConfigError(f"mask_mode must be 'inside' or 'outside', got {mode!r}")
    if not isinstance(mask, Tensor):
        raise ConfigError(f"mask must be a tensor [H, W] or [M, H, W], got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or min(mask.shape) < 1:
        raise ConfigError(f"mask must have shape [H, W] or [M, H, W], got {tuple(mask.shape)}")
    mask = mask.detach().float().cpu()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ConfigError("mask values must be finite and between 0 and 1")
    return mask


def token_grid(n_tokens: int, spatial: Optional[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` token grid of a block call: its own, or the one of ``n_tokens`` with the mask's aspect
    ratio (DiT blocks see a flat sequence of patches)."""
    if spatial is not None:
        return spatial
    aspect = height / width
    h = max(1, round(math.sqrt(n_tokens * aspect)))
    for candidate in sorted(range(max(1, h - 2), h + 3), key=lambda c: abs(c - h)):
        if n_tokens % candidate == 0 and 2 / 3 <= candidate * candidate / n_tokens / aspect <= 3 / 2:
            return candidate, n_tokens // candidate
    raise ConfigError(f"cannot lay {n_tokens} tokens out as a grid with the mask's aspect ratio {width}x{height}")


def token_mask(mask: Tensor, call: BlockCall, mode: MaskMode = "inside") -> Tensor:
    """``[B, N]`` bool: the tokens of each row of ``call`` that may be edited."""
    batch, n = call.tokens.shape[:2]
    h, w = token_grid(n, call.spatial, mask.shape[-2], mask.shape[-1])
    inside = F.adaptive_avg_pool2d(mask[:, None], (h, w))[:, 0].reshape(mask.shape[0], h * w) >= 0.5
    halves = 2 if bool(call.is_cond.any()) and not bool(call.is_cond.all()) and batch % 2 == 0 else 1
    picture = torch.arange(batch) % (batch // halves)
    rows = inside[picture % mask.shape[0]]
    return (rows if mode == "inside" else ~rows).to(call.tokens.device)


class RegionEdit:
    """A block-call function (an eraser) whose edits are kept only inside (or only outside) a painted region."""

    def __init__(self, fn: HookFn, mask: Tensor, mode: MaskMode = "inside") -> None:
        self.mask = check_mask(mask, mode)
        self.fn, self.mode = fn, mode

    def __getattr__(self, name: str):  # the wrapped eraser's state (masks, settings) stays reachable
        return getattr(self.__dict__["fn"], name)

    def __call__(self, call: BlockCall) -> Optional[Tensor]:
        new = self.fn(call)
        if new is None:
            return None
        keep = token_mask(self.mask, call, self.mode)
        if not keep.any():
            return None
        return torch.where(keep[..., None], new, call.tokens)
