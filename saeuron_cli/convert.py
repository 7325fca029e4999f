"""``saeuron convert``: a sparsify/SAeUron, SAELens or SDLens/sdxl-unbox folder -> a native .safetensors file."""

from __future__ import annotations

import argparse

from .common import IMPORT_HOOK_HELP

NAME = "convert"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and its options."""
    v = sub.add_parser(NAME, help="sparsify/SAeUron, SAELens or SDLens/sdxl-unbox folder -> native .safetensors")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--hook-point", default=None, help=IMPORT_HOOK_HELP)


def run(a: argparse.Namespace) -> int:
    """Write the native file."""
    from saeuron_core.sae.files import convert

    out = convert(a.src, a.dst, hook_point=a.hook_point)
    print(f"wrote {out}")
    return 0
