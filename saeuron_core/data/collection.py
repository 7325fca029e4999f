"""Activation collection: run a diffusers pipeline over prompts and record one block's outputs.

Work items are ``(seed, prompt)`` pairs in a fixed order; each item gets its own generator, so
its activations do not depend on batching. Items are processed ``batch_size`` at a time and a
shard is written whenever ``rows_per_shard`` maps are buffered; after an interruption a new
call with the same settings continues after the last written shard.

Under ``torchrun`` (or with explicit ``rank``/``world_size``) the items are cut into chunks of
``batch_size`` items, exactly the pipeline calls a single process makes; chunk ``c`` belongs to
rank ``c % world_size``. Every rank writes its own shards and progress file (see
:mod:`saeuron_core.data.store`), so ranks never wait for each other while sampling, a rank that is
interrupted redoes only its chunks after its last shard, and the store can be resumed with
another number of ranks (chunks already done, by any rank, are skipped).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, StoreError
from ..hosts.diffusers import generate, set_scheduler
from ..hosts.hooks import BlockCall, pipeline_hook
from ..sae.model import dtype_from_name
from ..safetensors_io import atomic_write_text
from ..seeds import generator
from . import distributed
from .store import (MANIFEST, STORE_FORMAT, ActivationStore, PartWriter, ShardInfo, ShardWriter, new_part, part_file,
                    read_parts)


@dataclass
class CollectConfig:
    """Settings of one collection run (all of them must match to resume a store)."""

    hook_point: str
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    seeds: list[int] = field(default_factory=lambda: [0])
    every_n_steps: int = 1
    halves: Literal["cond", "both"] = "cond"
    tokens_per_map: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 4
    rows_per_shard: int = 256
    dtype: str = "float16"
    model: str = ""
    model_family: str = ""
    residual: bool = False  # record the block's update (output minus input) instead of its output

    def validate(self) -> None:
        for name in ("steps", "every_n_steps", "batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"collect: {name} must be >= 1, got {getattr(self, name)}")
        if self.halves not in ("cond", "both"):
            raise ConfigError(f"collect: halves must be 'cond' or 'both', got {self.halves!r}")
        if self.tokens_per_map is not None and self.tokens_per_map < 1:
            raise ConfigError(f"collect: tokens_per_map must be >= 1, got {self.tokens_per_map}")
        if not self.seeds:
            raise ConfigError("collect: at least one seed is needed")
        dtype_from_name(self.dtype)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line, blank lines and ``#`` comments skipped) or a JSON list."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read prompts ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); expected a list of prompt strings") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{path}: expected a JSON list of prompt strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{path}: no prompts found")
    return prompts


def _manifest(config: CollectConfig, prompts: Sequence[str], d_in: int) -> dict[str, Any]:
    return {"format": STORE_FORMAT, "version": 1, "config": asdict(config), "prompts": list(prompts),
            "d_in": d_in, "shards": [], "items_done": 0, "items_total": len(prompts) * len(config.seeds),
            "complete": False}


def _open_existing(out: Path, config: CollectConfig, prompts: Sequence[str]) -> Optional[dict[str, Any]]:
    if not (out / MANIFEST).is_file():
        return None
    store = ActivationStore(out)
    # Stores made before the residual option existed recorded block outputs.
    recorded = {"residual": False, **(store.manifest.get("config") or {})}
    if recorded != json.loads(json.dumps(asdict(config))) or store.manifest.get("prompts") != list(prompts):
        raise StoreError(f"{out}: holds a collection made with other settings or prompts; "
                         f"use a new output folder (or the same settings to resume)")
    return store.manifest


def call_rows(call: BlockCall, chunk: Sequence[tuple[int, int]], config: CollectConfig,
              store_dtype: torch.dtype) -> Iterator[tuple[Tensor, dict[str, Any]]]:
    """The maps one hooked call records: ``(tokens [N, C], row fields)`` per kept batch row.

    ``chunk`` lists the ``(seed, prompt)`` items of the pipeline call (CFG doubles the batch).
    """
    if call.call_index % config.every_n_steps:
        return
    n = len(chunk)
    for row in range(call.tokens.shape[0]):
        cond = bool(call.is_cond[row])
        if config.halves == "cond" and not cond:
            continue
        seed, p = chunk[row % n]
        acts = call.tokens[row]
        if config.tokens_per_map is not None and config.tokens_per_map < acts.shape[0]:
            keep = torch.randperm(acts.shape[0], generator=generator("sub", seed, p, call.call_index, cond))
            acts = acts[keep[:config.tokens_per_map].sort().values]
        t = float(call.timesteps[row]) if call.timesteps is not None else float("nan")
        yield acts.to(store_dtype), {"prompt": p, "seed": seed, "step": call.call_index, "timestep": t, "cond": cond}


def run_chunk(pipe: Any, prompts: Sequence[str], chunk: Sequence[tuple[int, int]], config: CollectConfig,
              record: Callable[[BlockCall], None]) -> None:
    """One pipeline call over the ``(seed, prompt)`` items of ``chunk`` with ``record`` on the hook point."""
    hook = pipeline_hook(pipe, config.hook_point, record, residual=config.residual)
    with hook, torch.no_grad():
        generate(pipe, [prompts[p] for _, p in chunk], [seed for seed, _ in chunk], steps=config.steps,
                 guidance_scale=config.guidance_scale, height=config.height, width=config.width)


def _ranks(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None and world_size is None:
        info = distributed.current()
        return info.rank, info.world_size
    if rank is None or world_size is None:
        raise ConfigError("collect: give both rank and world_size, or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"collect: rank {rank} of world size {world_size} is not a valid rank")
    return rank, world_size


def collect_activations(pipe: Any, prompts: Sequence[str], out_dir: str | Path, config: CollectConfig, *,
                        progress: bool = True,
                        on_shard: Optional[Callable[[ShardInfo], None]] = None,
                        rank: Optional[int] = None, world_size: Optional[int] = None) -> ActivationStore:
    """Run ``pipe`` over ``prompts`` x ``config.seeds`` and store the hook point's activations.

    Resumes if ``out_dir`` already holds an incomplete store made with the same settings.
    ``rank``/``world_size`` default to the initialised ``torch.distributed`` group (one process
    without one); giving them explicitly lets independent jobs (e.g. a SLURM array) share the work
    without any process group. With several ranks each returns the store as it is when its own
    share is done (under a process group: after every rank is done).
    """
    config.validate()
    if not prompts:
        raise ConfigError("collect: no prompts given")
    rank, world = _ranks(rank, world_size)
    out = Path(out_dir)
    set_scheduler(pipe, config.scheduler)
    manifest = _open_existing(out, config, prompts)
    if world == 1 and (manifest is None or manifest.get("layout") != "parts"):
        return _collect_single(pipe, prompts, out, config, manifest, progress, on_shard)
    return _collect_ranked(pipe, prompts, out, config, manifest, rank, world, progress, on_shard)


def _collect_single(pipe: Any, prompts: Sequence[str], out: Path, config: CollectConfig,
                    manifest: Optional[dict[str, Any]], progress: bool,
                    on_shard: Optional[Callable[[ShardInfo], None]]) -> ActivationStore:
    store_dtype = dtype_from_name(config.dtype)
    items = [(seed, p) for seed in config.seeds for p in range(len(prompts))]
    if manifest is not None and manifest.get("complete"):
        return ActivationStore(out)
    writer: Optional[ShardWriter] = ShardWriter(out, manifest) if manifest is not None else None
    start = manifest["items_done"] if manifest is not None else 0

    chunk: list[tuple[int, int]] = []

    def record(call: BlockCall) -> None:
        nonlocal writer
        if call.call_index % config.every_n_steps:
            return
        if writer is None:
            writer = ShardWriter(out, _manifest(config, prompts, call.tokens.shape[-1]))
        for acts, row in call_rows(call, chunk, config, store_dtype):
            writer.add(acts, **row)

    bar = tqdm(total=len(items), initial=start, desc="collect", unit="gen", disable=not progress)
    try:
        for begin in range(start, len(items), config.batch_size):
            chunk[:] = items[begin:begin + config.batch_size]
            run_chunk(pipe, prompts, chunk, config, record)
            bar.update(len(chunk))
            done = begin + len(chunk)
            assert writer is not None
            if writer.buffered_rows >= config.rows_per_shard or done == len(items):
                info = writer.flush(done)
                if info is not None and on_shard is not None:
                    on_shard(info)
        if writer is None:
            raise StoreError(f"collect: hook point {config.hook_point!r} was never called during sampling")
        writer.manifest["complete"] = True
        writer.write_manifest()
    finally:
        bar.close()
    return ActivationStore(out)


def _ranked_manifest(config: CollectConfig, prompts: Sequence[str], d_in: Optional[int]) -> dict[str, Any]:
    manifest = _manifest(config, prompts, d_in)  # type: ignore[arg-type]
    manifest.update(layout="parts", chunk_items=config.batch_size)
    return manifest


def _collect_ranked(pipe: Any, prompts: Sequence[str], out: Path, config: CollectConfig,
                    manifest: Optional[dict[str, Any]], rank: int, world: int, progress: bool,
                    on_shard: Optional[Callable[[ShardInfo], None]]) -> ActivationStore:
    store_dtype = dtype_from_name(config.dtype)
    items = [(seed, p) for seed in config.seeds for p in range(len(prompts))]
    size = config.batch_size
    n_chunks = math.ceil(len(items) / size)
    done: set[int] = set()
    if manifest is not None and manifest.get("layout") != "parts":
        # A store begun by a single process: its shards hold the first items_done items, whole chunks.
        if manifest.get("complete"):
            return ActivationStore(out)
        legacy = set(range(int(manifest["items_done"]) // size))
        done |= legacy
        if rank == 0:  # part file first, then the manifest: a reader sees the old or the new form, both complete
            if not (out / part_file("legacy")).is_file():
                part = new_part("legacy", manifest.get("d_in"))
                part.update(shards=manifest["shards"], shard_chunks=[[] for _ in manifest["shards"]],
                            chunks_done=sorted(legacy))
                atomic_write_text(out / part_file("legacy"), json.dumps(part, indent=1))
            converted = _ranked_manifest(config, prompts, manifest.get("d_in"))
            atomic_write_text(out / MANIFEST, json.dumps(converted, indent=1))
    elif manifest is None:  # every rank writes the same file: a rank may finish before rank 0 starts
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MANIFEST, json.dumps(_ranked_manifest(config, prompts, None), indent=1))
    for part in read_parts(out):
        done.update(int(c) for c in part.get("chunks_done", []))
    # Static ownership (chunk c -> rank c % world) needs no agreement between ranks on what is done.
    mine = [c for c in range(n_chunks) if c % world == rank and c not in done]

    name = f"r{rank:04d}"
    own = [p for p in read_parts(out) if p.get("part") == name]
    writer: Optional[PartWriter] = PartWriter(out, own[0]) if own and own[0].get("d_in") is not None else None
    chunk: list[tuple[int, int]] = []
    pending: list[int] = []

    def record(call: BlockCall) -> None:
        nonlocal writer
        if call.call_index % config.every_n_steps:
            return
        if writer is None:
            part = own[0] if own else new_part(name, call.tokens.shape[-1])
            part["d_in"] = call.tokens.shape[-1]
            writer = PartWriter(out, part)
        for acts, row in call_rows(call, chunk, config, store_dtype):
            writer.add(acts, **row)

    n_items = sum(len(items[c * size:(c + 1) * size]) for c in mine)
    bar = tqdm(total=n_items, desc=f"collect (rank {rank} of {world})", unit="gen",
               disable=not progress or rank != 0)
    try:
        for i, c in enumerate(mine):
            chunk[:] = items[c * size:(c + 1) * size]
            run_chunk(pipe, prompts, chunk, config, record)
            bar.update(len(chunk))
            pending.append(c)
            if writer is None:
                raise StoreError(f"collect: hook point {config.hook_point!r} was never called during sampling")
            if writer.buffered_rows >= config.rows_per_shard or i == len(mine) - 1:
                info = writer.flush_chunks(pending)
                pending = []
                if info is not None and on_shard is not None:
                    on_shard(info)
    finally:
        bar.close()
    info = distributed.current()
    if info.enabled:
        distributed.barrier(info)
    if rank == 0 or not info.enabled:
        store = ActivationStore(out)
        if store.manifest.get("d_in") is None:
            raise StoreError(f"collect: hook point {config.hook_point!r} was never called during sampling")
        atomic_write_text(out / MANIFEST, json.dumps(store.manifest, indent=1))
    if info.enabled:
        distributed.barrier(info)
    return ActivationStore(out)
