"""Activation store: safetensors shards plus a JSON manifest.

Each shard ``shard_000000.safetensors`` holds ``activations [tokens, C]`` and one row table
entry per recorded feature map: ``row_prompt``, ``row_seed``, ``row_step`` (call index),
``row_timestep`` (diffusion timestep value), ``row_cond`` (1 = conditional half) and
``row_offset`` (token offsets, ``rows + 1``). ``manifest.json`` holds the collection settings,
the prompts and the list of shards; it is rewritten atomically after every shard, so a store
is always consistent and an interrupted collection resumes from the last shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from .errors import StoreError
from .formats import atomic_save_safetensors, atomic_write_text, load_safetensors

MANIFEST = "manifest.json"
STORE_FORMAT = "saeuron-activations"
ROW_FIELDS = ("row_prompt", "row_seed", "row_step", "row_timestep", "row_cond")


def derived_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple of values (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


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
        self.shards = [ShardInfo(**s) for s in self.manifest.get("shards", [])]

    @property
    def d_in(self) -> int:
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
                     dtype: torch.dtype = torch.float32) -> Iterator[Tensor]:
        """Endless stream of ``[batch_size, C]`` batches.

        Per epoch the shard order is shuffled, shards are read ``group_size`` at a time and
        their tokens shuffled together; each shard is read once per epoch and memory stays
        at one group. The stream is a pure function of ``seed``, so ``start_batch`` resumes
        it exactly (skipped groups are counted from the manifest, not read). A group's last
        partial batch is dropped.
        """
        if self.n_tokens < batch_size:
            raise StoreError(f"{self.folder}: store holds {self.n_tokens} tokens, fewer than one batch of {batch_size}")
        skip = start_batch
        epoch = 0
        while True:
            for g, group in enumerate(self._groups(seed, epoch, group_size)):
                n_batches = sum(self.shards[i].tokens for i in group) // batch_size
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                tokens = torch.cat([self.load_shard(i)[0] for i in group])
                perm = torch.randperm(tokens.shape[0], generator=generator("tokens", seed, epoch, g))
                for b in range(skip, n_batches):
                    yield tokens[perm[b * batch_size:(b + 1) * batch_size]].to(dtype)
                skip = 0
            epoch += 1


class ShardWriter:
    """Buffers recorded rows and writes shards + manifest atomically."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
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
        info = None
        if self._acts:
            name = f"shard_{len(self.manifest['shards']):06d}.safetensors"
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
        self.manifest["items_done"] = items_done
        self.write_manifest()
        return info

    def write_manifest(self) -> None:
        atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1))
