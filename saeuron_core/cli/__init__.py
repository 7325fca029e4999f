"""``saeuron`` command line: collect, train, info, convert, make-tiny-pipeline, learn-concept,
remove-concept, erase, inspect.

The CLI only translates arguments; the work happens in the library. A user error exits with
status 2 and one line ``error: ...``.

``collect`` and ``train`` also run under ``torchrun`` (``torchrun --nproc_per_node N -m
saeuron_core.cli train ...`` or ``torchrun --no-python ... saeuron train ...``): they join the
process group torchrun describes and split the work; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, SaeuronError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep it to one line
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_seeds(text: str) -> list[int]:
    """Seeds from the command line: "0,1,2" or the inclusive range "0-9"."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like '0,1,2' or '0-9', got {text!r}") from None


IMPORT_HOOK_HELP = "block of an imported folder that does not name it (e.g. transformer_blocks.18)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="saeuron", description="SAE concept erasure for diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("collect", help="record a block's activations while a pipeline samples prompts")
    c.add_argument("--model", required=True, help="local diffusers pipeline folder, or 'tiny[:SEED]' for a random test pipeline")
    c.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSON list")
    c.add_argument("--out", required=True, help="output folder for shards and manifest.json (resumes if present)")
    c.add_argument("--hook-point", default="up_blocks.1.attentions.1", help="diffusers module path to record")
    c.add_argument("--model-family", default="", help="e.g. sd1, sd2, sdxl (stored with the activations)")
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--guidance", type=float, default=7.5)
    c.add_argument("--scheduler", default="ddim")
    c.add_argument("--seeds", type=parse_seeds, default=[0], help="'0,1,2' or '0-9'")
    c.add_argument("--every-n-steps", type=int, default=1)
    c.add_argument("--halves", choices=["cond", "both"], default="cond")
    c.add_argument("--residual", action="store_true",
                   help="record the block's update (output minus input), for an SAE that reads residual updates")
    c.add_argument("--tokens-per-map", type=int, default=None, help="random subset of spatial tokens per map")
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--rows-per-shard", type=int, default=256)
    c.add_argument("--dtype", default="float16", help="storage dtype: float16, bfloat16 or float32")
    c.add_argument("--device", default="cpu", help="under torchrun, 'cuda' means cuda:LOCAL_RANK")
    c.add_argument("--rank", type=int, default=None,
                   help="without torchrun: this job's share of the work (with --world-size; e.g. a SLURM array task)")
    c.add_argument("--world-size", type=int, default=None, help="without torchrun: number of jobs sharing the work")

    t = sub.add_parser("train", help="train a TopK SAE on a collected activation store (or --online)")
    t.add_argument("--store", default=None, help="folder written by 'saeuron collect' (required unless --online)")
    t.add_argument("--out", required=True, help="output .safetensors SAE file")
    t.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT + '.ckpt.safetensors'); resumes if present")
    t.add_argument("--expansion-factor", type=int, default=16)
    t.add_argument("--n-latents", type=int, default=None)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=4096,
                   help="tokens per optimizer step over all ranks (under torchrun each rank gets batch/ranks)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(n_latents / 2^14)")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--lr-end-factor", type=float, default=0.0)
    t.add_argument("--auxk-alpha", type=float, default=1 / 32)
    t.add_argument("--dead-tokens-threshold", type=int, default=10_000_000)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shuffle-shards", type=int, default=4, help="shards shuffled together")
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--device", default="cpu", help="under torchrun, 'cuda' means cuda:LOCAL_RANK")
    o = t.add_argument_group("online mode (--online: sample with the pipeline and train, no activation store)")
    o.add_argument("--online", action="store_true", help="generate activations while training instead of reading a store")
    o.add_argument("--model", default=None, help="local diffusers pipeline folder, single-file .safetensors checkpoint "
                                                 "(with --config) or 'tiny[:SEED]'")
    o.add_argument("--config", default=None, help="for a single-file checkpoint: a local diffusers pipeline folder")
    o.add_argument("--prompts", default=None, help="text file (one prompt per line) or JSON list")
    o.add_argument("--hook-point", default="up_blocks.1.attentions.1")
    o.add_argument("--model-family", default="")
    o.add_argument("--sampling-steps", type=int, default=50, help="denoising steps per generation")
    o.add_argument("--guidance", type=float, default=7.5)
    o.add_argument("--scheduler", default="ddim")
    o.add_argument("--seeds", type=parse_seeds, default=[0], help="'0,1,2' or '0-9'")
    o.add_argument("--every-n-steps", type=int, default=1)
    o.add_argument("--halves", choices=["cond", "both"], default="cond")
    o.add_argument("--residual", action="store_true", help="train on the block's update (output minus input)")
    o.add_argument("--tokens-per-map", type=int, default=None)
    o.add_argument("--height", type=int, default=None)
    o.add_argument("--width", type=int, default=None)
    o.add_argument("--gen-batch-size", type=int, default=4, help="prompts per pipeline call")
    o.add_argument("--buffer-tokens", type=int, default=2 ** 18, help="shuffling buffer size per rank (tokens)")
    o.add_argument("--dtype", default="float16", help="precision tokens are kept in (as a store would)")

    i = sub.add_parser("info", help="describe an SAE file or folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--hook-point", default=None, help=IMPORT_HOOK_HELP)

    v = sub.add_parser("convert", help="sparsify/SAeUron, SAELens or SDLens/sdxl-unbox folder -> native .safetensors")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--hook-point", default=None, help=IMPORT_HOOK_HELP)

    m = sub.add_parser("make-tiny-pipeline", help="write a random tiny SD-layout diffusers pipeline (for tries and tests)")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)

    lc = sub.add_parser("learn-concept", help="score the SAE's features for a concept and store it in the SAE file")
    lc.add_argument("sae", help="SAE file or sparsify/SAELens folder")
    lc.add_argument("--concept", help="name of the concept (replaces a concept of the same name)")
    lc.add_argument("--positive", help="prompts with the concept: text file (one per line) or JSON list")
    lc.add_argument("--negative", help="prompts without the concept: text file or JSON list")
    lc.add_argument("--library", help="instead of --concept/--positive/--negative: a JSON file "
                                      "{name: {\"positive\": [...], \"negative\": [...]}} learning every concept "
                                      "from one generation pass")
    _model_args(lc)
    lc.add_argument("--out", default=None, help="output .safetensors SAE file (default: update SAE in place; "
                                                "required for sparsify/SAELens folders)")
    lc.add_argument("--steps", type=int, default=50)
    lc.add_argument("--guidance", type=float, default=7.5)
    lc.add_argument("--scheduler", default="ddim")
    lc.add_argument("--seeds", type=parse_seeds, default=[0], help="'0,1,2' or '0-9'")
    lc.add_argument("--batch-size", type=int, default=4)
    sel = lc.add_mutually_exclusive_group()
    sel.add_argument("--top-n", type=int, default=None, help="features selected per timestep (default 3)")
    sel.add_argument("--quantile", type=float, default=None, help="select features scoring above this quantile, e.g. 0.9999")
    lc.add_argument("--min-specificity", type=float, default=None,
                    help="select only features with (m_c - m_o) / (m_c + m_o) at least this, from their mean "
                         "activations with (m_c) and without (m_o) the concept; 0 = SAeUron's selection "
                         "(default: saeuron_core.scoring.DEFAULT_MIN_SPECIFICITY)")
    lc.add_argument("--peak-specificity", type=float, default=None,
                    help="also require that specificity against the single negative prompt where the feature is "
                         "most active (keeps out features a sibling concept shares; default: not required)")
    lc.add_argument("--bucket-width", type=float, default=20.0, help="timesteps per bucket")
    lc.add_argument("--height", type=int, default=None)
    lc.add_argument("--width", type=int, default=None)
    lc.add_argument("--hook-point", default=None, help="default: the SAE's own hook point")

    rc = sub.add_parser("remove-concept", help="remove a concept from an SAE file")
    rc.add_argument("sae")
    rc.add_argument("--concept", required=True)
    rc.add_argument("--out", default=None, help="output .safetensors SAE file (default: update SAE in place)")

    e = sub.add_parser("erase", help="generate prompts without and with concepts erased; write a before/after grid")
    _model_args(e)
    e.add_argument("--sae", required=True, help="SAE file or folder with the concepts")
    e.add_argument("--concept", action="append", required=True, help="concept to erase (repeatable)")
    e.add_argument("--method", choices=["ablate", "replace"], default="ablate")
    e.add_argument("--strength", type=float, default=1.0,
                   help="ablate: gamma = -strength (0..100); replace: share of replacement (0..1)")
    e.add_argument("--start", type=float, default=0.0, help="start of the window (fraction of denoising, 0 = first step)")
    e.add_argument("--end", type=float, default=1.0, help="end of the window (fraction of denoising)")
    e.add_argument("--cfg", choices=["both", "cond", "uncond"], default="both", help="CFG halves to edit")
    e.add_argument("--min-coverage", type=float, default=0.0,
                   help="touch a concept only in images where its features fire on at least this share (0-1) of the "
                        "feature map (0: wherever they fire)")
    e.add_argument("--detect-with", action="append", default=[], metavar="CONCEPT=ENTRY",
                   help="with --min-coverage: the library entry whose features read CONCEPT's coverage (repeatable)")
    e.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one grid row each)")
    _generation_args(e)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--hook-point", default=None, help="default: the SAE's own hook point")
    e.add_argument("--out", required=True, help="output .png grid (row per prompt: before | after)")

    n = sub.add_parser("inspect", help="show which SAE features fire and where a concept is while generating a prompt")
    _model_args(n)
    n.add_argument("--sae", required=True)
    n.add_argument("--prompt", required=True)
    n.add_argument("--concept", action="append", default=[], help="concept to map (repeatable; the overlay shows the first)")
    _generation_args(n)
    n.add_argument("--top", type=int, default=10, help="features listed per step")
    n.add_argument("--hook-point", default=None, help="default: the SAE's own hook point")
    n.add_argument("--out", required=True, help="output .png: the image with the first concept's heat map")

    ev = sub.add_parser("eval", help="mini-UnlearnCanvas: UA/IRA/CRA of each erasure method on the demo model")
    ev.add_argument("--model", default=None, help="demo model folder (default: the shipped demo_assets/model)")
    ev.add_argument("--sae", action="append", default=None,
                    help="SAE with the concept library (default: the shipped demo SAEs); repeat it for SAEs on "
                         "other blocks: a concept is erased by every SAE whose library has it")
    ev.add_argument("--classifier", default=None, help="classifier folder (default: demo_assets/classifier)")
    ev.add_argument("--methods", default="none,negative_prompt,ablate,replace",
                    help="comma-separated: none, negative_prompt, ablate, replace")
    ev.add_argument("--concepts", default=None, help="comma-separated concepts (default: every object and style)")
    ev.add_argument("--seeds", type=parse_seeds, default=[1000], help="'0,1,2' or '0-9' (one image per prompt and seed)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=3.0)
    ev.add_argument("--scheduler", default="ddim")
    ev.add_argument("--ablate-strength", type=float, default=None,
                    help="gamma = -strength, for every SAE (default: 10, or the strengths chosen for the shipped SAEs)")
    ev.add_argument("--ablate-strength-at", action="append", default=[], metavar="HOOK_POINT=STRENGTH",
                    help="ablation strength of the SAE on one block (repeatable)")
    ev.add_argument("--ablate-strengths", default=None, metavar="FILE",
                    help="JSON {concept: strength}: each concept's own ablation strength, over the block's (default: "
                         "the strengths chosen for the shipped concepts when the shipped SAEs are used; '' for none)")
    ev.add_argument("--replace-strength", type=float, default=1.0)
    ev.add_argument("--replace-source", choices=["sample", "nearest", "uncond"], default="uncond",
                    help="where replacement patches come from")
    ev.add_argument("--dilation", type=int, default=1, help="grow the detection mask by this many patches")
    ev.add_argument("--neighbors", type=int, default=1,
                    help="--replace-source nearest: average this many nearest undetected patches")
    ev.add_argument("--replace-also-at", action="append", default=None, metavar="HOOK_POINT=BLOCK[,BLOCK]",
                    help="replace: also replace what the SAE at HOOK_POINT detects at these later blocks "
                         "(repeatable; default: the shipped setting with the shipped SAEs; '' for none)")
    ev.add_argument("--threshold-scale", type=float, default=1.0, help="multiply the firing thresholds")
    add_gate_args(ev)
    ev.add_argument("--gates", default=None, metavar="FILE",
                    help="JSON {concept: {\"min_coverage\": share, \"detect_with\": entry}} (default: the shipped "
                         "gates when the shipped SAEs are used; '' for none); --min-coverage-of and --detect-with "
                         "add to it")
    ev.add_argument("--window", default="0:1", help="START:END fractions of the denoising where the SAE methods act")
    ev.add_argument("--multi", default="2,4,8", help="sizes of concept sets erased at once ('' for none)")
    ev.add_argument("--generalization", default="euler_a:30",
                    help="SCHEDULER:STEPS to re-run the SAE methods with another sampler ('' for none)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--quick", action="store_true",
                    help="smoke run: one seed, 8 steps, one object and one style, no multi/generalisation runs")
    ev.add_argument("--json", default=None, help="write the full report here")
    ev.add_argument("--update", default=None, metavar="REPORT",
                    help="re-measure only --concepts and merge their rows into this earlier --json report (same "
                         "settings; needs --multi '' --generalization ''); written back to it unless --json is given")
    ev.add_argument("--markdown", default=None, help="write the tables here")
    ev.add_argument("--misread-dir", default=None, metavar="DIR",
                    help="write sheets of the misread images here: the clean run's (none.png) and each erasure's "
                         "(<method>-<concept>.png: the concept still read, then its kind's other images read "
                         "wrong), each with a .json of prompts, seeds and readings")
    return p


def add_gate_args(p: argparse.ArgumentParser) -> None:
    """``--min-coverage``, ``--min-coverage-of``, ``--detect-with`` (read back by :func:`gate_args`)."""
    p.add_argument("--min-coverage", type=float, default=0.0,
                   help="erase a concept only in images where its features fire on at least this share (0-1) of "
                        "the hooked feature map (0: everywhere they fire)")
    p.add_argument("--min-coverage-of", action="append", default=[], metavar="CONCEPT=SHARE",
                   help="one concept's own min coverage (repeatable)")
    p.add_argument("--detect-with", action="append", default=[], metavar="CONCEPT=ENTRY",
                   help="the library entry whose features read CONCEPT's coverage for the gate (repeatable; "
                        "default: its own)")


def gate_args(a: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    """``(min_coverage_of, detect_with)`` from the options :func:`add_gate_args` adds."""
    from ..assignments import parse_assignments

    return parse_assignments(a.min_coverage_of, "--min-coverage-of", "CONCEPT=SHARE", float), detect_with_arg(a)


def detect_with_arg(a: argparse.Namespace) -> dict[str, str]:
    """``--detect-with CONCEPT=ENTRY`` (repeatable) as ``{concept: entry}``."""
    from ..assignments import parse_assignments

    return parse_assignments(a.detect_with, "--detect-with", "CONCEPT=ENTRY")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local diffusers pipeline folder, single-file .safetensors "
                                                  "checkpoint (with --config), or 'tiny[:SEED]' (random test pipeline)")
    p.add_argument("--config", default=None, help="for a single-file checkpoint: a local diffusers pipeline folder "
                                                  "of the same model family giving the component configs")
    p.add_argument("--device", default="cpu")


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default=None, help="default: the pipeline's own")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def _cmd_collect(a: argparse.Namespace) -> int:
    import os

    from ..data import distributed
    from ..data.collection import CollectConfig, collect_activations, read_prompts
    from ..hosts.diffusers import load_pipeline

    config = CollectConfig(hook_point=a.hook_point, steps=a.steps, guidance_scale=a.guidance, scheduler=a.scheduler,
                           seeds=a.seeds, every_n_steps=a.every_n_steps, halves=a.halves,
                           tokens_per_map=a.tokens_per_map, height=a.height, width=a.width, batch_size=a.batch_size,
                           rows_per_shard=a.rows_per_shard, dtype=a.dtype, model=a.model, model_family=a.model_family,
                           residual=a.residual)
    config.validate()
    prompts = read_prompts(a.prompts)
    if (a.rank is None) != (a.world_size is None):
        return _fail("collect: give both --rank and --world-size, or neither")
    if a.rank is not None and distributed.launched_world_size() > 1:
        return _fail("collect: --rank/--world-size are for independent jobs; under torchrun the ranks are known")
    # Ranks only meet at the end (no GPU collectives), and may finish far apart: gloo, a long timeout.
    info, device = distributed.init_from_env(
        a.device, backend="gloo", timeout_minutes=float(os.environ.get(distributed.TIMEOUT_ENV, 24 * 60)))
    try:
        pipe = load_pipeline(a.model, device=device)
        store = collect_activations(pipe, prompts, a.out, config, rank=a.rank, world_size=a.world_size)
        if a.rank is not None:
            total = len(prompts) * len(a.seeds)
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


