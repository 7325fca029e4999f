"""Run every benchmark (each in its own process) and print their tables; ``--out FILE`` also writes them.

    python -m benchmarks.run_all [--quick] [--threads N] [--pause-pid PID] [--out results.md] [--only a,b]

Benchmarks: eraser_overhead, training_throughput, scoring_scale, collection_overhead. Every table
carries its physical floor (the SAE encode/decode FLOPs over the fp32 matmul rate measured in the
same run) and how far the measurement is from it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_model

BENCHMARKS = ("eraser_overhead", "training_throughput", "scoring_scale", "collection_overhead")
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pause-pid", type=int, default=None)
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--out", default=None, help="also write the combined Markdown here")
    args, extra = parser.parse_known_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    common = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--pause-pid", str(args.pause_pid)] if args.pause_pid else []) + extra
    report = [f"# Benchmark run {time.strftime('%Y-%m-%d %H:%M:%S')} on {cpu_model()}, command: "
              f"python -m benchmarks.run_all {' '.join(argv if argv is not None else sys.argv[1:])}\n"]
    print(report[0], flush=True)
    failed = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in chosen:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *common]
        header = f"## {name}\n\n`{' '.join(['python', '-m', f'benchmarks.{name}', *common])}`\n"
        print(header, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        took = time.perf_counter() - start
        body = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith(("Requested to load",
                                                                                             "Loading 1 new model",
                                                                                             "Triton disabled")))
        print(body, flush=True)
        print(f"({name}: {took:.0f} s, exit {proc.returncode})\n", flush=True)
        report += [header, body, f"({name}: {took:.0f} s, exit {proc.returncode})\n"]
        if proc.returncode:
            failed.append(name)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n", encoding="utf-8")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
