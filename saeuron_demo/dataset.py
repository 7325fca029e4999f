"""Procedural mini-UnlearnCanvas: 8 objects x 8 styles, 32x32 RGB, deterministic for a seed.

Each image is drawn at 4x resolution (128x128) with numpy/PIL and box-downscaled, which
anti-aliases edges and keeps fine textures (stripes, dots, grid) readable at 32x32.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from saeuron_core.concepts.prompts import Vocabulary

OBJECTS: list[str] = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond"]
STYLES: list[str] = [
    "solid",
    "stripes",
    "polka dots",
    "checkerboard",
    "gradient",
    "noise",
    "outline",
    "grid",
]

IMAGE_SIZE = 32
SUPERSAMPLE = 4
_S = IMAGE_SIZE * SUPERSAMPLE  # canvas side while drawing

# Largest rotation (degrees) per object; kept small for shapes that would turn into other
# shapes when rotated (a square at 45 degrees is a diamond).
_MAX_ROT = {
    "circle": 0.0,
    "square": 12.0,
    "triangle": 15.0,
    "star": 36.0,
    "cross": 12.0,
    "heart": 15.0,
    "ring": 0.0,
    "diamond": 10.0,
}


def make_prompt(obj: str, style: str) -> str:
    """Prompt for one (object, style) pair, e.g. "a star in stripes style"."""
    article = "an" if obj[0] in "aeiou" else "a"
    return f"{article} {obj} in {style} style"


def all_prompts() -> list[tuple[int, int, str]]:
    """(object id, style id, prompt) for every pair, object-major order."""
    return [(o, s, make_prompt(OBJECTS[o], STYLES[s])) for o in range(len(OBJECTS)) for s in range(len(STYLES))]


# The demo's objects and styles in its own prompt form, for learning a concept from one word (no object starts with
# a vowel, so the template's article matches make_prompt's).
DEMO_VOCABULARY = Vocabulary(subjects=tuple(OBJECTS), styles=tuple(STYLES), template="a {subject} in {style} style",
                             plain="a {subject}")


# ---------------------------------------------------------------- shapes (unit coordinates)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _heart(n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _circle(r: float, n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


_CROSS_W = 0.36
# Polygons in unit coordinates (y down). Ring is an outer polygon with a hole.
_SHAPES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_circle(0.95), None),
    "square": (np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), None),
    "triangle": (np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]]), None),
    "star": (_star(), None),
    "cross": (
        np.array(
            [
                [-_CROSS_W, -1], [_CROSS_W, -1], [_CROSS_W, -_CROSS_W], [1, -_CROSS_W],
                [1, _CROSS_W], [_CROSS_W, _CROSS_W], [_CROSS_W, 1], [-_CROSS_W, 1],
                [-_CROSS_W, _CROSS_W], [-1, _CROSS_W], [-1, -_CROSS_W], [-_CROSS_W, -_CROSS_W],
            ]
        ),
        None,
    ),
    "heart": (_heart() * 0.95, None),
    "ring": (_circle(1.0), _circle(0.5)),
    # Elongated so it cannot be mistaken for a square at 32x32.
    "diamond": (np.array([[0.0, -1.0], [0.58, 0.0], [0.0, 1.0], [-0.58, 0.0]]), None),
}


def _shape_mask(obj: str, cx: float, cy: float, radius: float, rot_deg: float) -> np.ndarray:
    """Binary mask (float32, canvas size) of a placed shape."""
    outer, hole = _SHAPES[obj]
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    rot = np.array([[c, -s], [s, c]])

    def place(p: np.ndarray) -> list[tuple[float, float]]:
        q = p @ rot.T * radius + np.array([cx, cy])
        return [tuple(v) for v in q.tolist()]

    img = Image.new("L", (_S, _S), 0)
    draw = ImageDraw.Draw(img)
    draw.polygon(place(outer), fill=255)
    if hole is not None:
        draw.polygon(place(hole), fill=0)
    return img


# ---------------------------------------------------------------- colours

_YY, _XX = np.mgrid[0:_S, 0:_S].astype(np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _lum(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background, primary and secondary colour with enough contrast between them."""
    dark_bg = rng.random() < 0.5
    bg = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.08, 0.28) if dark_bg else rng.uniform(0.78, 0.97))
    while True:
        a = _hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        if abs(_lum(a) - _lum(bg)) > 0.25:
            break
    # Secondary colour: clearly different brightness from the primary so textures stay visible,
    # and not close to the background so the silhouette stays readable.
    while True:
        b = _hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.05, 1.0))
        if abs(_lum(b) - _lum(a)) > 0.35 and float(np.abs(b - bg).sum()) > 0.6:
            break
    return bg, a, b