def _cmd_train(a: argparse.Namespace) -> int:
    from ..data import distributed
    from ..training.trainer import TrainConfig

    if a.online == (a.store is not None):
        return _fail("train: give --store STORE, or --online with --model and --prompts")
    if a.online and (a.model is None or a.prompts is None):
        return _fail("train --online: --model and --prompts are required")
    config = TrainConfig(expansion_factor=a.expansion_factor, n_latents=a.n_latents, k=a.k, batch_size=a.batch_size,
                         steps=a.steps, epochs=a.epochs if a.steps is None else None, lr=a.lr,
                         warmup_steps=a.warmup_steps, lr_end_factor=a.lr_end_factor, auxk_alpha=a.auxk_alpha,
                         dead_tokens_threshold=a.dead_tokens_threshold, grad_clip=a.grad_clip, seed=a.seed,
                         checkpoint_every=a.checkpoint_every, log_every=a.log_every)
    if not str(a.out).endswith(".safetensors"):
        return _fail(f"--out {a.out}: expected a path ending in .safetensors")
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


def _train_store(a: argparse.Namespace, config, device):
    from ..data.store import ActivationStore
    from ..training.sources import StoreSource
    from ..training.trainer import train_sae

    store = ActivationStore(a.store)
    collect_cfg = store.manifest.get("config", {})
    return train_sae(StoreSource(store, a.shuffle_shards), config, hook_point=collect_cfg.get("hook_point", ""),
                     model_family=collect_cfg.get("model_family", ""), residual=bool(collect_cfg.get("residual")),
                     checkpoint=a.checkpoint or f"{a.out}.ckpt.safetensors", out=a.out, device=device,
                     source_info={"store": str(a.store), "model": collect_cfg.get("model", ""),
                                  "tokens_in_store": store.n_tokens})


