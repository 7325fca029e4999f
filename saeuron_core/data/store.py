"""Activation store: safetensors shards plus a JSON manifest.

Each shard ``shard_000000.safetensors`` holds ``activations [tokens, C]`` and one row table
entry per recorded feature map: ``row_prompt``, ``row_seed``, ``row_step`` (call index),
``row_timestep`` (diffusion timestep value), ``row_cond`` (1 = conditional half) and
``row_offset`` (token offsets, ``rows + 1``). ``manifest.json`` holds the collection settings,
the prompts and the list of shards; it is rewritten atomically after every shard, so a store
is always consistent and an interrupted collection resumes from the last shard.

A store collected by several ranks (``torchrun``) has ``"layout": "parts"`` in its manifest:
every rank writes its own shards (``shard_r0001_000000.safetensors``) and its own progress file
(``manifest.part-r0001.json``: its shards, which work chunks they hold, which chunks are done).
:class:`ActivationStore` merges the part files when it opens the store, so the shard list is
always that of every rank, also while ranks are still writing; ``manifest.json`` gets the merged
list written into it when collection finishes, for readers other than this class.

Shards are read either whole (one process) or memory-mapped, row by row (one rank of several
reads only its own rows of each global batch); no shard is opened twice per epoch by a reader.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import StoreError
from ..safetensors_io import atomic_save_safetensors, atomic_write_text, load_safetensors, read_safetensors_header
from ..seeds import generator
from .distributed import rank_rows

MANIFEST = "manifest.json"
STORE_FORMAT = "saeuron-activations"
PART_FORMAT = "saeuron-activations-part"
PART_PREFIX = "manifest.part-"
ROW_FIELDS = ("row_prompt", "row_seed", "row_step", "row_timestep", "row_cond")
# safetensors dtype -> (numpy dtype of the same width used to map the bytes, torch dtype they are viewed as)
_MMAP_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16), "F32": (np.float32, torch.float32)}


def part_file(part: str) -> str:
    """File name of one writer's progress file in a multi-rank store (``part`` e.g. ``r0003``)."""
    return f"{PART_PREFIX}{part}.json"


def read_parts(folder: str | Path) -> list[dict[str, Any]]:
    """Every part progress file of a multi-rank store (each is replaced atomically, so reads are consistent)."""
    parts = []
    for path in sorted(Path(folder).glob(f"{PART_PREFIX}*.json")):
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path}: unreadable part manifest ({exc})") from None
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
            raise StoreError(f"{path}: not a saeuron activation part manifest")
        parts.append(part)
    return parts


def chunk_count(manifest: dict[str, Any]) -> int:
    return math.ceil(int(manifest["items_total"]) / int(manifest["chunk_items"]))


@dataclass
class ShardInfo:
    file: str
    rows: int
    tokens: int


