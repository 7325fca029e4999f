"""Collection overhead: sampling the tiny pipeline with activation collection on vs off.

Same prompts, seeds, scheduler (DDIM), steps, guidance and batching in every variant:

* ``generate`` - the plain pipeline calls ``collect_activations`` makes, without a hook;
* ``generate + no-op hook`` - the same with a :class:`BlockHook` whose function records nothing
  (the cost of hooking alone);
* ``collect_activations`` - the real thing, writing fp16 shards of the conditional half to a fresh
  folder each time.

The tiny pipeline's UNet is very small (32 channels, 8x8 latent), so this is the worst case for the
relative overhead: per stored token the work is a copy to fp16 and a write.

    python -m benchmarks.collection_overhead [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (NO_PAUSE, Pauser, add_common_args, emit, fmt_s, interleaved, machine_line, median,
                               paired_ratio, setup_threads, spread, table)
from saeuron_core.data.collection import CollectConfig, collect_activations
from saeuron_core.hosts.diffusers import generate, set_scheduler
from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline
from saeuron_core.hosts.hooks import pipeline_hook

HOOK = "up_blocks.1.attentions.1"
PROMPTS = ["a cat on a sofa", "a dog in the park", "a red house", "a bowl of fruit", "a portrait of a woman",
           "a city street at night", "a mountain lake", "a vintage car"]


def main(argv: list[str] | None = None) -> str:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per image")
    args = parser.parse_args(argv)
    setup_threads(args)
    prompts = PROMPTS[:2] if args.quick else PROMPTS
    steps = args.steps or (2 if args.quick else 20)
    reps = args.reps or (2 if args.quick else 7)
    batch_size = 4
    pauser = Pauser(args.pause_pid) if args.pause_pid else NO_PAUSE
    out = [f"{machine_line()}\n"]
    emit(out[0])
    pipe = make_tiny_pipeline(seed=0)
    config = CollectConfig(hook_point=HOOK, steps=steps, guidance_scale=7.5, scheduler="ddim", seeds=[0],
                           batch_size=batch_size, dtype="float16")
    tmp = Path(tempfile.mkdtemp(prefix="saeuron-collect-bench-"))
    stored: dict[str, int] = {}

    def plain(hooked: bool = False):
        def run() -> None:
            set_scheduler(pipe, config.scheduler)
            for begin in range(0, len(prompts), batch_size):
                chunk = prompts[begin:begin + batch_size]
                hook = pipeline_hook(pipe, HOOK, lambda call: None) if hooked else None
                with torch.no_grad():
                    if hook is not None:
                        hook.attach()
                    try:
                        generate(pipe, chunk, [0] * len(chunk), steps=steps, guidance_scale=config.guidance_scale)
                    finally:
                        if hook is not None:
                            hook.remove()
        return run

    def collect() -> None:
        folder = tmp / f"run{len(list(tmp.iterdir()))}"
        store = collect_activations(pipe, prompts, folder, config, progress=False)
        stored["bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        stored["tokens"] = store.n_tokens
        shutil.rmtree(folder, ignore_errors=True)

    fns = {"generate": plain(), "generate + no-op hook": plain(hooked=True), "collect_activations": collect}
    try:
        with pauser:
            cpu: dict[str, list[float]] = {}
            times = interleaved(fns, reps, warmup=1, pauser=pauser, cpu=cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = median(times["generate"])
    images = len(prompts)
    rows = []
    for name in fns:
        t = median(times[name])
        ratio = "1.000" if name == "generate" else f"{paired_ratio(times, name, 'generate'):.3f}"
        cpu_ratio = "1.000" if name == "generate" else f"{paired_ratio(cpu, name, 'generate'):.3f}"
        rows.append([name, fmt_s(t), fmt_s(median(cpu[name])), fmt_s(t / images), ratio, cpu_ratio,
                     "-" if name == "generate" else fmt_s(t - base), f"{spread(times[name]):.1f}%"])
    extra = median(times["collect_activations"]) - median(times["generate + no-op hook"])
    title = (f"Collection overhead: tiny pipeline, {images} prompts x 1 seed, {steps} DDIM steps, CFG 7.5, batches of "
             f"{batch_size}, hook {HOOK}, {reps} interleaved reps")
    text = table(title, ["variant", "wall per run (median)", "process CPU per run (median)", "wall per image",
                         "wall ratio to generate (paired)", "CPU ratio to generate (paired)", "wall overhead",
                         "wall spread"], rows)
    mib = stored.get("bytes", 0) / 2 ** 20
    storing = (f"{fmt_s(extra)} per run = {mib / extra:.0f} MiB/s of stored data" if extra > 0 else
               f"{fmt_s(extra)} per run, i.e. below the noise of this run")
    text += (f"\nStored per run: {mib:.2f} MiB on disk (fp16, conditional half, every step). Cost of storing beyond "
             f"the no-op hook (median minus median): {storing}. No SAE work happens here, so the FLOP floor of the "
             f"overhead is zero; the floor is copying those bytes.\n")
    out.append(text)
    emit(text)
    return "\n".join(out)


if __name__ == "__main__":
    main()
