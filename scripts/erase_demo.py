"""The main demo: erase one style and one object from the shipped demo model with both methods.

Each concept is erased by every shipped SAE whose library has it (each SAE hooks a block where its
kind of concept enters the UNet), at the ablation strengths the evaluation chose.

Writes a grid PNG: one row per prompt; columns are the original generation, the style erased by
feature ablation and by detect-and-replace, and the object erased by both. Every image uses the
same seed per row, so each column differs from the first only by the erasure. Each cell is labelled
with what the shipped classifier reads off it (object / style).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from saeuron_demo import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(assets.ASSETS / "model"))
    p.add_argument("--sae", action="append", default=None,
                   help="repeatable: SAEs on different blocks, each erases the concepts its library has "
                        "(default: the shipped ones, as the evaluation uses them)")
    p.add_argument("--classifier", default=str(assets.ASSETS / "classifier"))
    p.add_argument("--style", default="stripes")
    p.add_argument("--object", default="star")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: four demo prompts)")
    p.add_argument("--ablate-strength", type=float, default=None,
                   help="gamma = -strength (default: the evaluation's choice for each concept)")
    p.add_argument("--replace-strength", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--scale", type=int, default=8, help="pixel upscaling of the 32 px images in the grid")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "demo", "erase-grid.png"))
    return p.parse_args()


def main() -> None:
    a = parse_args()
    from PIL import Image

    from saeuron_demo.classifier import load_classifier, predict
    from saeuron_demo.dataset import OBJECTS, STYLES
    from saeuron_demo.evaluation import EvalSettings, concept_owners
    from saeuron_demo.pipeline import load_demo_pipeline
    from saeuron_core.inspection import compare_erasure, image_grid, save_png
    from saeuron_core.sae.files import load_sae

    t0 = time.time()
    loaded = [load_sae(p) for p in (a.sae or [str(assets.ASSETS / name) for name in assets.SAES])]
    owners = concept_owners(loaded)
    saes = {c: [loaded[i] for i in owners.get(c, [])] for c in (a.style, a.object)}
    for c, found in saes.items():
        if not found:
            raise SystemExit(f"no SAE's concept library has {c!r}; they have: {', '.join(sorted(owners))}")
    pipe = load_demo_pipeline(a.model)
    clf = load_classifier(a.classifier)
    # Each concept's own strength where the validation sweep chose one, else that of its first SAE's block.
    at, of = assets.shipped_strengths()
    coverage, detectors = assets.shipped_gates() if not a.sae else ({}, {})
    shipped = EvalSettings(ablate_strength_at=at, ablate_strength_of=of, min_coverage_of=coverage, detect_with=detectors)
    ablate = {c: a.ablate_strength if a.ablate_strength is not None else shipped.strength_for(c, s[0].config.hook_point)
              for c, s in saes.items()}
    prompts = a.prompt or [f"a {a.object} in {a.style} style", f"a circle in {a.style} style",
                           f"a {a.object} in polka dots style", "a heart in solid style"]
    columns = [("original", None, None, 0.0)]
    for concept in (a.style, a.object):
        columns += [(f"-{concept} ablate", concept, "ablate", ablate[concept]),
                    (f"-{concept} replace", concept, "replace", a.replace_strength)]
    cells: list[list[Image.Image]] = [[] for _ in prompts]
    for title, concept, method, strength in columns[1:]:
        pairs = compare_erasure(pipe, saes[concept], concept, prompts, method=method, strength=strength, seed=a.seed,
                                steps=a.steps, guidance_scale=a.guidance, scheduler="ddim", batch_size=len(prompts),
                                **shipped.gate_options([concept]))
        for row, (before, after) in enumerate(pairs):
            if not cells[row]:
                cells[row].append(before)
            cells[row].append(after)
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for row in cells for im in row])
    objs, stys = predict(clf, images)
    labels, k = [], 0
    for row in cells:
        row_labels = []
        for c, _ in enumerate(row):
            read = f"{OBJECTS[int(objs[k])]}/{STYLES[int(stys[k])]}"
            row_labels.append(f"{columns[c][0]}: {read}")
            k += 1
        labels.append(row_labels)
    big = [[im.resize((im.width * a.scale, im.height * a.scale), Image.NEAREST) for im in row] for row in cells]
    grid = image_grid(big, labels=labels)
    save_png(grid, a.out)
    print(f"rows: {'; '.join(prompts)}")
    blocks = ", ".join(f"{c} at {' + '.join(s.config.hook_point for s in saes[c])} (ablate strength {ablate[c]:g})"
                       for c in saes)
    print("columns: " + " | ".join(c[0] for c in columns) + f"; {blocks}, replace strength "
          f"{a.replace_strength:g}, seed {a.seed}, {a.steps} DDIM steps")
    for p, row in zip(prompts, labels):
        print(f"  {p}: " + " | ".join(x.split(': ')[1] for x in row))
    print(f"wrote {a.out} ({grid.width}x{grid.height} px) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
