"""Small CNN that reads object and style off 32x32 demo images (to score diffusion samples).

Trained with augmentations that imitate diffusion samples (noise, blur, colour shifts, small
translations): a classifier trained on crisp generator images alone under-reads soft, slightly
noisy samples.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .dataset import OBJECTS, STYLES

DEFAULT_CONFIG: dict[str, Any] = {"channels": [16, 32, 96, 128], "objects": OBJECTS, "styles": STYLES}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DemoClassifier(nn.Module):
    """Conv trunk (32 -> 16 -> 8 -> 4 px) with an object head and a style head."""

    def __init__(self, channels: list[int] | None = None, n_objects: int = len(OBJECTS), n_styles: int = len(STYLES)):
        super().__init__()
        c1, c2, c3, c4 = channels or DEFAULT_CONFIG["channels"]
        self.trunk = nn.Sequential(
            _block(3, c1), _block(c1, c1), nn.MaxPool2d(2),
            _block(c1, c2), _block(c2, c2), nn.MaxPool2d(2),
            _block(c2, c3), nn.MaxPool2d(2),
            _block(c3, c4),
        )
        self.object_head = nn.Linear(c4, n_objects)
        self.style_head = nn.Linear(c4, n_styles)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float images in [-1, 1], (B, 3, 32, 32) -> (object logits, style logits)."""
        h = self.trunk(x).mean(dim=(2, 3))
        return self.object_head(h), self.style_head(h)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Diffusion-sample-like corruptions of float images in [-1, 1]."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((b, *shape), generator=gen)

    # Small shifts (up to 2 px) with edge replication.
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    x = torch.stack([xp[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(b)])
    # Per-sample Gaussian blur, sigma 0..0.9 px (3x3 kernel), on about 60% of images.
    sigma = u(0.05, 0.9) * (torch.rand(b, generator=gen) < 0.6).float() + 1e-3
    r = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (b*3, 1, 3, 3)
    x = F.conv2d(F.pad(x.reshape(1, b * 3, 32, 32), (1, 1, 1, 1), mode="replicate"), k2, groups=b * 3).reshape(b, 3, 32, 32)
    # Colour jitter: brightness, contrast, per-channel gain, and desaturation (up to 70% towards grey
    # on half of the images): without it the style head reads "solid" off saturated colours and
    # calls a pale solid shape a gradient.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.6, 1.2, 1, 1, 1) + mean + u(-0.12, 0.12, 1, 1, 1)
    x = x * u(0.9, 1.1, 3, 1, 1)
    grey = x.mean(dim=1, keepdim=True)
    desat = u(0.0, 0.85, 1, 1, 1) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    x = x + (grey - x) * desat
    # Faint shading across the image (at most +-0.1; the gradient style's ramps are several times
    # larger): samples of flat shapes are rarely perfectly flat.
    theta = u(0.0, 2 * math.pi)
    ramp = torch.linspace(-1, 1, 32)
    shade = torch.cos(theta)[:, None, None] * ramp[None, None, :] + torch.sin(theta)[:, None, None] * ramp[None, :, None]
    amp = u(0.0, 0.1) * (torch.rand(b, generator=gen) < 0.5).float()
    x = x + (amp[:, None, None] * shade)[:, None]
    # Gaussian noise: samples of the demo model keep visible high-frequency noise, often on the
    # background, so most images get sigma up to 0.35 in [-1, 1] units, the rest up to 0.1.
    heavy = (torch.rand(b, 1, 1, 1, generator=gen) < 0.7).float()
    sigma_n = heavy * u(0.0, 0.35, 1, 1, 1) + (1 - heavy) * u(0.0, 0.1, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * sigma_n
    return x.clamp(-1, 1)


def save_classifier(model: DemoClassifier, folder: str, config: dict[str, Any]) -> None:
    """classifier.safetensors + config.json into folder."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(folder, "classifier.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def load_classifier(folder: str) -> DemoClassifier:
    """Load a classifier saved by save_classifier (eval mode)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    model = DemoClassifier(cfg["channels"], len(cfg["objects"]), len(cfg["styles"]))
    model.load_state_dict(load_file(os.path.join(folder, "classifier.safetensors")))
    return model.eval()


@torch.no_grad()
def predict_proba(model: DemoClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) images -> (object probabilities, style probabilities)."""
    objs, stys = [], []
    model.eval()
    for i in range(0, len(images), batch_size):
        lo, ls = model(images[i : i + batch_size].float() / 127.5 - 1)
        objs.append(lo.softmax(1))
        stys.append(ls.softmax(1))
    return torch.cat(objs), torch.cat(stys)


def predict(model: DemoClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) images -> (object ids, style ids)."""
    po, ps = predict_proba(model, images, batch_size)
    return po.argmax(1), ps.argmax(1)
