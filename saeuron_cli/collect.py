"""``saeuron collect``: record a block's activations while a pipeline samples prompts (an activation store).

Its sampling options are :class:`~saeuron_core.data.collection.CollectConfig` fields; ``train --online``
takes the same ones (:func:`sampling_fields`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Mapping, Optional

from saeuron_core.errors import ConfigError

from .common import SEEDS_HELP, load_model, parse_seeds
from .fields import Fields

if TYPE_CHECKING:
    from saeuron_core.data.collection import CollectConfig

NAME = "collect"
DEFAULT_HOOK_POINT = "up_blocks.1.attentions.1"
#: the CollectConfig fields a pipeline samples with, as collect and train --online both take them
SAMPLING = ("hook_point", "model_family", "steps", "guidance_scale", "scheduler", "seeds", "every_n_steps", "halves",
            "residual", "tokens_per_map", "height", "width", "batch_size", "dtype")
HELP = {"hook_point": "diffusers module path to record",
        "model_family": "e.g. sd1, sd2, sdxl (stored with the activations)",
        "residual": "record the block's update (output minus input), for an SAE that reads residual updates",
        "tokens_per_map": "random subset of spatial tokens per map",
        "dtype": "storage dtype: float16, bfloat16 or float32"}


def sampling_fields(names: tuple[str, ...] = SAMPLING, *, flags: Optional[Mapping[str, str]] = None,
                    help: Optional[Mapping[str, Optional[str]]] = None) -> Fields[CollectConfig]:
    """The sampling options (:data:`SAMPLING`, or ``names``) of :class:`CollectConfig`, with the ``flags`` and
    ``help`` of the command that takes them."""
    from saeuron_core.data.collection import CollectConfig

    return Fields(CollectConfig, names, flags={"guidance_scale": "--guidance", **(flags or {})},
                  help={"seeds": SEEDS_HELP, **(help or {})}, types={"seeds": parse_seeds},
                  defaults={"hook_point": DEFAULT_HOOK_POINT})


def collect_fields() -> Fields[CollectConfig]:
    """collect's :class:`CollectConfig` options: the sampling ones and ``--rows-per-shard``."""
    names = SAMPLING[:SAMPLING.index("dtype")] + ("rows_per_shard", "dtype")
    return sampling_fields(names, help=HELP)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``collect`` and its options."""
    c = sub.add_parser(NAME, help="record a block's activations while a pipeline samples prompts")
    c.add_argument("--model", required=True, help="local diffusers pipeline folder")
    c.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSON list")
    c.add_argument("--out", required=True, help="output folder for shards and manifest.json (resumes if present)")
    collect_fields().add_to(c)
    c.add_argument("--device", default="cpu", help="under torchrun, 'cuda' means cuda:LOCAL_RANK")
    c.add_argument("--rank", type=int, default=None,
                   help="without torchrun: this job's share of the work (with --world-size; e.g. a SLURM array task)")
    c.add_argument("--world-size", type=int, default=None, help="without torchrun: number of jobs sharing the work")


def run(a: argparse.Namespace) -> int:
    """Collect the activations into the store ``--out`` (resuming it), alone, as one of ``--world-size`` jobs
    or under torchrun."""
    import os

    from saeuron_core.data import distributed
    from saeuron_core.data.collection import collect_activations, read_prompts

    config = collect_fields().build(a, model=a.model)
    config.validate()
    prompts = read_prompts(a.prompts)
    if (a.rank is None) != (a.world_size is None):
        raise ConfigError("collect: give both --rank and --world-size, or neither")
    if a.rank is not None and distributed.launched_world_size() > 1:
        raise ConfigError("collect: --rank/--world-size are for independent jobs; under torchrun the ranks are known")
    # Ranks only meet at the end (no GPU collectives), and may finish far apart: gloo, a long timeout.
    info, device = distributed.init_from_env(
        a.device, backend="gloo", timeout_minutes=float(os.environ.get(distributed.TIMEOUT_ENV, 24 * 60)))
    try:
        pipe = load_model(a.model, device=device)
        store = collect_activations(pipe, prompts, a.out, config, rank=a.rank, world_size=a.world_size)
        if a.rank is not None:
            total = len(prompts) * len(config.seeds)
            state = "complete" if store.complete else f"{store.manifest['items_done']} of {total} items so far"
            print(f"rank {a.rank} of {a.world_size} done; store {state}: {store.n_rows} maps in "
                  f"{len(store.shards)} shards -> {a.out}")
        elif info.is_main:
            ranks = f" by {info.world_size} ranks" if info.world_size > 1 else ""
            print(f"collected {store.n_rows} maps, {store.n_tokens} tokens of {store.d_in} channels "
                  f"in {len(store.shards)} shards{ranks} -> {a.out}")
    finally:
        distributed.shutdown()
    return 0
