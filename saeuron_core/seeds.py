"""Stable seeds derived from any tuple of values (independent of Python's hash randomisation), so that
sampling, shuffling and replacement draws are the same on every machine and every rank."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derived_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple of values (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))
