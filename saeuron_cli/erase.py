"""``saeuron erase``: generate prompts without and with concepts erased and write a before/after grid.

How it erases are the :class:`~saeuron_core.erasure.options.EraseOptions` fields whose metadata says ``cli``, help
included.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Optional

from .common import (OWN_HOOK_HELP, add_generation_args, add_model_args, check_concepts, detect_with_arg, load_model,
                     png_out)
from .fields import Fields

if TYPE_CHECKING:
    from saeuron_core.erasure.options import EraseOptions

NAME = "erase"
#: one share for every concept here (EraseOptions' own help also tells of a mapping, which the CLI has not)
HELP = {"min_coverage": "touch a concept only in images where its features fire on at least this share (0-1) of the "
                        "feature map (0: wherever they fire)"}


def erase_fields(cls: Optional[type[EraseOptions]] = None) -> Fields[EraseOptions]:
    """erase's options: the fields of :class:`EraseOptions` (or ``cls``) whose metadata says ``cli``
    (``--detect-with`` is read apart: see :func:`detect_with_arg`)."""
    from saeuron_core.erasure.options import EraseOptions

    cls = cls or EraseOptions
    return Fields(cls, tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cli")), help=HELP)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``erase`` and its options."""
    e = sub.add_parser(NAME, help="generate prompts without and with concepts erased; write a before/after grid")
    add_model_args(e)
    e.add_argument("--sae", required=True, help="SAE file or folder with the concepts")
    e.add_argument("--concept", action="append", required=True, help="concept to erase (repeatable)")
    erase_fields().add_to(e)
    e.add_argument("--detect-with", action="append", default=[], metavar="CONCEPT=ENTRY",
                   help="with --min-coverage: the library entry whose features read CONCEPT's coverage (repeatable)")
    e.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one grid row each)")
    add_generation_args(e)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--hook-point", default=None, help=OWN_HOOK_HELP)
    e.add_argument("--out", required=True, help="output .png grid (row per prompt: before | after)")


def run(a: argparse.Namespace) -> int:
    """Write the grid: one row per prompt, the image before and after erasing."""
    from saeuron_core.inspection import compare_erasure, erasure_grid, save_png
    from saeuron_core.sae.files import load_sae

    out = png_out(a.out)
    sae = load_sae(a.sae, device=a.device)
    # Bad options and unknown concepts fail before the model loads.
    detect_with = detect_with_arg(a)
    options = erase_fields().build(a, detect_with=detect_with)
    check_concepts(sae, [*a.concept, *detect_with.values()])
    pipe = load_model(a.model, device=a.device, config=a.config)
    pairs = compare_erasure(pipe, sae, a.concept, a.prompt, options=options, seed=a.seed, steps=a.steps,
                            guidance_scale=a.guidance, scheduler=a.scheduler, height=a.height, width=a.width,
                            batch_size=a.batch_size, hook_point=a.hook_point)
    grid = erasure_grid(pairs, a.prompt)
    save_png(grid, out)
    print(f"wrote {len(pairs)} before/after pairs ({grid.width}x{grid.height} px, erased: {', '.join(a.concept)}, "
          f"{options.method} strength {options.strength:g}) -> {out}")
    return 0