def _train_online(a: argparse.Namespace, config, device):
    from ..data.collection import CollectConfig, read_prompts
    from ..data.online import OnlineSource
    from ..hosts.diffusers import load_pipeline
    from ..training.trainer import train_sae

    sampling = CollectConfig(hook_point=a.hook_point, steps=a.sampling_steps, guidance_scale=a.guidance,
                             scheduler=a.scheduler, seeds=a.seeds, every_n_steps=a.every_n_steps, halves=a.halves,
                             tokens_per_map=a.tokens_per_map, height=a.height, width=a.width,
                             batch_size=a.gen_batch_size, dtype=a.dtype, model=a.model, model_family=a.model_family,
                             residual=a.residual)
    sampling.validate()
    prompts = read_prompts(a.prompts)
    pipe = load_pipeline(a.model, device=device, config=a.config)
    source = OnlineSource(pipe, prompts, sampling, buffer_tokens=a.buffer_tokens)
    return train_sae(source, config, hook_point=a.hook_point, model_family=a.model_family, residual=a.residual,
                     checkpoint=a.checkpoint or f"{a.out}.ckpt.safetensors", out=a.out, device=device,
                     source_info={"online": True, "model": a.model, "prompts": len(prompts), "seeds": a.seeds,
                                  "sampling_steps": a.sampling_steps, "guidance": a.guidance,
                                  "scheduler": a.scheduler, "buffer_tokens": a.buffer_tokens})


