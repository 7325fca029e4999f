"""Concept scoring at scale: ``ConceptStats.add`` time and peak memory for 1k, 10k and 100k tokens.

Codes arrive as the scoring recorder gets them from the UNet: one call per block call with the
conditional rows (4 images x 256 tokens of SD 1.5's 16x16 ``up_blocks.1`` map, k 32 of 20480
latents), half positive and half negative (two ``add`` calls). Codes are random (made outside the timing): ``add`` does
not care what they are. Time should grow linearly with tokens and memory stay flat; ``result()``
(selecting the features) is timed once at the end.

Memory: peak RSS during all the ``add`` calls minus RSS before them (``/proc/self/status`` VmHWM,
reset through ``/proc/self/clear_refs``), plus the size of the streamed statistics themselves.

    python -m benchmarks.scoring_scale [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import (NO_PAUSE, Pauser, add_common_args, emit, encode_flops, fmt_s, machine_line,
                               matmul_gflops, median, setup_threads, table)
from benchmarks.training_throughput import _status_kib, reset_peak_rss
from saeuron_core.concepts.stats import ConceptStats

TOKENS = (1_000, 10_000, 100_000)


def codes(rows: int, tokens: int, n_latents: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, tokens, k, generator=g)
    indices = torch.stack([torch.randperm(n_latents, generator=g)[:k] for _ in range(rows * tokens)])
    timesteps = torch.randint(0, 1000, (1,), generator=g).float().expand(rows).clone()
    return timesteps, values, indices.reshape(rows, tokens, k)


def run_once(total_tokens: int, n_latents: int, k: int, rows: int, per_row: int,
             pool: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float, float, float, int]:
    """(add seconds, result seconds, transient MiB, state MiB, calls) for ``total_tokens`` tokens."""
    stats = ConceptStats(n_latents)
    calls = max(1, round(total_tokens / (rows * per_row)))
    before = _status_kib("VmRSS")
    ok = reset_peak_rss()
    start = time.perf_counter()
    for i in range(calls):
        t, v, idx = pool[i % len(pool)]
        half = rows // 2  # a call of the recorder: positive prompts, then (another call) negative ones
        stats.add(True, t[:half], v[:half], idx[:half])
        stats.add(False, t[half:], v[half:], idx[half:])
    add_s = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    start = time.perf_counter()
    stats.result("bench", top_n=3)
    result_s = time.perf_counter() - start
    transient = max(peak - before, 0) / 1024 if ok and peak is not None and before is not None else float("nan")
    state = (stats.sums.numel() * stats.sums.element_size() + stats.tokens.numel() * 8) / 2 ** 20
    return add_s, result_s, transient, state, calls


def main(argv: list[str] | None = None) -> str:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    threads = setup_threads(args)
    n_latents, k = (2048, 8) if args.quick else (20480, 32)
    d_in = 64 if args.quick else 1280
    rows, per_row = 4, 256
    reps = args.reps or (1 if args.quick else 5)
    pauser = Pauser(args.pause_pid) if args.pause_pid else NO_PAUSE
    out = [f"{machine_line()}\n"]
    emit(out[0])
    pool = [codes(rows, per_row, n_latents, k, seed) for seed in range(4)]
    results: dict[int, list[tuple[float, float, float, float, int]]] = {n: [] for n in TOKENS}
    with pauser:
        gflops = matmul_gflops(*((64, 64, 1024) if args.quick else (512, 1280, 20480)))
        run_once(TOKENS[0], n_latents, k, rows, per_row, pool)  # warm-up
        for r in range(reps):
            for n in (TOKENS if r % 2 == 0 else tuple(reversed(TOKENS))):
                results[n].append(run_once(n, n_latents, k, rows, per_row, pool))
                pauser.tick()
        gflops = max(gflops, matmul_gflops(*((64, 64, 1024) if args.quick else (512, 1280, 20480))))
    line = f"measured fp32 matmul rate (SAE-encode shape): {gflops:.1f} GFLOP/s with {threads} threads\n"
    out.append(line)
    emit(line)
    rows_out = []
    base = None
    for n in TOKENS:
        rs = results[n]
        calls = rs[0][4]
        tokens = calls * rows * per_row
        add_s = median([r[0] for r in rs])
        per_token = add_s / tokens
        base = base or per_token
        encode_floor = encode_flops(tokens, d_in, n_latents) / (gflops * 1e9)
        rows_out.append([f"{n:,}", f"{tokens:,} ({calls} calls)", fmt_s(add_s), f"{per_token * 1e9:,.0f} ns",
                         f"{per_token / base:.2f}", f"{median([r[2] for r in rs]):.1f} MiB", f"{rs[0][3]:.1f} MiB",
                         fmt_s(median([r[1] for r in rs])), fmt_s(encode_floor),
                         f"{100 * add_s / encode_floor:.2f}%"])
    title = (f"Concept scoring at scale: ConceptStats.add, {n_latents} latents, k {k}, calls of {rows} rows x "
             f"{per_row} tokens, median of {reps}")
    headers = ["tokens per concept", "tokens added", "add() total", "per token", "per token vs 1k",
               "add() transient peak RSS", "statistics (state)", "result()", "SAE encode floor, same tokens",
               "add() / encode floor"]
    text = table(title, headers, rows_out)
    out.append(text)
    emit(text)
    return "\n".join(out)


if __name__ == "__main__":
    main()