class ActivationStore:
    """Read access to a store folder: manifest, shards, row tables and shuffled token batches."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise StoreError(f"{self.folder}: not an activation store (no {MANIFEST}); run 'saeuron collect' first")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path}: unreadable manifest ({exc})") from None
        if self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: not a saeuron activation manifest")
        if self.manifest.get("layout") == "parts":
            self._merge_parts()
        self.shards = [ShardInfo(**s) for s in self.manifest.get("shards", [])]

    def _merge_parts(self) -> None:
        """Shards, progress and ``d_in`` of a multi-rank store from its part files.

        Shards are ordered by the first work chunk they hold, so the order does not depend on which
        rank wrote what (shards converted from a single-process store come first, in their order).
        """
        parts = read_parts(self.folder)
        entries: list[tuple[tuple[int, str], dict[str, Any]]] = []
        done: set[int] = set()
        d_in = self.manifest.get("d_in")
        for part in parts:
            done.update(int(c) for c in part.get("chunks_done", []))
            if d_in is None:
                d_in = part.get("d_in")
            for shard, chunks in zip(part.get("shards", []), part.get("shard_chunks", [])):
                entries.append(((min(chunks) if chunks else -1, shard["file"]), shard))
        entries.sort(key=lambda e: e[0])
        chunk_items, total = int(self.manifest["chunk_items"]), int(self.manifest["items_total"])
        items_done = sum(min(chunk_items, total - c * chunk_items) for c in done if c * chunk_items < total)
        self.manifest = {**self.manifest, "shards": [dict(s) for _, s in entries], "d_in": d_in,
                         "items_done": items_done, "complete": len(done) >= chunk_count(self.manifest)}

    @property
    def d_in(self) -> int:
        if self.manifest.get("d_in") is None:
            raise StoreError(f"{self.folder}: store holds no activations yet")
        return int(self.manifest["d_in"])

    @property
    def n_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def load_shard(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``(activations [tokens, C], row table)`` of one shard."""
        info = self.shards[index]
        tensors, _ = load_safetensors(self.folder / info.file)
        acts = tensors.get("activations")
        if acts is None or acts.dim() != 2 or acts.shape != (info.tokens, self.d_in):
            raise StoreError(f"{self.folder / info.file}: activations do not match the manifest "
                             f"({info.tokens} x {self.d_in} expected)")
        return acts, {k: v for k, v in tensors.items() if k != "activations"}

    def mmap_shard(self, index: int) -> Tensor:
        """The activations of one shard as a memory-mapped ``[tokens, C]`` tensor (nothing read until indexed).

        Mapped copy-on-write: writing to the tensor never changes the file.
        """
        info = self.shards[index]
        path = self.folder / info.file
        header = read_safetensors_header(path)
        entry = header.get("activations")
        if not isinstance(entry, dict) or entry.get("dtype") not in _MMAP_DTYPES \
                or tuple(entry.get("shape", ())) != (info.tokens, self.d_in):
            raise StoreError(f"{path}: activations do not match the manifest ({info.tokens} x {self.d_in} "
                             f"float16/bfloat16/float32 expected)")
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
        np_dtype, torch_dtype = _MMAP_DTYPES[entry["dtype"]]
        if info.tokens == 0:
            return torch.zeros(0, self.d_in, dtype=torch_dtype)
        array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + header_len + int(entry["data_offsets"][0]),
                          shape=(info.tokens, self.d_in))
        return torch.from_numpy(array).view(torch_dtype)

    def gather_rows(self, group: list[int], index: Tensor) -> Tensor:
        """Rows ``index`` (positions in the concatenation of shards ``group``) read from memory-mapped shards."""
        if index.numel() == 0:
            return torch.zeros(0, self.d_in)
        order = index.argsort()
        ordered = index[order]
        pieces = []
        start = 0
        for i in group:
            stop = start + self.shards[i].tokens
            lo, hi = (int(torch.searchsorted(ordered, v)) for v in (start, stop))
            if hi > lo:
                pieces.append(self.mmap_shard(i)[ordered[lo:hi] - start])
            start = stop
        rows = torch.cat(pieces)
        out = torch.empty_like(rows)
        out[order] = rows
        return out

    def rows(self) -> dict[str, Tensor]:
        """The row table of the whole store (prompt, seed, step, timestep, cond per feature map)."""
        tables = [self.load_shard(i)[1] for i in range(len(self.shards))]
        if not tables:
            return {name: torch.zeros(0) for name in ROW_FIELDS}
        return {name: torch.cat([t[name] for t in tables]) for name in ROW_FIELDS}

    # -- shuffled batches ------------------------------------------------------------
    def _groups(self, seed: int, epoch: int, group_size: int) -> list[list[int]]:
        order = torch.randperm(len(self.shards), generator=generator("shards", seed, epoch)).tolist()
        return [order[i:i + group_size] for i in range(0, len(order), group_size)]

    def batches_per_epoch(self, batch_size: int, group_size: int, seed: int = 0) -> int:
        # Shard grouping changes with the epoch, so the count can too; epoch 0 is the reference.
        return sum(sum(self.shards[i].tokens for i in g) // batch_size for g in self._groups(seed, 0, group_size))

    def iter_batches(self, batch_size: int, *, seed: int = 0, group_size: int = 4, start_batch: int = 0,
                     dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        """Endless stream of ``[batch_size, C]`` batches.

        Per epoch the shard order is shuffled, shards are read ``group_size`` at a time and
        their tokens shuffled together; each shard is read once per epoch and memory stays
        at one group. The stream is a pure function of ``seed``, so ``start_batch`` resumes
        it exactly (skipped groups are counted from the manifest, not read). A group's last
        partial batch is dropped.

        With ``world_size`` > 1 the global stream is the same (it does not depend on the number
        of ranks) and this rank gets rows ``[rank * b, (rank + 1) * b)`` of every global batch,
        ``b = batch_size // world_size``: per group it maps the shards and reads only its own rows,
        so ranks read disjoint rows and memory per rank is ``1 / world_size`` of a group.
        """
        lo, hi = rank_rows(batch_size, rank, world_size)
        local = hi - lo
        if self.n_tokens < batch_size:
            raise StoreError(f"{self.folder}: store holds {self.n_tokens} tokens, fewer than one batch of {batch_size}")
        skip = start_batch
        epoch = 0
        while True:
            for g, group in enumerate(self._groups(seed, epoch, group_size)):
                n_tokens = sum(self.shards[i].tokens for i in group)
                n_batches = n_tokens // batch_size
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                perm = torch.randperm(n_tokens, generator=generator("tokens", seed, epoch, g))
                if world_size == 1:
                    tokens = torch.cat([self.load_shard(i)[0] for i in group])
                    for b in range(skip, n_batches):
                        yield tokens[perm[b * batch_size:(b + 1) * batch_size]].to(dtype)
                else:
                    mine = perm[:n_batches * batch_size].view(n_batches, batch_size)[skip:, lo:hi]
                    tokens = self.gather_rows(group, mine.reshape(-1))
                    for b in range(n_batches - skip):
                        yield tokens[b * local:(b + 1) * local].to(dtype)
                    del tokens
                skip = 0
            epoch += 1


class ShardWriter:
    """Buffers recorded rows and writes shards + manifest atomically.

    ``prefix`` starts the shard file names and ``manifest_name`` is the JSON file rewritten after
    each shard (a rank of a multi-rank collection uses its own of both, see :class:`PartWriter`).
    """

    def __init__(self, folder: str | Path, manifest: dict[str, Any], *, prefix: str = "shard_",
                 manifest_name: str = MANIFEST) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.prefix = prefix
        self.manifest_name = manifest_name
        self._acts: list[Tensor] = []
        self._rows: dict[str, list[Any]] = {name: [] for name in ROW_FIELDS}

    @property
    def buffered_rows(self) -> int:
        return len(self._acts)

    def add(self, acts: Tensor, *, prompt: int, seed: int, step: int, timestep: float, cond: bool) -> None:
        self._acts.append(acts.detach().cpu())
        for name, value in zip(ROW_FIELDS, (prompt, seed, step, timestep, int(cond))):
            self._rows[name].append(value)

    def flush(self, items_done: int) -> Optional[ShardInfo]:
        """Write buffered rows as the next shard, then record ``items_done`` in the manifest."""
        info = self._write_shard()
        self.manifest["items_done"] = items_done
        self.write_manifest()
        return info

    def _write_shard(self) -> Optional[ShardInfo]:
        info = None
        if self._acts:
            name = f"{self.prefix}{len(self.manifest['shards']):06d}.safetensors"
            counts = torch.tensor([a.shape[0] for a in self._acts], dtype=torch.int64)
            tensors = {
                "activations": torch.cat(self._acts),
                "row_prompt": torch.tensor(self._rows["row_prompt"], dtype=torch.int64),
                "row_seed": torch.tensor(self._rows["row_seed"], dtype=torch.int64),
                "row_step": torch.tensor(self._rows["row_step"], dtype=torch.int32),
                "row_timestep": torch.tensor(self._rows["row_timestep"], dtype=torch.float32),
                "row_cond": torch.tensor(self._rows["row_cond"], dtype=torch.uint8),
                "row_offset": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
            }
            atomic_save_safetensors(tensors, self.folder / name, {"saeuron_store": "1"})
            info = ShardInfo(file=name, rows=len(self._acts), tokens=int(counts.sum()))
            self.manifest["shards"].append(info.__dict__)
            self._acts.clear()
            for values in self._rows.values():
                values.clear()
        return info

    def write_manifest(self) -> None:
        atomic_write_text(self.folder / self.manifest_name, json.dumps(self.manifest, indent=1))


def new_part(part: str, d_in: Optional[int]) -> dict[str, Any]:
    return {"format": PART_FORMAT, "part": part, "d_in": d_in, "shards": [], "shard_chunks": [], "chunks_done": []}


class PartWriter(ShardWriter):
    """One rank's writer in a multi-rank store: its own shard names and its own progress file."""

    def __init__(self, folder: str | Path, part: dict[str, Any]) -> None:
        super().__init__(folder, part, prefix=f"shard_{part['part']}_", manifest_name=part_file(part["part"]))

    def flush_chunks(self, chunks: list[int]) -> Optional[ShardInfo]:
        """Write buffered rows as the next shard holding work chunks ``chunks``, then mark those done."""
        info = self._write_shard()
        if info is not None:
            self.manifest["shard_chunks"].append(sorted(chunks))
        self.manifest["chunks_done"].extend(chunks)
        self.write_manifest()
        return info