def _cmd_info(a: argparse.Namespace) -> int:
    from ..sae.files import describe

    info = describe(a.path, hook_point=a.hook_point)
    details: dict[str, str] = {}
    if info["concepts"]:
        from ..inspection import describe_concept, format_concept
        from ..sae.files import load_sae
        from ..sae.library import get_concept

        sae = load_sae(a.path, hook_point=a.hook_point)
        info["concept_details"] = {}
        for name in info["concepts"]:  # every entry was validated when the file was read
            data = get_concept(sae, name)
            info["concept_details"][name] = describe_concept(data)
            details[name] = format_concept(name, data)
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}\n  format:      {info['format']}\n  d_in:        {info['d_in']}\n"
          f"  n_latents:   {info['n_latents']}\n  k:           {info['k']}\n  dtype:       {info['dtype']}\n"
          f"  hook point:  {info['hook_point'] or '(unknown)'}"
          f"{' (reads its residual update: output - input)' if info.get('residual') else ''}\n  model:       {info['model_family'] or '(unknown)'}\n"
          f"  concepts:    {', '.join(info['concepts']) or '(none)'}")
    for name in info["concepts"]:
        print(f"    {details[name]}")
    final = info["training"].get("final") if isinstance(info["training"], dict) else None
    if final:
        print(f"  training:    {info['training'].get('steps')} steps, FVU {final.get('fvu', float('nan')):.4f}, "
              f"dead {final.get('dead_frac', 0):.3f}")
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from ..sae.files import convert

    out = convert(a.src, a.dst, hook_point=a.hook_point)
    print(f"wrote {out}")
    return 0


