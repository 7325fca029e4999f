"""``saeuron inspect``: show which SAE features fire and where a concept is while a prompt generates."""

from __future__ import annotations

import argparse

from .common import OWN_HOOK_HELP, add_generation_args, add_model_args, check_concepts, load_model, png_out

NAME = "inspect"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect`` and its options."""
    n = sub.add_parser(NAME, help="show which SAE features fire and where a concept is while generating a prompt")
    add_model_args(n)
    n.add_argument("--sae", required=True)
    n.add_argument("--prompt", required=True)
    n.add_argument("--concept", action="append", default=[], help="concept to map (repeatable; the overlay shows the first)")
    add_generation_args(n)
    n.add_argument("--top", type=int, default=10, help="features listed per step")
    n.add_argument("--hook-point", default=None, help=OWN_HOOK_HELP)
    n.add_argument("--out", required=True, help="output .png: the image with the first concept's heat map")


def run(a: argparse.Namespace) -> int:
    """Print the features of each step and write the image with the first concept's heat map."""
    from saeuron_core.inspection import inspect
    from saeuron_core.sae.files import load_sae

    out = png_out(a.out)
    sae = load_sae(a.sae, device=a.device)
    check_concepts(sae, a.concept)
    pipe = load_model(a.model, device=a.device, config=a.config)
    result = inspect(pipe, sae, a.prompt, concepts=a.concept, steps=a.steps, guidance_scale=a.guidance, seed=a.seed,
                     scheduler=a.scheduler, hook_point=a.hook_point, top=a.top, height=a.height, width=a.width)
    concept = a.concept[0] if a.concept else None
    result.save_overlay(out, concept)
    print(result.summary())
    what = f"heat map of {concept!r}" if concept else "image (no concept given)"
    print(f"wrote {what} -> {out}")
    return 0
