"""``saeuron`` command line: collect, train, info, convert, make-tiny-pipeline.

The CLI only translates arguments; the work happens in the library. A user error exits with
status 2 and one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import SaeuronError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep it to one line
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _seeds(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like '0,1,2' or '0-9', got {text!r}") from None


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
    c.add_argument("--seeds", type=_seeds, default=[0], help="'0,1,2' or '0-9'")
    c.add_argument("--every-n-steps", type=int, default=1)
    c.add_argument("--halves", choices=["cond", "both"], default="cond")
    c.add_argument("--tokens-per-map", type=int, default=None, help="random subset of spatial tokens per map")
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--rows-per-shard", type=int, default=256)
    c.add_argument("--dtype", default="float16", help="storage dtype: float16, bfloat16 or float32")
    c.add_argument("--device", default="cpu")

    t = sub.add_parser("train", help="train a TopK SAE on a collected activation store")
    t.add_argument("--store", required=True, help="folder written by 'saeuron collect'")
    t.add_argument("--out", required=True, help="output .safetensors SAE file")
    t.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT + '.ckpt.safetensors'); resumes if present")
    t.add_argument("--expansion-factor", type=int, default=16)
    t.add_argument("--n-latents", type=int, default=None)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=4096)
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
    t.add_argument("--device", default="cpu")

    i = sub.add_parser("info", help="describe an SAE file or folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("convert", help="sparsify/SAeUron or SAELens folder -> native .safetensors")
    v.add_argument("src")
    v.add_argument("dst")

    m = sub.add_parser("make-tiny-pipeline", help="write a random tiny SD-layout diffusers pipeline (for tries and tests)")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    return p


def _cmd_collect(a: argparse.Namespace) -> int:
    from .collection import CollectConfig, collect_activations, read_prompts
    from .pipelines import load_pipeline

    config = CollectConfig(hook_point=a.hook_point, steps=a.steps, guidance_scale=a.guidance, scheduler=a.scheduler,
                           seeds=a.seeds, every_n_steps=a.every_n_steps, halves=a.halves,
                           tokens_per_map=a.tokens_per_map, height=a.height, width=a.width, batch_size=a.batch_size,
                           rows_per_shard=a.rows_per_shard, dtype=a.dtype, model=a.model, model_family=a.model_family)
    config.validate()
    prompts = read_prompts(a.prompts)
    pipe = load_pipeline(a.model, device=a.device)
    store = collect_activations(pipe, prompts, a.out, config)
    print(f"collected {store.n_rows} maps, {store.n_tokens} tokens of {store.d_in} channels "
          f"in {len(store.shards)} shards -> {a.out}")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from .store import ActivationStore
    from .training import StoreSource, TrainConfig, train_sae

    store = ActivationStore(a.store)
    config = TrainConfig(expansion_factor=a.expansion_factor, n_latents=a.n_latents, k=a.k, batch_size=a.batch_size,
                         steps=a.steps, epochs=a.epochs if a.steps is None else None, lr=a.lr,
                         warmup_steps=a.warmup_steps, lr_end_factor=a.lr_end_factor, auxk_alpha=a.auxk_alpha,
                         dead_tokens_threshold=a.dead_tokens_threshold, grad_clip=a.grad_clip, seed=a.seed,
                         checkpoint_every=a.checkpoint_every, log_every=a.log_every)
    if not str(a.out).endswith(".safetensors"):
        return _fail(f"--out {a.out}: expected a path ending in .safetensors")
    collect_cfg = store.manifest.get("config", {})
    result = train_sae(StoreSource(store, a.shuffle_shards), config, hook_point=collect_cfg.get("hook_point", ""),
                       model_family=collect_cfg.get("model_family", ""),
                       checkpoint=a.checkpoint or f"{a.out}.ckpt.safetensors", out=a.out, device=a.device,
                       source_info={"store": str(a.store), "model": collect_cfg.get("model", ""),
                                    "tokens_in_store": store.n_tokens})
    final = result.sae.training_summary["final"]
    print(f"trained {result.sae.n_latents} latents (k={result.sae.k}) for {config.steps or 'epochs'} steps: "
          f"FVU {final.get('fvu', float('nan')):.4f}, L0 {final.get('l0', 0):.1f}, "
          f"dead {final.get('dead_frac', 0):.3f} -> {a.out}")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .formats import describe

    info = describe(a.path)
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}\n  format:      {info['format']}\n  d_in:        {info['d_in']}\n"
          f"  n_latents:   {info['n_latents']}\n  k:           {info['k']}\n  dtype:       {info['dtype']}\n"
          f"  hook point:  {info['hook_point'] or '(unknown)'}\n  model:       {info['model_family'] or '(unknown)'}\n"
          f"  concepts:    {', '.join(info['concepts']) or '(none)'}")
    final = info["training"].get("final") if isinstance(info["training"], dict) else None
    if final:
        print(f"  training:    {info['training'].get('steps')} steps, FVU {final.get('fvu', float('nan')):.4f}, "
              f"dead {final.get('dead_frac', 0):.3f}")
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from .formats import convert

    out = convert(a.src, a.dst)
    print(f"wrote {out}")
    return 0


def _cmd_make_tiny(a: argparse.Namespace) -> int:
    from .pipelines import make_tiny_pipeline

    out = Path(a.out)
    make_tiny_pipeline(a.seed).save_pretrained(str(out), safe_serialization=True)
    print(f"wrote a random tiny pipeline to {out}")
    return 0


COMMANDS = {"collect": _cmd_collect, "train": _cmd_train, "info": _cmd_info, "convert": _cmd_convert,
            "make-tiny-pipeline": _cmd_make_tiny}


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
