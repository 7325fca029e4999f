"""``saeuron remove-concept``: remove a concept from an SAE file's library."""

from __future__ import annotations

import argparse

from .common import concept_output

NAME = "remove-concept"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``remove-concept`` and its options."""
    rc = sub.add_parser(NAME, help="remove a concept from an SAE file")
    rc.add_argument("sae")
    rc.add_argument("--concept", required=True)
    rc.add_argument("--out", default=None, help="output .safetensors SAE file (default: update SAE in place)")


def run(a: argparse.Namespace) -> int:
    """Write the SAE without the concept (to ``--out``, or in place)."""
    from saeuron_core.sae.files import load_sae, save_sae
    from saeuron_core.sae.library import concept_names, remove_concept

    out = concept_output(a.sae, a.out)
    sae = load_sae(a.sae)
    remove_concept(sae, a.concept)
    save_sae(sae, out)
    print(f"removed concept {a.concept!r}; remaining: {', '.join(concept_names(sae)) or '(none)'} -> {out}")
    return 0
