"""``saeuron info``: describe an SAE file or folder (its shape, hook point, training and concept library)."""

from __future__ import annotations

import argparse
import json

from .common import IMPORT_HOOK_HELP

NAME = "info"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``info`` and its options."""
    i = sub.add_parser(NAME, help="describe an SAE file or folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--hook-point", default=None, help=IMPORT_HOOK_HELP)


def run(a: argparse.Namespace) -> int:
    """Print the description, as text or ``--json``."""
    from saeuron_core.sae.files import describe

    info = describe(a.path, hook_point=a.hook_point)
    details: dict[str, str] = {}
    if info["concepts"]:
        from saeuron_core.inspection import describe_concept, format_concept
        from saeuron_core.sae.files import load_sae
        from saeuron_core.sae.library import get_concept

        sae = load_sae(a.path, hook_point=a.hook_point)
        info["concept_details"] = {}
        for name in info["concepts"]:  # every entry was validated when the file was read
            data = get_concept(sae, name)
            info["concept_details"][name] = describe_concept(data)
            details[name] = format_concept(name, data)
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}\n  format:      {info['format']}\n  d_in:        {info['d_in']}\n"
          f"  n_latents:   {info['n_latents']}\n  k:           {info['k']}\n  dtype:       {info['dtype']}\n"
          f"  hook point:  {info['hook_point'] or '(unknown)'}"
          f"{' (reads its residual update: output - input)' if info.get('residual') else ''}\n  model:       {info['model_family'] or '(unknown)'}\n"
          f"  concepts:    {', '.join(info['concepts']) or '(none)'}")
    for name in info["concepts"]:
        print(f"    {details[name]}")
    final = info["training"].get("final") if isinstance(info["training"], dict) else None
    if final:
        print(f"  training:    {info['training'].get('steps')} steps, FVU {final.get('fvu', float('nan')):.4f}, "
              f"dead {final.get('dead_frac', 0):.3f}")
    return 0
