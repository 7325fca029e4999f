"""``saeuron train``: train a TopK SAE on an activation store, or ``--online`` on activations a pipeline
generates while training (with ``collect``'s sampling options).

Its hyper-parameters are :class:`~saeuron_core.training.trainer.TrainConfig` fields.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saeuron_core.errors import ConfigError

from .collect import sampling_fields
from .common import load_model
from .fields import Fields

if TYPE_CHECKING:
    from saeuron_core.data.collection import CollectConfig
    from saeuron_core.training.trainer import TrainConfig, TrainResult

NAME = "train"
TRAIN = ("expansion_factor", "n_latents", "k", "batch_size", "steps", "epochs", "lr", "warmup_steps", "lr_end_factor",
         "auxk_alpha", "dead_tokens_threshold", "grad_clip", "seed", "checkpoint_every", "log_every")
HELP = {"batch_size": "tokens per optimizer step over all ranks (under torchrun each rank gets batch/ranks)",
        "lr": "default: 2e-4 / sqrt(n_latents / 2^14)"}
ONLINE_FLAGS = {"steps": "--sampling-steps", "batch_size": "--gen-batch-size"}
ONLINE_HELP = {"steps": "denoising steps per generation",
               "residual": "train on the block's update (output minus input)",
               "batch_size": "prompts per pipeline call",
               "dtype": "precision tokens are kept in (as a store would)"}


def train_fields() -> Fields[TrainConfig]:
    """train's :class:`TrainConfig` options."""
    from saeuron_core.training.trainer import TrainConfig

    return Fields(TrainConfig, TRAIN, help=HELP)


def online_fields() -> Fields[CollectConfig]:
    """train --online's sampling options: collect's, two of them under other flags."""
    return sampling_fields(flags=ONLINE_FLAGS, help=ONLINE_HELP)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and its options."""
    t = sub.add_parser(NAME, help="train a TopK SAE on a collected activation store (or --online)")
    t.add_argument("--store", default=None, help="folder written by 'saeuron collect' (required unless --online)")
    t.add_argument("--out", required=True, help="output .safetensors SAE file")
    t.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT + '.ckpt.safetensors'); resumes if present")
    train_fields().add_to(t)
    t.add_argument("--shuffle-shards", type=int, default=4, help="shards shuffled together")
    t.add_argument("--device", default="cpu", help="under torchrun, 'cuda' means cuda:LOCAL_RANK")
    o = t.add_argument_group("online mode (--online: sample with the pipeline and train, no activation store)")
    o.add_argument("--online", action="store_true", help="generate activations while training instead of reading a store")
    o.add_argument("--model", default=None, help="local diffusers pipeline folder or single-file .safetensors "
                                                 "checkpoint (with --config)")
    o.add_argument("--config", default=None, help="for a single-file checkpoint: a local diffusers pipeline folder")
    o.add_argument("--prompts", default=None, help="text file (one prompt per line) or JSON list")
    online_fields().add_to(o)
    o.add_argument("--buffer-tokens", type=int, default=2 ** 18, help="shuffling buffer size per rank (tokens)")


def run(a: argparse.Namespace) -> int:
    """Train the SAE ``--out`` (resuming from its checkpoint), alone or under torchrun."""
    from saeuron_core.data import distributed

    if a.online == (a.store is not None):
        raise ConfigError("train: give --store STORE, or --online with --model and --prompts")
    if a.online and (a.model is None or a.prompts is None):
        raise ConfigError("train --online: --model and --prompts are required")
    config = train_fields().build(a, epochs=a.epochs if a.steps is None else None)
    if not str(a.out).endswith(".safetensors"):
        raise ConfigError(f"--out {a.out}: expected a path ending in .safetensors")
    info, device = distributed.init_from_env(a.device)
    try:
        result = (_train_online if a.online else _train_store)(a, config, device)
        if info.is_main:
            final = result.sae.training_summary["final"]
            ranks = f" on {info.world_size} ranks" if info.world_size > 1 else ""
            print(f"trained {result.sae.n_latents} latents (k={result.sae.k}) for {config.steps or 'epochs'} steps"
                  f"{ranks}: FVU {final.get('fvu', float('nan')):.4f}, L0 {final.get('l0', 0):.1f}, "
                  f"dead {final.get('dead_frac', 0):.3f} -> {a.out}"
                  + (f" ({result.tokens_per_second:,.0f} tokens/s)" if result.tokens_per_second else ""))
    finally:
        distributed.shutdown()
    return 0


def _name(path: Any) -> str:
    """A local path as the SAE file records it: the last part only (files are shared; directories are not)."""
    return Path(str(path)).name if path else ""


def _checkpoint(a: argparse.Namespace) -> str:
    return a.checkpoint or f"{a.out}.ckpt.safetensors"


def _train_store(a: argparse.Namespace, config: TrainConfig, device: Any) -> TrainResult:
    from saeuron_core.data.store import ActivationStore
    from saeuron_core.training.sources import StoreSource
    from saeuron_core.training.trainer import train_sae

    store = ActivationStore(a.store)
    collect_cfg = store.manifest.get("config", {})
    return train_sae(StoreSource(store, a.shuffle_shards), config, hook_point=collect_cfg.get("hook_point", ""),
                     model_family=collect_cfg.get("model_family", ""), residual=bool(collect_cfg.get("residual")),
                     checkpoint=_checkpoint(a), out=a.out, device=device,
                     source_info={"store": _name(a.store), "model": _name(collect_cfg.get("model", "")),
                                  "tokens_in_store": store.n_tokens})


def _train_online(a: argparse.Namespace, config: TrainConfig, device: Any) -> TrainResult:
    from saeuron_core.data.collection import read_prompts
    from saeuron_core.data.online import OnlineSource
    from saeuron_core.training.trainer import train_sae

    sampling = online_fields().build(a, model=a.model)
    sampling.validate()
    prompts = read_prompts(a.prompts)
    pipe = load_model(a.model, device=device, config=a.config)
    source = OnlineSource(pipe, prompts, sampling, buffer_tokens=a.buffer_tokens)
    return train_sae(source, config, hook_point=sampling.hook_point, model_family=sampling.model_family,
                     residual=sampling.residual, checkpoint=_checkpoint(a), out=a.out, device=device,
                     source_info={"online": True, "model": _name(a.model), "prompts": len(prompts),
                                  "seeds": sampling.seeds, "sampling_steps": sampling.steps,
                                  "guidance": sampling.guidance_scale, "scheduler": sampling.scheduler,
                                  "buffer_tokens": a.buffer_tokens})
