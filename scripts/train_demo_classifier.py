"""Train the demo object/style classifier on augmented generator images; save to demo_assets/classifier/."""

from __future__ import annotations

import argparse
import math
import os
import time


import torch
import torch.nn.functional as F

from saeuron_demo.classifier import (
    DEFAULT_CONFIG,
    DemoClassifier,
    augment,
    predict,
    save_classifier,
)
from saeuron_demo.dataset import generate, to_model_range


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo_assets/classifier")
    p.add_argument("--n-train", type=int, default=24000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def accuracy(model: DemoClassifier, imgs: torch.Tensor, objs: torch.Tensor, stys: torch.Tensor) -> tuple[float, float]:
    """(object accuracy, style accuracy) on uint8 images."""
    po, ps = predict(model, imgs)
    return (po == objs).float().mean().item(), (ps == stys).float().mean().item()


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    # Training and test data come from disjoint seed ranges.
    parts = [generate(2000, 10_000 * a.seed + i) for i in range(math.ceil(a.n_train / 2000))]
    x_tr = torch.cat([p[0] for p in parts])[: a.n_train]
    o_tr = torch.cat([p[1] for p in parts])[: a.n_train]
    s_tr = torch.cat([p[2] for p in parts])[: a.n_train]
    x_te, o_te, s_te, _ = generate(a.n_test, 999_999 + a.seed)
    print(f"data {len(x_tr)} train / {len(x_te)} test in {time.time() - t0:.0f}s", flush=True)

    torch.manual_seed(a.seed)
    model = DemoClassifier(DEFAULT_CONFIG["channels"])
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    steps_per_epoch = len(x_tr) // a.batch
    total = steps_per_epoch * a.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(a.seed)
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        t1, tot = time.time(), 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch : (i + 1) * a.batch]
            x = augment(to_model_range(x_tr[idx]), gen)
            lo, ls = model(x)
            loss = F.cross_entropy(lo, o_tr[idx]) + F.cross_entropy(ls, s_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        model.eval()
        acc_o, acc_s = accuracy(model, x_te, o_te, s_te)
        print(
            f"epoch {epoch + 1} loss {tot / steps_per_epoch:.4f} clean test obj {acc_o:.4f} style {acc_s:.4f} "
            f"({time.time() - t1:.0f}s)",
            flush=True,
        )

    model.eval()
    acc_o, acc_s = accuracy(model, x_te, o_te, s_te)
    aug = torch.Generator().manual_seed(123)
    x_aug = torch.cat([augment(to_model_range(x_te[i : i + 500]), aug) for i in range(0, len(x_te), 500)])
    x_aug = ((x_aug + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    aug_o, aug_s = accuracy(model, x_aug, o_te, s_te)
    print(f"final clean obj {acc_o:.4f} style {acc_s:.4f}; augmented obj {aug_o:.4f} style {aug_s:.4f}", flush=True)
    save_classifier(
        model,
        a.out,
        {
            **DEFAULT_CONFIG,
            "input": "RGB 32x32, float in [-1, 1] (uint8 / 127.5 - 1)",
            "test_accuracy_clean": {"object": acc_o, "style": acc_s},
            "test_accuracy_augmented": {"object": aug_o, "style": aug_s},
            "train": {"n_train": len(x_tr), "epochs": a.epochs, "batch": a.batch, "lr": a.lr, "seed": a.seed},
        },
    )
    print(f"saved to {a.out} ({time.time() - t0:.0f}s total)", flush=True)


if __name__ == "__main__":
    main()
