"""SAE training throughput: saeuron's training step vs EleutherAI sparsify vs SAELens, side by side.

Identical random activations (a planted sparse dictionary plus noise, d_in 1280), 16x expansion
(20480 latents), k 32, batches of 4096 tokens, Adam, the same LR schedule (linear warm-up then linear
decay to 0 over the run, base LR sparsify's ``2e-4 / sqrt(n_latents / 2**14)``). Every library does
its own step as its trainer does it; steps are interleaved (one step of each library per round), so
all of them see the same batches in the same order and the same machine noise.

Reported: tokens/s (median over the timed steps), the transient memory of a step (peak RSS during the
step minus RSS before it, from ``/proc/self/status`` VmHWM reset through ``/proc/self/clear_refs``),
and the FVU after the same number of tokens (last training batch, and a held-out batch).

    python -m benchmarks.training_throughput [--quick] [--steps N] [--warmup N]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from typing import Any, Callable, Optional

import torch

from benchmarks.common import (NO_PAUSE, Pauser, add_common_args, emit, encode_flops, fmt_s, machine_line,
                               matmul_gflops, median, paired_ratio, setup_threads, spread, table, timed)
from saeuron_core.sae.model import SAEConfig, TopKSAE, auto_lr
from saeuron_core.training.step import TrainStep
from saeuron_core.training.trainer import TrainConfig, geometric_median, lr_at, make_optimizer

# -- memory -------------------------------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_memory(fn: Callable[[], Any]) -> tuple[float, Optional[float]]:
    """(seconds, transient MiB): peak RSS during ``fn`` minus RSS before it."""
    before = _status_kib("VmRSS")
    ok = reset_peak_rss()
    seconds = timed(fn)
    peak = _status_kib("VmHWM")
    if not ok or before is None or peak is None:
        return seconds, None
    return seconds, max(peak - before, 0) / 1024


# -- data -----------------------------------------------------------------------------------------

def make_data(tokens: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Tokens that an SAE can learn: 8 of 4*d_in unit atoms per token (exp. weights) plus noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d_in, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    ids = torch.randint(atoms.shape[0], (tokens, 8), generator=g)
    weights = torch.empty(tokens, 8).exponential_(generator=g)
    x = torch.nn.functional.embedding_bag(ids, atoms, per_sample_weights=weights, mode="sum")
    return x + 0.05 * torch.randn(tokens, d_in, generator=g) + 0.5


def fvu_of(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# -- the contenders -------------------------------------------------------------------------------

class Trainer:
    name = ""
    version = ""
    sae: torch.nn.Module
    opt: torch.optim.Optimizer

    def step(self, x: torch.Tensor) -> float:
        """One training step; returns the batch FVU (before the step's update)."""
        raise NotImplementedError

    def recon(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def held_tensors(self) -> list[torch.Tensor]:
        """What the trainer keeps between steps: parameters, gradients, optimizer state (and its buffers)."""
        params = list(self.sae.parameters())
        state = [v for p in params for v in self.opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return params + [p.grad for p in params if p.grad is not None] + state


def held_mib(tensors: list[torch.Tensor]) -> float:
    """Total size of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2 ** 20


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class Saeuron(Trainer):
    """``saeuron_core.training.TrainStep`` with the SAE, optimizer and state ``train_sae`` builds."""

    def __init__(self, first: torch.Tensor, n_latents: int, k: int, total: int, warmup: int,
                 select_dtype: str = "auto") -> None:
        self.config = TrainConfig(n_latents=n_latents, k=k, batch_size=first.shape[0], steps=total,
                                  warmup_steps=warmup, select_dtype=select_dtype)
        torch.manual_seed(0)
        self.sae = TopKSAE(SAEConfig(d_in=first.shape[1], n_latents=n_latents, k=k))
        self.base_lr = auto_lr(n_latents)
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(first, self.config.geometric_median_iters))
        self.sae.train()
        self.opt = make_optimizer(self.sae, self.base_lr)
        self.train_step = TrainStep(self.sae, self.opt, torch.zeros(n_latents, dtype=torch.int64), self.config)
        selected = str(self.train_step.select_dtype).replace("torch.", "")
        self.name = f"saeuron TrainStep ({selected} selection{', auto' if select_dtype == 'auto' else ''})"
        self.version = _version("comfyui-saeuron")
        self.total, self.warmup, self.i = total, warmup, 0

    def step(self, x: torch.Tensor) -> float:
        metrics = self.train_step(x, lr_at(self.i, self.total, self.base_lr, self.warmup, 0.0))
        self.i += 1
        return metrics["fvu"]

    def recon(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sae(x)

    def held_tensors(self) -> list[torch.Tensor]:
        return super().held_tensors() + self.train_step.buffers


def linear_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """transformers' ``get_linear_schedule_with_warmup`` (sparsify's schedule), for every library."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, warmup, total)


class Sparsify(Trainer):
    """EleutherAI sparsify's ``SparseCoder`` forward + backward + Adam step, as its ``Trainer`` does it."""

    def __init__(self, first: torch.Tensor, n_latents: int, k: int, total: int, warmup: int) -> None:
        # sparsify picks its Triton decoder whenever triton imports, even with no GPU; on CPU it must
        # use its eager embedding_bag decoder (its own switch).
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        self.name, self.version = "eai-sparsify SparseCoder", _version("eai-sparsify")
        torch.manual_seed(0)
        self.sae = SparseCoder(first.shape[1], SparseCoderConfig(num_latents=n_latents, k=k), device="cpu",
                               dtype=torch.float32)
        with torch.no_grad():
            self.sae.b_dec.data = first.mean(0)  # sparsify's trainer: b_dec = batch mean at step 0
        lr = 2e-4 / (n_latents / 2 ** 14) ** 0.5
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)  # its fallback without bitsandbytes
        self.sched = linear_schedule(self.opt, warmup, total)
        self.since_fired = torch.zeros(n_latents, dtype=torch.long)
        self.dead_threshold = 10_000_000

    def step(self, x: torch.Tensor) -> float:
        self.sae.set_decoder_norm_to_unit_norm()
        did_fire = torch.zeros(self.sae.num_latents, dtype=torch.bool)
        out = self.sae(x, dead_mask=None)  # its default auxk_alpha = 0 passes no dead mask
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[did_fire] = 0
        return float(out.fvu.detach())

    def recon(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sae(x).sae_out


class SAELens(Trainer):
    """SAELens' ``TopKTrainingSAE.training_forward_pass`` + backward + clip + Adam, as ``SAETrainer._train_step``."""

    def __init__(self, first: torch.Tensor, n_latents: int, k: int, total: int, warmup: int) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        self.name, self.version = "SAELens TopKTrainingSAE", _version("sae-lens")
        self.TrainStepInput = TrainStepInput
        torch.manual_seed(0)
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=first.shape[1], d_sae=n_latents, k=k,
                                                         dtype="float32", device="cpu"))
        with torch.no_grad():
            # SAELens 6 starts b_dec at zero; the data here have a non-zero mean, so it starts where
            # sparsify does (the batch mean) to compare like with like.
            self.sae.b_dec.copy_(first.mean(0))
        lr = 2e-4 / (n_latents / 2 ** 14) ** 0.5
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=(0.9, 0.999))
        self.sched = linear_schedule(self.opt, warmup, total)
        self.since_fired = torch.zeros(n_latents)
        self.dead_window = 1000  # SAELens' default dead_feature_window (in steps)
        self.i = 0

    def step(self, x: torch.Tensor) -> float:
        self.sae.train()
        out = self.sae.training_forward_pass(self.TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=self.since_fired > self.dead_window,
            n_training_steps=self.i, is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.i += 1
        return fvu_of(x, out.sae_out.detach())

    def recon(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.sae.eval()
            return self.sae(x)


def contenders(first: torch.Tensor, n_latents: int, k: int, total: int, warmup: int,
               notes: list[str]) -> list[Trainer]:
    made: list[Trainer] = [Saeuron(first, n_latents, k, total, warmup)]
    if made[0].train_step.select_dtype != torch.float32:  # the exact-selection variant, for comparison
        made.append(Saeuron(first, n_latents, k, total, warmup, select_dtype="float32"))
    for cls, dist in ((Sparsify, "eai-sparsify"), (SAELens, "sae-lens")):
        try:
            made.append(cls(first, n_latents, k, total, warmup))
        except ImportError as exc:
            notes.append(f"{dist} is not installed ({exc}); install the benchmark extra: pip install -e '.[bench]'")
    return made


def main(argv: list[str] | None = None) -> str:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per library")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per library before timing")
    args = parser.parse_args(argv)
    threads = setup_threads(args)
    if args.quick:
        d_in, expansion, k, batch = 64, 16, 8, 256
    else:
        d_in, expansion, k, batch = 1280, 16, 32, 4096
    n_latents = d_in * expansion
    warm = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or args.reps or (2 if args.quick else 6)
    total = warm + steps
    pauser = Pauser(args.pause_pid) if args.pause_pid else NO_PAUSE
    out = [f"{machine_line()}\n"]
    emit(out[0])
    data = make_data(batch * (total + 1), d_in)
    batches, held_out = data[: batch * total].split(batch), data[batch * total:]
    notes: list[str] = []
    shape = (64, 64, 1024) if args.quick else (512, 1280, 20480)
    with pauser:
        gflops = matmul_gflops(*shape)
        bf16_gflops = matmul_gflops(*shape, dtype=torch.bfloat16)
        trainers = contenders(batches[0], n_latents, k, total, max(1, total // 4), notes)
        times: dict[str, list[float]] = {t.name: [] for t in trainers}
        mem: dict[str, list[float]] = {t.name: [] for t in trainers}
        fvus: dict[str, float] = {}
        for i, x in enumerate(batches):
            order = trainers[i % len(trainers):] + trainers[:i % len(trainers)]
            for t in order:
                box: dict[str, float] = {}
                seconds, mib = step_memory(lambda: box.setdefault("fvu", t.step(x)))
                fvus[t.name] = box["fvu"]
                if i >= warm:
                    times[t.name].append(seconds)
                    if mib is not None:
                        mem[t.name].append(mib)
                pauser.tick()
            print(f"  step {i + 1}/{total} done", file=sys.stderr, flush=True)
        held = {t.name: fvu_of(held_out, t.recon(held_out)) for t in trainers}
        gflops = max(gflops, matmul_gflops(*shape))
        bf16_gflops = max(bf16_gflops, matmul_gflops(*shape, dtype=torch.bfloat16))
    line = (f"measured matmul rate (SAE-encode shape {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}, best of 7, "
            f"before and after): fp32 {gflops:.1f} GFLOP/s, bf16 {bf16_gflops:.1f} GFLOP/s with {threads} threads\n")
    out.append(line)
    emit(line)
    # The floor is the forward encode matmul (the backward is sparse), at each precision's measured rate.
    floor_fp32 = encode_flops(batch, d_in, n_latents) / (gflops * 1e9)
    floor_bf16 = encode_flops(batch, d_in, n_latents) / (bf16_gflops * 1e9)
    ref = next((t.name for t in trainers if t.name.startswith("eai-sparsify")), None)
    rows = []
    for t in trainers:
        s = median(times[t.name])
        vs = f"{paired_ratio(times, ref, t.name):.2f}x" if ref else "n/a"
        rows.append([f"{t.name} {t.version}", f"{batch / s:,.0f}", fmt_s(s), vs,
                     f"{median(mem[t.name]):,.0f} MiB" if mem[t.name] else "n/a",
                     f"{held_mib(t.held_tensors()):,.0f} MiB", f"{fvus[t.name]:.4f}", f"{held[t.name]:.4f}",
                     f"{s / floor_fp32:.2f}x", f"{s / floor_bf16:.2f}x", f"{spread(times[t.name]):.0f}%"])
    title = (f"SAE training throughput: d_in {d_in}, {n_latents} latents (x{expansion}), k {k}, batch {batch} tokens, "
             f"Adam, linear warm-up {max(1, total // 4)} + decay over {total} steps; {warm} untimed + {steps} timed "
             f"steps per library, interleaved")
    headers = ["library / step", "tokens/s", "median step", "speed vs sparsify (paired)", "step transient memory",
               "held between steps", f"batch FVU at step {total}", f"held-out FVU after {total * batch} tokens",
               "step / fp32 floor", "step / bf16 floor", "spread"]
    text = table(title, headers, rows)
    text += (f"\nFloor: one forward encode matmul ({encode_flops(batch, d_in, n_latents) / 1e9:.2f} GFLOP) at the "
             f"measured rate: fp32 {fmt_s(floor_fp32)} per step = {batch / floor_fp32:,.0f} tokens/s, bf16 "
             f"{fmt_s(floor_bf16)} = {batch / floor_bf16:,.0f} tokens/s; a TopK step needs at least that (its "
             f"backward is sparse: O(batch x k x d_in)).\n")
    for note in notes:
        text += f"\nNote: {note}\n"
    out.append(text)
    emit(text)
    return "\n".join(out)


if __name__ == "__main__":
    main()
