"""Shared helpers: thread setup, machine description, interleaved timing, fp32 matmul rate, tables,
and pausing a background process while measuring."""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch


_TEST_HOST: list[ModuleType] = []


def comfy_test_host() -> ModuleType:
    """``tests/comfy_host.py``: the real ComfyUI host the tests use (ComfyUI 0.3.64 in ``.hosts/``, set up by
    ``scripts/setup_env.sh test``), loaded by path once (``tests/`` is not a package)."""
    if not _TEST_HOST:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "comfy_host", Path(__file__).resolve().parents[1] / "tests" / "comfy_host.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TEST_HOST.append(module)
    return _TEST_HOST[0]


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the script works in seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 with --quick, else 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--pause-pid", type=int, default=None,
                        help="SIGSTOP this process while measuring (resumed between sections and at exit)")
    return parser


def setup_threads(args: argparse.Namespace) -> int:
    threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(threads)
    return threads


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu_model()}, {cores} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, python {platform.python_version()}")


# -- pausing a background process (e.g. a long training run) while measuring -----------------------

class Pauser:
    """SIGSTOP ``pid`` while measuring; never keeps it stopped longer than ``max_pause_s`` in one go.

    :meth:`tick` between samples gives the process ``breather_s`` of CPU when the current pause is
    too long. It is always resumed on :meth:`resume`, at exit and on SIGINT/SIGTERM.
    """

    def __init__(self, pid: Optional[int], max_pause_s: float = 480.0, breather_s: float = 15.0) -> None:
        self.pid, self.max_pause_s, self.breather_s = pid, max_pause_s, breather_s
        self.since: Optional[float] = None
        if pid is not None:
            atexit.register(self.resume)
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(sig)

                def handler(signum, frame, previous=previous):
                    self.resume()
                    if callable(previous):
                        previous(signum, frame)
                    raise SystemExit(128 + signum)
                signal.signal(sig, handler)

    def _send(self, sig: int) -> bool:
        try:
            os.kill(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def pause(self) -> None:
        if self.pid is not None and self.since is None and self._send(signal.SIGSTOP):
            self.since = time.monotonic()

    def resume(self) -> None:
        if self.pid is not None and self.since is not None:
            self._send(signal.SIGCONT)
            self.since = None

    def tick(self) -> None:
        if self.since is not None and time.monotonic() - self.since > self.max_pause_s:
            self.resume()
            time.sleep(self.breather_s)
            self.pause()

    def __enter__(self) -> "Pauser":
        self.pause()
        return self

    def __exit__(self, *exc) -> None:
        self.resume()


NO_PAUSE = Pauser(None)


# -- timing ---------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], cpu: Optional[list[float]] = None) -> float:
    """Wall seconds of ``fn()``; appends this process's CPU seconds (all threads) to ``cpu`` if given."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return wall


def interleaved(fns: dict[str, Callable[[], object]], reps: int, *, warmup: int = 1,
                pauser: Pauser = NO_PAUSE, log: bool = False,
                cpu: Optional[dict[str, list[float]]] = None) -> dict[str, list[float]]:
    """Time every variant ``reps`` times, round-robin (the order rotates each round).

    Returns wall seconds; ``cpu`` (if given) is filled with the process CPU seconds of the same
    samples, which other processes competing for the cores inflate much less than wall time.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            pauser.tick()
    times: dict[str, list[float]] = {name: [] for name in names}
    if cpu is not None:
        cpu.update({name: [] for name in names})
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(fns[name], None if cpu is None else cpu[name]))
            pauser.tick()
            if log:
                print(f"  round {r + 1}/{reps} {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``time[name] / time[base]`` within the same round (robust to drift)."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def best_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """``min(time[name]) / min(time[base])``: other processes only ever slow a sample down."""
    return min(times[name]) / min(times[base])


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, as a percentage: how noisy the samples were."""
    m = median(values)
    return 100.0 * (max(values) - min(values)) / m if m else 0.0


def matmul_gflops(n: int = 512, d: int = 1280, m: int = 20480, reps: int = 7,
                  dtype: torch.dtype = torch.float32) -> float:
    """Measured ``[n, d] @ [d, m]`` rate (GFLOP/s) in ``dtype`` (fp32 by default), the shape of an SAE encode.

    The fastest of ``reps`` runs: other processes only ever slow a run down, so the fastest is the
    closest to what the cores can do. Scripts measure it before and after their timings and keep the
    higher rate.
    """
    a, w = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    with torch.no_grad():
        for _ in range(2):
            torch.nn.functional.linear(a, w)
        best = min(timed(lambda: torch.nn.functional.linear(a, w)) for _ in range(reps))
    return 2.0 * n * d * m / best / 1e9


def encode_flops(tokens: int, d_in: int, n_latents: int) -> float:
    return 2.0 * tokens * d_in * n_latents


def sparse_decode_flops(tokens: int, d_in: int, k: int) -> float:
    return 2.0 * tokens * k * d_in


# -- tables ---------------------------------------------------------------------------------------

def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table under a ``### title`` line."""
    cells = [[str(c) for c in row] for row in rows]
    out = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(out) + "\n"


def emit(text: str) -> None:
    print(text, flush=True)


def fmt_s(seconds: float) -> str:
    if seconds < 0:
        return "-" + fmt_s(-seconds)
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"
