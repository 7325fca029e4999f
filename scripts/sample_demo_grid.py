"""Sample one image per object x style from demo_assets/model and write an 8x8 grid PNG.

Rows are objects, columns styles (dataset order). If the classifier exists, reports how often it
reads the prompted object and style off the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import time


import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from saeuron_demo.dataset import OBJECTS, STYLES, all_prompts, make_grid
from saeuron_demo.model import sample
from saeuron_demo.textenc import load_tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo_assets/model")
    p.add_argument("--classifier", default="demo_assets/classifier")
    p.add_argument("--out", default=None, help="PNG path (default <model>/../samples/grid_step<N>.png)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), torch_dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=torch.float32).eval()
    tok = load_tokenizer(os.path.join(a.model, "tokenizer"))
    sched = DDIMScheduler.from_pretrained(os.path.join(a.model, "scheduler"), set_alpha_to_one=False)
    step = "?"
    info_path = os.path.join(a.model, "training.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            step = json.load(f).get("step", "?")

    pairs = all_prompts()
    t0 = time.time()
    imgs = sample(unet, te, tok, [p for _, _, p in pairs], steps=a.steps, guidance=a.guidance, seed=a.seed, scheduler=sched)
    assets = os.path.dirname(os.path.abspath(a.model))
    out = a.out or os.path.join(assets, "samples", f"grid_step{step}.png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    make_grid(imgs, len(STYLES), scale=4).save(out)
    print(f"model step {step}: sampled {len(imgs)} images in {time.time() - t0:.0f}s -> {out}")
    print("rows: " + ", ".join(OBJECTS) + " | columns: " + ", ".join(STYLES))

    if os.path.exists(os.path.join(a.classifier, "classifier.safetensors")):
        from saeuron_demo.classifier import load_classifier, predict

        clf = load_classifier(a.classifier)
        po, ps = predict(clf, imgs)
        objs = torch.tensor([o for o, _, _ in pairs])
        stys = torch.tensor([s for _, s, _ in pairs])
        ok_o, ok_s = po == objs, ps == stys
        print(f"classifier: object {ok_o.float().mean():.1%}, style {ok_s.float().mean():.1%}, both {(ok_o & ok_s).float().mean():.1%}")
        print("  per object: " + ", ".join(f"{n} {ok_o[objs == i].float().mean():.0%}" for i, n in enumerate(OBJECTS)))
        print("  per style:  " + ", ".join(f"{n} {ok_s[stys == i].float().mean():.0%}" for i, n in enumerate(STYLES)))
        with open(os.path.join(assets, "sample_log.txt"), "a") as f:
            f.write(
                f"step {step} seed {a.seed} steps {a.steps} cfg {a.guidance}: object {ok_o.float().mean():.3f} "
                f"style {ok_s.float().mean():.3f} both {(ok_o & ok_s).float().mean():.3f}\n"
            )


if __name__ == "__main__":
    main()
