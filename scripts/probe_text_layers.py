"""Which cross-attention layer of the demo UNet puts the object and which the style into the image.

For every cross-attention layer (``attn2``), generate the whole 8 x 8 grid twice: once with only that
layer's conditional rows seeing the unconditional (empty) prompt ("blank only"), once with every *other*
layer blanked ("keep only"), and print what share of objects and styles the shipped classifier still
reads. A kind of concept is best erased at the block where it enters: that is how the demo's object
and style SAEs were placed (EVALUATION.md).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    from saeuron_core.demo.assets import ASSETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ASSETS / "model"))
    p.add_argument("--classifier", default=str(ASSETS / "classifier"))
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    import torch

    from saeuron_core.demo.classifier import load_classifier, predict
    from saeuron_core.demo.dataset import from_model_range
    from saeuron_core.evaluation import demo_grid
    from saeuron_core.pipelines import generate, load_pipeline

    pipe, clf, grid = load_pipeline(a.model), load_classifier(a.classifier), demo_grid()
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

    def read(blanked: list[str]) -> str:
        blank.clear()
        blank.update(blanked)
        with torch.no_grad():
            out = generate(pipe, grid.prompts, [a.seed] * len(grid.prompts), steps=a.steps, guidance_scale=3.0,
                           output_type="latent")
        objs, stys = predict(clf, from_model_range(out.images.float()))
        return (f"{100 * (objs == grid.objects).float().mean():.1f} | "
                f"{100 * (stys == grid.styles).float().mean():.1f}")

    print(f"seed {a.seed}, {a.steps} DDIM steps, CFG 3; classifier accuracy on the 64 prompts\n")
    print("| layer | blank only: object | style | keep only: object | style |\n|---|---|---|---|---|")
    print(f"| (none blanked) | {read([])} | | |")
    for layer in layers:
        print(f"| {layer} | {read([layer])} | {read([n for n in layers if n != layer])} |", flush=True)


if __name__ == "__main__":
    main()