# ---------------------------------------------------------------- styles (canvas-size textures)


def _texture(style: str, rng: np.random.Generator, a: np.ndarray, b: np.ndarray, box: tuple[float, ...]) -> np.ndarray:
    """(S, S, 3) float32 fill for the object's interior; for "outline" this is the line colour."""
    ss = SUPERSAMPLE
    if style in ("solid", "outline"):
        return np.broadcast_to(a, (_S, _S, 3))
    if style == "stripes":
        period = rng.uniform(5.0, 7.0) * ss
        ang = math.radians(rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-10, 10))
        u = _XX * math.cos(ang) + _YY * math.sin(ang) + rng.uniform(0, period)
        t = ((u % period) < period / 2).astype(np.float32)
    elif style == "polka dots":
        period = rng.uniform(6.0, 7.5) * ss
        r = period * rng.uniform(0.22, 0.28)
        ox, oy = rng.uniform(0, period, 2)
        dx = (_XX + ox) % period - period / 2
        dy = (_YY + oy) % period - period / 2
        t = (dx * dx + dy * dy < r * r).astype(np.float32)
    elif style == "checkerboard":
        cell = rng.uniform(3.5, 4.5) * ss
        ox, oy = rng.uniform(0, 2 * cell, 2)
        t = ((np.floor((_XX + ox) / cell) + np.floor((_YY + oy) / cell)) % 2).astype(np.float32)
    elif style == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        x0, y0, x1, y1 = box
        ccx, ccy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
        u = ((_XX - ccx) * math.cos(ang) + (_YY - ccy) * math.sin(ang)) / max(half, 1.0)
        t = np.clip((u + 1) / 2, 0, 1)
    elif style == "noise":
        n = rng.random((IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        t = np.repeat(np.repeat(n, ss, 0), ss, 1)
    elif style == "grid":
        period = rng.uniform(5.5, 7.0) * ss
        width = 1.2 * ss
        ox, oy = rng.uniform(0, period, 2)
        t = (((_XX + ox) % period < width) | ((_YY + oy) % period < width)).astype(np.float32)
    else:
        raise ValueError(f"unknown style {style!r}")
    return a * (1 - t[..., None]) + b * t[..., None]


def render(obj: int, style: int, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 image of OBJECTS[obj] in STYLES[style]."""
    name, sname = OBJECTS[obj], STYLES[style]
    bg, a, b = _colours(rng)
    radius = rng.uniform(0.34, 0.45) * _S  # objects span 22-29 of the 32 pixels
    margin = radius * 1.02
    cx, cy = rng.uniform(margin, _S - margin, 2)
    rot = rng.uniform(-_MAX_ROT[name], _MAX_ROT[name])
    mask_img = _shape_mask(name, cx, cy, radius, rot)
    if sname == "outline":
        # Line about 2 output pixels wide, inside the shape's edge.
        inner = mask_img.filter(ImageFilter.MinFilter(4 * SUPERSAMPLE + 1))
        mask = (np.asarray(mask_img, dtype=np.float32) - np.asarray(inner, dtype=np.float32)) / 255.0
    else:
        mask = np.asarray(mask_img, dtype=np.float32) / 255.0
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = _texture(sname, rng, a, b, box)
    m = mask[..., None]
    canvas = fill * m + bg * (1 - m)
    small = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8)


def generate(
    n: int,
    seed: int,
    objects: list[int] | None = None,
    styles: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """n images for a seed: (uint8 (n, 3, 32, 32), object ids, style ids, prompts).

    Labels are uniform over all pairs unless explicit `objects`/`styles` lists (length n) are given.
    """
    rng = np.random.default_rng(seed)
    obj_ids = np.asarray(objects) if objects is not None else rng.integers(0, len(OBJECTS), n)
    sty_ids = np.asarray(styles) if styles is not None else rng.integers(0, len(STYLES), n)
    imgs = np.stack([render(int(o), int(s), rng) for o, s in zip(obj_ids, sty_ids)])
    prompts = [make_prompt(OBJECTS[int(o)], STYLES[int(s)]) for o, s in zip(obj_ids, sty_ids)]
    return (
        torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(),
        torch.as_tensor(obj_ids, dtype=torch.long),
        torch.as_tensor(sty_ids, dtype=torch.long),
        prompts,
    )


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, ncol: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """uint8 (N, 3, H, W) -> PIL grid image with ncol images per row, optionally upscaled (nearest)."""
    n, _, h, w = images.shape
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img