def _cmd_make_tiny(a: argparse.Namespace) -> int:
    from ..hosts.diffusers import make_tiny_pipeline

    out = Path(a.out)
    make_tiny_pipeline(a.seed).save_pretrained(str(out), safe_serialization=True)
    print(f"wrote a random tiny pipeline to {out}")
    return 0


def _concept_output(sae_path: str, out: Optional[str]) -> Path:
    """Where learn-/remove-concept write: ``out``, or the SAE itself when it is a native file."""
    from ..sae.files import detect_format

    fmt, resolved = detect_format(sae_path)
    if out is None:
        if fmt != "native":
            raise ConfigError(f"{sae_path} is a {fmt} folder, which is never modified; pass --out NEW.safetensors to "
                              f"write a native SAE file with the concept library")
        return resolved
    if not out.endswith(".safetensors"):
        raise ConfigError(f"--out {out}: expected a path ending in .safetensors")
    return Path(out)


def _png_out(out: str) -> Path:
    if not out.lower().endswith(".png"):
        raise ConfigError(f"--out {out}: expected a path ending in .png")
    return Path(out)


def _library_spec(a: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    """``{name: (positive, negative)}`` from --library, or from --concept/--positive/--negative."""
    from ..data.collection import read_prompts
    from ..sae.library import check_concept_name

    single = (a.concept, a.positive, a.negative)
    if a.library is None:
        if not all(single):
            raise ConfigError("give --concept, --positive and --negative (or --library with several concepts)")
        return {check_concept_name(a.concept): (read_prompts(a.positive), read_prompts(a.negative))}
    if any(single):
        raise ConfigError("--library replaces --concept/--positive/--negative; give one or the other")
    try:
        with open(a.library, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"--library {a.library}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--library {a.library}: expected a non-empty object {{name: {{positive, negative}}}}")
    spec = {}
    for name, entry in raw.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), list) and all(isinstance(p, str) for p in entry[k]) for k in ("positive", "negative"))
        if not ok:
            raise ConfigError(f"--library {a.library}: concept {name!r} needs 'positive' and 'negative' lists of prompts")
        spec[check_concept_name(name)] = (entry["positive"], entry["negative"])
    return spec


