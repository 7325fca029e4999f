"""Build the demo SAE and its concept library on the demo model with the project's own CLI.

1. ``saeuron collect``: the hooked block's output for every object x style prompt over every
   denoising step (both CFG halves), several seeds;
2. ``saeuron train``: a TopK SAE on those activations;
3. ``saeuron learn-concept --library``: one concept per object and per style, scored from one
   generation pass on seeds disjoint from the evaluation's.

Writes ``<out>/sae.safetensors``; activations and checkpoints go to ``--work`` (not shipped).
Every step resumes if interrupted. ``--relearn CONCEPT`` skips 1 and 2 and learns that library
concept again in ``--out`` (in place, the same prompts and seeds), e.g. with another ``--top-n``;
with ``--name-suffix ' (detector)'`` it is stored beside the original under that name instead
(a detector entry for the erasers' ``detect_with``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from saeuron_demo.dataset import OBJECTS, STYLES, all_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "demo_assets", "model"))
    p.add_argument("--out", default=os.path.join(ROOT, "demo_assets", "sae.safetensors"))
    p.add_argument("--work", default=os.path.join(ROOT, "out", "demo-sae"))
    p.add_argument("--hook-point", default="up_blocks.1.attentions.1")
    p.add_argument("--collect-seeds", default="0-5")
    p.add_argument("--collect-steps", type=int, default=25)
    p.add_argument("--expansion-factor", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--learn-seeds", default="100-103")
    p.add_argument("--learn-steps", type=int, default=25)
    p.add_argument("--top-n", type=int, default=3)
    p.add_argument("--min-specificity", type=float, default=None, help="default: the library's")
    p.add_argument("--peak-specificity", type=float, default=None,
                   help="also that specific against the negative prompt where a feature is most active")
    p.add_argument("--kinds", choices=["all", "object", "style"], default="all",
                   help="which concepts the library gets (an SAE on an object block learns only objects)")
    p.add_argument("--relearn", action="append", default=None, metavar="CONCEPT",
                   help="repeatable: only learn this concept of the library again, in --out in place (no collect or "
                        "train), with this run's --top-n and specificity")
    p.add_argument("--name-suffix", default="",
                   help="with --relearn: store each relearned concept as NAME+SUFFIX (e.g. ' (detector)'), keeping "
                        "the original entry")
    return p.parse_args()


def library(kinds: str = "all") -> dict[str, dict[str, list[str]]]:
    """One concept per object and per style (or of one kind): its 8 prompts against the 56 others."""
    pairs = all_prompts()
    spec = {}
    for kind, names, col in (("object", OBJECTS, 0), ("style", STYLES, 1)):
        if kinds not in ("all", kind):
            continue
        for i, name in enumerate(names):
            spec[name] = {"positive": [p[2] for p in pairs if p[col] == i],
                          "negative": [p[2] for p in pairs if p[col] != i]}
    return spec


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", "saeuron_cli", *args]
    print("+ saeuron " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def learn_args(a: argparse.Namespace) -> list[str]:
    """The scoring settings every ``learn-concept`` call of this script shares."""
    return ["--model", a.model, "--steps", str(a.learn_steps), "--guidance", "3.0", "--scheduler", "ddim",
            "--seeds", a.learn_seeds, "--batch-size", "64", "--top-n", str(a.top_n),
            *(["--min-specificity", str(a.min_specificity)] if a.min_specificity is not None else []),
            *(["--peak-specificity", str(a.peak_specificity)] if a.peak_specificity is not None else [])]


def relearn(a: argparse.Namespace) -> None:
    """Learn the ``--relearn`` concepts again into ``--out`` from the prompts the library gives them, all from
    one generation pass."""
    spec = library()
    unknown = [name for name in a.relearn if name not in spec]
    if unknown:
        raise SystemExit(f"--relearn {unknown[0]!r}: not a demo concept (one of {', '.join(spec)})")
    lib = os.path.join(a.work, "relearn-library.json")
    with open(lib, "w") as f:
        json.dump({name + a.name_suffix: spec[name] for name in dict.fromkeys(a.relearn)}, f, indent=1)
    run("learn-concept", a.out, "--library", lib, *learn_args(a))
    run("info", a.out)


def main() -> None:
    a = parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.relearn:
        return relearn(a)
    prompts = os.path.join(a.work, "prompts.json")
    with open(prompts, "w") as f:
        json.dump([p for _, _, p in all_prompts()], f)
    lib = os.path.join(a.work, "library.json")
    with open(lib, "w") as f:
        json.dump(library(a.kinds), f, indent=1)
    store = os.path.join(a.work, "activations")
    run("collect", "--model", a.model, "--prompts", prompts, "--out", store, "--hook-point", a.hook_point,
        "--model-family", "saeuron-demo", "--steps", str(a.collect_steps), "--guidance", "3.0", "--scheduler", "ddim",
        "--seeds", a.collect_seeds, "--halves", "both", "--batch-size", "64", "--rows-per-shard", "4096")
    trained = os.path.join(a.work, "sae-trained.safetensors")
    if not os.path.exists(trained):
        run("train", "--store", store, "--out", trained, "--expansion-factor", str(a.expansion_factor),
            "--k", str(a.k), "--batch-size", "4096", "--steps", str(a.train_steps), "--lr", "2e-3",
            "--checkpoint-every", "500", "--log-every", "250")
    run("learn-concept", trained, "--library", lib, "--out", a.out, *learn_args(a))
    run("info", a.out)


if __name__ == "__main__":
    main()
