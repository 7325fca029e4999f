"""Activation collection: run a diffusers pipeline over prompts and record one block's outputs.

Work items are ``(seed, prompt)`` pairs in a fixed order; each item gets its own generator, so
its activations do not depend on batching. Items are processed ``batch_size`` at a time and a
shard is written whenever ``rows_per_shard`` maps are buffered; after an interruption a new
call with the same settings continues after the last written shard.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, StoreError
from .hooks import BlockCall, pipeline_hook
from .pipelines import generate, set_scheduler
from .sae import dtype_from_name
from .store import MANIFEST, STORE_FORMAT, ActivationStore, ShardInfo, ShardWriter, generator


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
    if store.manifest.get("config") != json.loads(json.dumps(asdict(config))) or store.manifest.get("prompts") != list(prompts):
        raise StoreError(f"{out}: holds a collection made with other settings or prompts; "
                         f"use a new output folder (or the same settings to resume)")
    return store.manifest


def collect_activations(pipe: Any, prompts: Sequence[str], out_dir: str | Path, config: CollectConfig, *,
                        progress: bool = True,
                        on_shard: Optional[Callable[[ShardInfo], None]] = None) -> ActivationStore:
    """Run ``pipe`` over ``prompts`` x ``config.seeds`` and store the hook point's activations.

    Resumes if ``out_dir`` already holds an incomplete store made with the same settings.
    """
    config.validate()
    if not prompts:
        raise ConfigError("collect: no prompts given")
    out = Path(out_dir)
    set_scheduler(pipe, config.scheduler)
    store_dtype = dtype_from_name(config.dtype)
    items = [(seed, p) for seed in config.seeds for p in range(len(prompts))]

    manifest = _open_existing(out, config, prompts)
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
            writer.add(acts.to(store_dtype), prompt=p, seed=seed, step=call.call_index, timestep=t, cond=cond)

    bar = tqdm(total=len(items), initial=start, desc="collect", unit="gen", disable=not progress)
    try:
        for begin in range(start, len(items), config.batch_size):
            chunk[:] = items[begin:begin + config.batch_size]
            hook = pipeline_hook(pipe, config.hook_point, record)
            with hook, torch.no_grad():
                generate(pipe, [prompts[p] for _, p in chunk], [seed for seed, _ in chunk], steps=config.steps,
                         guidance_scale=config.guidance_scale, height=config.height, width=config.width)
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