def _cmd_learn_concept(a: argparse.Namespace) -> int:
    from ..concepts.learning import learn_concepts
    from ..concepts.stats import DEFAULT_MIN_SPECIFICITY, check_selection
    from ..hosts.diffusers import load_pipeline
    from ..hosts.hooks import check_sae_fits, denoiser
    from ..inspection import format_concept
    from ..sae.files import load_sae, save_sae

    spec = _library_spec(a)
    out = _concept_output(a.sae, a.out)
    if a.min_specificity is None:
        a.min_specificity = DEFAULT_MIN_SPECIFICITY
    # Fail before loading the model and the (long) generation.
    check_selection(a.top_n, a.quantile, min_specificity=a.min_specificity, peak_specificity=a.peak_specificity)
    sae = load_sae(a.sae, device=a.device)
    pipe = load_pipeline(a.model, device=a.device, config=a.config)
    hook_point = a.hook_point or sae.config.hook_point
    if hook_point:
        check_sae_fits(denoiser(pipe), hook_point, sae)
    learned = learn_concepts(pipe, sae, spec, hook_point=hook_point, steps=a.steps, guidance_scale=a.guidance,
                             scheduler=a.scheduler, seeds=a.seeds, batch_size=a.batch_size, top_n=a.top_n,
                             quantile=a.quantile, min_specificity=a.min_specificity, bucket_width=a.bucket_width,
                             height=a.height, width=a.width, progress=sys.stderr.isatty(),
                             peak_specificity=a.peak_specificity)
    save_sae(sae, out)
    for data in learned:
        counts = data.n_selected[data.observed]
        lo, hi = int(counts.min()), int(counts.max())
        per_t = f"{lo}" if lo == hi else f"{lo}-{hi}"
        distinct = int(data.feature_ids[data.selected_mask()].unique().numel())
        print(f"learned concept {data.name!r}: {per_t} selected features per timestep ({distinct} distinct) -> {out}")
        print(f"  {format_concept(data.name, data)}")
    return 0


