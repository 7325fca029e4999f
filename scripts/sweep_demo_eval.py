"""Choose the erasure settings of the evaluation on validation seeds (never the evaluation's own).

Runs feature ablation at several strengths and detect-and-replace with several replacement
sources and mask dilations on a few objects and styles, and prints UA / IRA / CRA and the artifact
measures for each setting (averaged over the concepts of each kind) as a Markdown table.

With ``--per-concept-out FILE`` it also picks, for every concept, the ablation strength with the best
mean of UA, IRA and CRA (SAeUron picks a multiplier per object class on validation prompts the same
way) and writes them as JSON ``{concept: strength}``, the file ``saeuron eval --ablate-strengths``
and the demo read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from saeuron_cli import add_gate_args, gate_args, parse_seeds
from saeuron_demo.assets import EVALUATION_SEEDS, VALIDATION_SEEDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "demo_assets")

DOWN, MID, UP0 = "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0"
# name -> (label, method, replace options, {later block: detecting block}, oracle blocks)
DIAGNOSIS_VARIANTS = {
    "ablate": ("ablate (shipped strengths)", "ablate", {}, {}, ()),
    "sample": ("replace, sample (the old default)", "replace", {"source": "sample", "dilation": 0}, {}, ()),
    "dilate": ("replace, sample, dilation 1", "replace", {"source": "sample", "dilation": 1}, {}, ()),
    "nearest5": ("replace, mean of the 5 nearest", "replace", {"source": "nearest", "neighbors": 5, "dilation": 0},
                 {}, ()),
    "uncond": ("replace, uncond", "replace", {"source": "uncond", "dilation": 0}, {}, ()),
    "early": ("replace, sample, first half of the steps", "replace", {"source": "sample", "dilation": 0, "end": 0.5},
              {}, ()),
    "uncond-follow": ("replace, uncond, + up_blocks.1.attentions.0", "replace", {"source": "uncond", "dilation": 0},
                      {UP0: DOWN}, ()),
    "uncond-dilate-follow": ("replace, uncond, dilation 1, + up_blocks.1.attentions.0", "replace",
                             {"source": "uncond", "dilation": 1}, {UP0: DOWN}, ()),
    "oracle": ("every token -> uncond: down.2.1 + mid", "oracle", {}, {}, (DOWN, MID)),
    "oracle-up": ("every token -> uncond: down.2.1 + mid + up.1.0", "oracle", {}, {}, (DOWN, MID, UP0)),
}


def diagnose(a: argparse.Namespace) -> None:
    from saeuron_demo.assets import ALL_CONCEPTS_SAE, OBJECT_MID_SAE, OBJECT_SAE, concept_strengths
    from saeuron_demo.classifier import load_classifier
    from saeuron_demo.pipeline import load_demo_pipeline
    from saeuron_core.sae.files import load_sae

    from saeuron_demo.evaluation.diagnostics import Variant, format_diagnosis, run_diagnosis

    names = [n.strip() for n in a.diagnose_replace.split(",") if n.strip()]
    unknown = [n for n in names if n not in DIAGNOSIS_VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(DIAGNOSIS_VARIANTS)}")
    variants = [Variant("clean", "none")]
    for n in names:
        label, method, options, follow, oracle = DIAGNOSIS_VARIANTS[n]
        variants.append(Variant(label, method, options, follow, oracle))
    saes = {DOWN: load_sae(os.path.join(ASSETS, OBJECT_SAE)), MID: load_sae(os.path.join(ASSETS, OBJECT_MID_SAE))}
    results = run_diagnosis(load_demo_pipeline(a.model), load_classifier(a.classifier), saes,
                            load_sae(os.path.join(ASSETS, ALL_CONCEPTS_SAE)), variants, a.seeds, concept_strengths(),
                            steps=a.steps)
    print(format_diagnosis(results))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ASSETS, "model"))
    p.add_argument("--sae", action="append", default=None,
                   help="repeatable: SAEs on different blocks, each erases the concepts it has (default: the shipped)")
    p.add_argument("--classifier", default=os.path.join(ASSETS, "classifier"))
    p.add_argument("--concepts", default="star,heart,stripes,noise")
    p.add_argument("--seeds", type=parse_seeds, default=[500], help="'500,501' or '500-503'")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strengths", default="1,3,10,30")
    p.add_argument("--end", type=float, default=1.0, help="erase only until this fraction of the denoising")
    add_gate_args(p)
    p.add_argument("--replace", default="sample:0,sample:1,uncond:0",
                   help="SOURCE:DILATION[:THRESHOLD_SCALE] settings ('' for none)")
    p.add_argument("--replace-also-at", action="append", default=[], metavar="HOOK_POINT=BLOCK[,BLOCK]",
                   help="replace: also replace what the SAE at HOOK_POINT detects at these later blocks (repeatable)")
    p.add_argument("--neighbors", type=int, default=1, help="replace source nearest: average this many patches")
    p.add_argument("--diagnose-replace", default=None, metavar="VARIANTS",
                   help="instead of the sweep: why replace erases few objects, per block and step, for these "
                        "variants (comma-separated, after a clean run: " + ", ".join(DIAGNOSIS_VARIANTS) + "); "
                        "each prompt with its own object erased, one generation per variant")
    p.add_argument("--per-concept-out", default=None,
                   help="write the best ablation strength of each concept (JSON) and print the per-concept table")
    p.add_argument("--min-retained-confidence", type=float, default=0.0,
                   help="with --per-concept-out: only pick strengths at which the classifier's confidence in the "
                        "retained label stays at least this high (0-1; 0: the best mean of UA, IRA and CRA)")
    p.add_argument("--merge", action="store_true",
                   help="keep the concepts of an existing --per-concept-out file that this sweep does not run")
    a = p.parse_args()
    tuned_on = sorted(set(a.seeds) & set(EVALUATION_SEEDS))
    if tuned_on:
        first, last = VALIDATION_SEEDS.start, VALIDATION_SEEDS.stop - 1
        p.error(f"seeds {tuned_on} are evaluation seeds ({EVALUATION_SEEDS.start}-{EVALUATION_SEEDS.stop - 1}); "
                f"settings are chosen on validation seeds only (e.g. {first}-{last})")
    return a


def main() -> None:
    a = parse_args()
    if a.diagnose_replace:
        return diagnose(a)
    from saeuron_demo.classifier import load_classifier
    from saeuron_demo.evaluation import (METRIC_KEYS, EvalSettings, Evaluator, best_strengths,
                                              load_concept_strengths, mean_metrics)
    from saeuron_demo.pipeline import load_demo_pipeline
    from saeuron_core.erasure.options import EraseOptions
    from saeuron_core.sae.files import load_sae

    t0 = time.time()
    coverage_of, detect_with = gate_args(a)
    from saeuron_cli import replace_also_at_arg as _replace_also_at

    base = EvalSettings(seeds=a.seeds, steps=a.steps, end=a.end, min_coverage=a.min_coverage,
                        min_coverage_of=coverage_of, detect_with=detect_with,
                        replace=EraseOptions(method="replace", neighbors=a.neighbors),
                        replace_also_at=_replace_also_at(a.replace_also_at, False))
    from saeuron_demo.assets import SAES

    saes = [load_sae(p) for p in (a.sae or [os.path.join(ASSETS, name) for name in SAES])]
    ev = Evaluator(load_demo_pipeline(a.model), saes, load_classifier(a.classifier), base)
    concepts = [c.strip() for c in a.concepts.split(",")]
    clean = ev.run("none")
    variants = [("ablate", f"strength {s}", {"ablate_strength": float(s)}) for s in a.strengths.split(",") if s.strip()]
    for item in filter(None, a.replace.split(",")):
        parts = item.split(":")
        source, dilation, scale = parts[0], (parts[1:2] or ["0"])[0], (parts[2:3] or ["1"])[0]
        variants.append(("replace", f"source {source}, dilation {dilation}, threshold x{scale}",
                         {"replace": dataclasses.replace(base.replace, source=source, dilation=int(dilation),
                                                         threshold_scale=float(scale))}))
    print(f"validation seeds {base.seeds}, {base.steps} DDIM steps, concepts {', '.join(concepts)}, "
          f"erasing until {base.end:g} of the denoising")
    print("\n| method | setting | kind | UA | IRA | CRA | retained conf. | act. shift |")
    print("|---|---|---|---|---|---|---|---|")
    by_strength: dict[float, list[dict]] = {}
    for method, label, change in variants:
        ev.settings = dataclasses.replace(base, **change)
        rows = ev.per_concept(method, concepts, clean)
        if method == "ablate":
            by_strength[change["ablate_strength"]] = rows
        for kind in sorted({r["kind"] for r in rows}, reverse=True):
            m = mean_metrics([r for r in rows if r["kind"] == kind], METRIC_KEYS)
            print(f"| {method} | {label} | {kind} | {100 * m['UA']:.1f} | {100 * m['IRA']:.1f} | {100 * m['CRA']:.1f} | "
                  f"{100 * m['retained_confidence']:.1f} | {m['activation_shift']:.2f} |", flush=True)
    if a.per_concept_out:
        chosen = best_strengths(by_strength, a.min_retained_confidence)
        print("\n| concept | kind | " + " | ".join(f"ablate {s:g}: UA / IRA / CRA / retained conf." for s in by_strength)
              + " | chosen |")
        print("|---|---|" + "---|" * len(by_strength) + "---|")
        for i, c in enumerate(concepts):
            cells = [" / ".join(f"{100 * rows[i][k]:.1f}" for k in ("UA", "IRA", "CRA", "retained_confidence"))
                     for rows in by_strength.values()]
            print(f"| {c} | {ev.grid.kind_of(c)[0]} | " + " | ".join(cells) + f" | {chosen[c]:g} |")
        if a.merge and os.path.exists(a.per_concept_out):
            chosen = {**load_concept_strengths(a.per_concept_out), **chosen}
        with open(a.per_concept_out, "w") as f:
            json.dump(chosen, f, indent=1)
            f.write("\n")
        print(f"wrote {a.per_concept_out}")
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
