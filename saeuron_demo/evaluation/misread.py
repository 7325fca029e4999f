"""What the classifier read wrong: counts per ``"<true> as <read>"`` (the report's ``misread``) and
sheets of the misread images with their prompt and seed (``saeuron eval --misread-dir``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Optional, Sequence

from torch import Tensor

from .generation import RunOutput
from .grid import Grid


def misread_counts(names: Sequence[str], label: Tensor, pred: Tensor) -> dict[str, int]:
    """``{"<true> as <read>": count}`` of the wrong readings among these images, most frequent first."""
    wrong = pred != label
    counts = Counter(f"{names[t]} as {names[r]}" for t, r in zip(label[wrong].tolist(), pred[wrong].tolist()))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _picks(grid: Grid, heads: dict[str, tuple[Tensor, Tensor, list[str]]],
           concept: Optional[str]) -> list[tuple[str, int, str]]:
    """``(head, image index, why)`` of the images :func:`misread_tiles` shows, in its order."""
    if concept is None:
        picks = [(head, i, "misread") for head, (label, pred, _) in heads.items()
                 for i in (pred != label).nonzero().squeeze(1).tolist()]
        picks.sort(key=lambda p: p[1])
        return picks
    head, cid = grid.kind_of(concept)
    label, pred, _ = heads[head]
    still = ((label == cid) & (pred == cid)).nonzero().squeeze(1).tolist()
    lost = ((label != cid) & (pred != label)).nonzero().squeeze(1).tolist()
    return [(head, i, "still") for i in still] + [(head, i, "lost") for i in lost]


def misread_tiles(grid: Grid, seeds: Sequence[int], out: RunOutput, concept: Optional[str] = None) -> list[dict[str, Any]]:
    """The images whose reading went wrong, one dict each (prompt, seed, head, true and read label, why).

    Without ``concept`` (the clean run) every image a head misreads; with an erased ``concept``
    its own images still read as it (``"still"``: what UA missed) and the other images of its kind
    read wrong (``"lost"``: what IRA lost), in that order.
    """
    n = len(seeds)
    lo, ls = grid.labels(n)
    heads = {"object": (lo, out.objects, grid.object_names), "style": (ls, out.styles, grid.style_names)}
    tiles = []
    for head, i, why in _picks(grid, heads, concept):
        label, pred, names = heads[head]
        tiles.append({"index": i, "prompt": grid.prompts[i // n], "seed": seeds[i % n],
                      "head": head, "true": names[int(label[i])], "read": names[int(pred[i])], "why": why})
    return tiles


def save_misread_sheet(tiles: list[dict[str, Any]], images: Tensor, path: str, scale: int = 6) -> None:
    """Write ``path`` (PNG sheet of the ``tiles`` of :func:`misread_tiles` among ``images``, labelled
    ``true -> read``) and ``path`` + ``.json`` (the tiles). With no tiles only the JSON (an empty list)."""
    from PIL import Image

    from saeuron_core.inspection import image_grid

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(tiles, f, indent=1)
    if not tiles:
        return
    band = 14  # a dark strip above each picture holds its label, so the label hides none of it
    h, w = images.shape[-2:]
    cells, labels = [], []
    for t in tiles:
        cell = Image.new("RGB", (w * scale, h * scale + band))
        pic = Image.fromarray(images[t["index"]].permute(1, 2, 0).numpy())
        cell.paste(pic.resize((w * scale, h * scale), Image.NEAREST), (0, band))
        cells.append(cell)
        labels.append(f"{t['true']} -> {t['read']}")
    cols = min(8, len(cells))
    while len(cells) % cols:
        cells.append(Image.new("RGB", cells[0].size, (255, 255, 255)))
        labels.append("")
    rows = [cells[r:r + cols] for r in range(0, len(cells), cols)]
    grid = image_grid(rows, labels=[labels[r:r + cols] for r in range(0, len(labels), cols)],
                      min_label_width=w * scale)
    grid.save(path)
