"""``saeuron make-tiny-pipeline``: write a random tiny SD-layout diffusers pipeline (for tries and tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "make-tiny-pipeline"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``make-tiny-pipeline`` and its options."""
    m = sub.add_parser(NAME, help="write a random tiny SD-layout diffusers pipeline (for tries and tests)")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)


def run(a: argparse.Namespace) -> int:
    """Save the pipeline folder."""
    from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline

    out = Path(a.out)
    make_tiny_pipeline(a.seed).save_pretrained(str(out), safe_serialization=True)
    print(f"wrote a random tiny pipeline to {out}")
    return 0