def _cmd_remove_concept(a: argparse.Namespace) -> int:
    from ..sae.files import load_sae, save_sae
    from ..sae.library import concept_names, remove_concept

    out = _concept_output(a.sae, a.out)
    sae = load_sae(a.sae)
    remove_concept(sae, a.concept)
    save_sae(sae, out)
    print(f"removed concept {a.concept!r}; remaining: {', '.join(concept_names(sae)) or '(none)'} -> {out}")
    return 0


def _cmd_erase(a: argparse.Namespace) -> int:
    from ..erasure.eraser import ConceptEraser
    from ..hosts.diffusers import load_pipeline
    from ..inspection import compare_erasure, erasure_grid, save_png
    from ..sae.files import load_sae

    out = _png_out(a.out)
    sae = load_sae(a.sae, device=a.device)
    options = {"start": a.start, "end": a.end, "cfg": a.cfg, "min_coverage": a.min_coverage,
               "detect_with": detect_with_arg(a)}
    ConceptEraser(sae, a.concept, a.method, strength=a.strength, **options)  # bad options fail before the model loads
    pipe = load_pipeline(a.model, device=a.device, config=a.config)
    pairs = compare_erasure(pipe, sae, a.concept, a.prompt, method=a.method, strength=a.strength, seed=a.seed,
                            steps=a.steps, guidance_scale=a.guidance, scheduler=a.scheduler, height=a.height,
                            width=a.width, batch_size=a.batch_size, hook_point=a.hook_point, **options)
    grid = erasure_grid(pairs, a.prompt)
    save_png(grid, out)
    print(f"wrote {len(pairs)} before/after pairs ({grid.width}x{grid.height} px, erased: {', '.join(a.concept)}, "
          f"{a.method} strength {a.strength:g}) -> {out}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from ..hosts.diffusers import load_pipeline
    from ..inspection import inspect
    from ..sae.files import load_sae
    from ..sae.library import get_concept

    out = _png_out(a.out)
    sae = load_sae(a.sae, device=a.device)
    for name in a.concept:
        get_concept(sae, name)  # unknown names fail before the model loads
    pipe = load_pipeline(a.model, device=a.device, config=a.config)
    result = inspect(pipe, sae, a.prompt, concepts=a.concept, steps=a.steps, guidance_scale=a.guidance, seed=a.seed,
                     scheduler=a.scheduler, hook_point=a.hook_point, top=a.top, height=a.height, width=a.width)
    concept = a.concept[0] if a.concept else None
    result.save_overlay(out, concept)
    print(result.summary())
    what = f"heat map of {concept!r}" if concept else "image (no concept given)"
    print(f"wrote {what} -> {out}")
    return 0


def _demo_asset(given: Optional[str], name: str) -> str:
    if given:
        return given
    from ..demo.assets import ASSETS

    path = ASSETS / name
    if not path.exists():
        raise ConfigError(f"no shipped demo asset {path}; pass its path explicitly")
    return str(path)


def _concept_strengths(path: str) -> dict[str, float]:
    """``--ablate-strengths``: a JSON file ``{concept: strength}`` ('' for none)."""
    if not path:
        return {}
    from ..demo.evaluation import load_concept_strengths

    try:
        return load_concept_strengths(path)
    except ConfigError as e:
        raise ConfigError(f"--ablate-strengths: {e}") from None


def _gates(path: Optional[str], *, shipped: bool) -> tuple[dict[str, float], dict[str, str]]:
    """``--gates``: a JSON file of gates ('' for none; unset: the shipped gates with the shipped SAEs)."""
    from ..demo import assets
    from ..demo.evaluation import load_gates

    if path is None:
        return assets.shipped_gates() if shipped else ({}, {})
    try:
        return load_gates(path) if path else ({}, {})
    except ConfigError as e:
        raise ConfigError(f"--gates: {e}") from None


def _cmd_eval(a: argparse.Namespace) -> int:
    from ..demo.classifier import load_classifier
    from ..demo.evaluation import (
        EvalSettings,
        check_updatable,
        evaluate,
        format_report,
        load_report,
        save_report,
        update_report,
    )
    from ..hosts.diffusers import load_pipeline, set_scheduler
    from ..sae.files import load_sae

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else None
    try:
        multi = [int(n) for n in a.multi.split(",") if n.strip()]
        start, end = (float(v) for v in a.window.split(":"))
        gen = None
        if a.generalization:
            sched, _, steps = a.generalization.partition(":")
            gen = (sched, int(steps or 30))
    except ValueError:
        raise ConfigError("--multi takes integers like '2,4,8'; --generalization SCHEDULER:STEPS like 'euler_a:30'; "
                          "--window START:END like '0:0.5'") from None
    from ..assignments import parse_assignments
    from ..demo import assets

    at = parse_assignments(a.ablate_strength_at, "--ablate-strength-at", "HOOK_POINT=STRENGTH", float)
    (gate_of, detector_of), (own_of, own_detectors) = _gates(a.gates, shipped=not a.sae), gate_args(a)
    coverage_of, detect_with = {**gate_of, **own_of}, {**detector_of, **own_detectors}
    if a.ablate_strength is None and not a.sae and not at:  # the shipped SAEs with the strengths chosen for them
        at, of = assets.shipped_strengths()
        if a.ablate_strengths is not None:
            of = _concept_strengths(a.ablate_strengths)
    else:
        of = _concept_strengths(a.ablate_strengths or "")
    settings = EvalSettings(seeds=list(a.seeds), steps=a.steps, guidance=a.guidance, scheduler=a.scheduler,
                            ablate_strength=EvalSettings.ablate_strength if a.ablate_strength is None else a.ablate_strength,
                            ablate_strength_at=at, ablate_strength_of=of, replace_strength=a.replace_strength,
                            start=start, end=end,
                            replace_source=a.replace_source, dilation=a.dilation, threshold_scale=a.threshold_scale,
                            neighbors=a.neighbors, replace_also_at=_replace_also_at(a.replace_also_at, not a.sae),
                            min_coverage=a.min_coverage, min_coverage_of=coverage_of, detect_with=detect_with,
                            batch_size=a.batch_size)
    if a.quick:
        settings.seeds, settings.steps = settings.seeds[:1], 8
        concepts, multi, gen = concepts or ["star", "stripes"], [], None
    earlier = load_report(a.update) if a.update else None
    if earlier is not None:
        grid = earlier.get("grid") or {}  # without --concepts every concept is re-measured
        check_updatable(earlier, settings, set_runs=bool(gen), multi=bool(multi), methods=methods,
                        concepts=concepts or grid.get("objects", []) + grid.get("styles", []))
    saes = [load_sae(path) for path in a.sae] if a.sae else [load_sae(_demo_asset(None, name)) for name in assets.SAES]
    classifier = load_classifier(_demo_asset(a.classifier, "classifier"))
    pipe = load_pipeline(_demo_asset(a.model, "model"))
    set_scheduler(pipe, settings.scheduler)  # unknown names fail before anything is generated
    if gen:
        set_scheduler(pipe, gen[0])
    report = evaluate(pipe, saes, classifier, settings, methods=methods, concepts=concepts, multi=multi,
                      generalization=gen, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                      misread_dir=a.misread_dir)
    if earlier is not None:
        report = update_report(earlier, report)
    text = format_report(report)
    print(text)
    if a.json or a.update:
        save_report(report, a.json or a.update)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


def _replace_also_at(items: Optional[list[str]], shipped: bool) -> dict[str, list[str]]:
    """``--replace-also-at`` values as ``{detecting hook point: [later blocks]}`` (the shipped setting by default)."""
    from ..assignments import parse_assignments
    from ..demo.evaluation import DEMO_REPLACE_ALSO_AT

    if items is None:
        return {k: list(v) for k, v in DEMO_REPLACE_ALSO_AT.items()} if shipped else {}
    pairs = parse_assignments([i for i in items if i.strip()], "--replace-also-at", "HOOK_POINT=BLOCK[,BLOCK]")
    return {k: [b.strip() for b in v.split(",") if b.strip()] for k, v in pairs.items()}


COMMANDS = {"collect": _cmd_collect, "train": _cmd_train, "info": _cmd_info, "convert": _cmd_convert,
            "make-tiny-pipeline": _cmd_make_tiny, "learn-concept": _cmd_learn_concept,
            "remove-concept": _cmd_remove_concept, "erase": _cmd_erase, "inspect": _cmd_inspect,
            "eval": _cmd_eval}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``saeuron`` script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except SaeuronError as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(f"{exc.filename}: no such file or folder")
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
