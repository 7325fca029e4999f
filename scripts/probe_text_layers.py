"""Which cross-attention layer of the demo UNet puts the object and which the style into the image.

For every cross-attention layer (``attn2``), generate the whole 8 x 8 grid twice: once with only that
layer's conditional rows seeing the unconditional (empty) prompt ("blank only"), once with every *other*
layer blanked ("keep only"), and print what share of objects and styles the shipped classifier still
reads. A kind of concept is best erased at the block where it enters: that is how the demo's object
and style SAEs were placed (EVALUATION.md).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Iterable


def parse_args() -> argparse.Namespace:
    from saeuron_demo.assets import ASSETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ASSETS / "model"))
    p.add_argument("--classifier", default=str(ASSETS / "classifier"))
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--by-concept", action="store_true",
                   help="also print, per layer, the share of each object's and each style's images still read")
    p.add_argument("--blank-sets", type=int, default=0, metavar="N",
                   help="instead: blank every set of up to N layers at once and print, for each of --styles, the "
                        "share of its images still read (where a style that no single layer carries enters)")
    p.add_argument("--styles", default="outline,gradient,noise,solid", help="styles for --blank-sets")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    import torch

    from saeuron_demo.classifier import load_classifier, predict
    from saeuron_demo.dataset import OBJECTS, STYLES, from_model_range
    from saeuron_demo.evaluation import demo_grid
    from saeuron_core.hosts.diffusers import generate
    from saeuron_demo.pipeline import load_demo_pipeline

    pipe, clf, grid = load_demo_pipeline(a.model), load_classifier(a.classifier), demo_grid()
    layers = [n.removesuffix(".transformer_blocks.0.attn2") for n, _ in pipe.unet.named_modules()
              if n.endswith("attn2")]
    blank: set[str] = set()

    def pre_hook(layer: str):
        def hook(module, args, kwargs):
            if layer not in blank:
                return None
            ctx = kwargs["encoder_hidden_states"]
            half = ctx.shape[0] // 2  # diffusers order: [uncond, cond]
            return args, {**kwargs, "encoder_hidden_states": torch.cat([ctx[:half], ctx[:half]])}
        return hook

    for layer in layers:
        pipe.unet.get_submodule(f"{layer}.transformer_blocks.0.attn2").register_forward_pre_hook(
            pre_hook(layer), with_kwargs=True)

    per_concept: list[tuple[str, list[float]]] = []

    def correct(blanked: Iterable[str], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether the classifier reads the object and the style of each of the grid's prompts ``rows``."""
        blank.clear()
        blank.update(blanked)
        with torch.no_grad():
            out = generate(pipe, [grid.prompts[i] for i in rows], [a.seed] * len(rows), steps=a.steps,
                           guidance_scale=3.0, output_type="latent")
        objs, stys = predict(clf, from_model_range(out.images.float()))
        return (objs == grid.objects[rows]).float(), (stys == grid.styles[rows]).float()

    def read(blanked: list[str], label: str) -> str:
        ok_obj, ok_sty = correct(blanked, torch.arange(len(grid.prompts)))
        per_concept.append((label, [100 * ok_obj[grid.objects == i].mean().item() for i in range(len(OBJECTS))]
                            + [100 * ok_sty[grid.styles == i].mean().item() for i in range(len(STYLES))]))
        return f"{100 * ok_obj.mean():.1f} | {100 * ok_sty.mean():.1f}"

    if a.blank_sets:
        ids = [STYLES.index(s.strip()) for s in a.styles.split(",")]
        rows = torch.cat([torch.nonzero(grid.styles == i).flatten() for i in ids])
        print(f"seed {a.seed}, {a.steps} DDIM steps, CFG 3; share of each style's 8 images still read\n")
        print("| layers blanked | " + " | ".join(STYLES[i] for i in ids) + " | objects |\n|---|"
              + "---|" * (len(ids) + 1))
        for n in range(a.blank_sets + 1):
            for blanked in itertools.combinations(layers, n):
                ok_obj, ok_sty = correct(blanked, rows)
                cells = [f"{100 * ok_sty[grid.styles[rows] == i].mean():.0f}" for i in ids]
                print(f"| {', '.join(blanked) or '(none)'} | " + " | ".join(cells) + f" | {100 * ok_obj.mean():.0f} |",
                      flush=True)
        return

    print(f"seed {a.seed}, {a.steps} DDIM steps, CFG 3; classifier accuracy on the 64 prompts\n")
    print("| layer | blank only: object | style | keep only: object | style |\n|---|---|---|---|---|")
    print(f"| (none blanked) | {read([], 'none blanked')} | | |")
    for layer in layers:
        print(f"| {layer} | {read([layer], f'{layer}, blank only')} | "
              f"{read([n for n in layers if n != layer], f'{layer}, keep only')} |", flush=True)
    if a.by_concept:
        print("\nShare of each concept's 8 images still read (its own head)\n")
        print("| run | " + " | ".join(OBJECTS + STYLES) + " |\n|---|" + "---|" * (len(OBJECTS) + len(STYLES)))
        for label, row in per_concept:
            print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
