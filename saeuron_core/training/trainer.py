"""TopK SAE training on streamed activations.

Loss ``FVU + auxk_alpha * AuxK`` (AuxK: the top ``d_in // 2`` pre-activations of dead latents
predict the residual), ``b_dec`` initialised to the geometric median of the first batch,
decoder rows renormalised before every batch with the gradient's parallel component removed
before every step, linear warm-up then linear decay, gradient-norm clipping, Adam. The step
(:class:`TrainStep`) has one dense matmul, the encoder's, used only to select latents; everything
after it, gradients included, is computed on the selected (token, latent) pairs. Checkpoints
(one safetensors file, written atomically) hold everything needed to continue bit-for-bit:
the data stream is a pure function of the seed and the step.

Under ``torchrun`` (an initialised ``torch.distributed`` group of ``W`` ranks) ``batch_size`` is
the *global* batch: the stream of global batches is the one a single process would read, and
rank ``r`` trains on rows ``[r * B, (r + 1) * B)`` of each (``B = batch_size / W``). Everything
global is computed globally, so ``W`` ranks with ``B`` rows each take the same steps as one
process with ``W * B`` rows, up to float summation order: the FVU denominator (variance around
the global batch mean), the loss numerators and L0 are sums all-reduced over ranks; gradients
are all-reduced (summed, as the loss is a global sum divided by the global variance) in one
flat buffer before the decoder-parallel projection and clipping; which latents fired is
all-reduced, so dead-latent counters are identical on every rank; ``b_dec`` is the geometric
median of the first global batch, computed on rank 0 and broadcast; the LR schedule counts
global steps, i.e. global tokens. Rank 0 alone writes checkpoints and shows progress;
checkpoints hold only global state, so a run can resume with another number of ranks.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import distributed
from ..data.distributed import rank_rows
from ..errors import ConfigError, StoreError
from ..sae.files import save_sae
from ..sae.model import SAEConfig, TopKSAE, auto_lr
from ..safetensors_io import atomic_save_safetensors, load_safetensors
from .config import TrainConfig  # defined beside the step; imported from here too
from .sources import BatchSource, Prefetch, local_batches
from .step import TrainStep, device_type

CHECKPOINT_FORMAT = "1"


@dataclass
class TrainResult:
    sae: TopKSAE
    history: list[dict[str, float]] = field(default_factory=list)
    #: tokens since each latent last fired (global: the same on every rank), at the end of training
    tokens_since_fired: Optional[Tensor] = None
    #: global tokens per second over this call's training steps (data loading included; setup and checkpoint
    #: writes not)
    tokens_per_second: Optional[float] = None


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points``."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * median.norm().clamp_min(1e-12):
            break
    return median.float()


def lr_at(step: int, total: int, base: float, warmup: int, end_factor: float) -> float:
    """Linear warm-up to ``base`` then linear decay to ``base * end_factor`` at ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    frac = min(max(step - warmup, 0) / span, 1.0)
    return base * (1.0 - (1.0 - end_factor) * frac)


def make_optimizer(sae: TopKSAE, lr: float) -> torch.optim.Adam:
    """The Adam :func:`train_sae` uses (sparsify's eps; torch's fused kernel on CPU and CUDA)."""
    fused = sae.device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10, fused=fused or None)


def _save_checkpoint(path: Path, sae: TopKSAE, opt: torch.optim.Optimizer, since_fired: Tensor,
                     state: dict[str, Any]) -> None:
    tensors = {f"sae.{k}": v for k, v in sae.tensors().items()}
    names = dict(zip((id(p) for p in sae.parameters()), (n for n, _ in sae.named_parameters())))
    for param in sae.parameters():
        for key, value in opt.state.get(param, {}).items():
            tensors[f"opt.{names[id(param)]}.{key}"] = torch.as_tensor(value)
    tensors["tokens_since_fired"] = since_fired
    atomic_save_safetensors(tensors, path, {"saeuron_checkpoint": CHECKPOINT_FORMAT, "state": json.dumps(state)})


def _load_checkpoint(path: Path, sae: TopKSAE, opt: torch.optim.Optimizer) -> tuple[Tensor, dict[str, Any]]:
    tensors, metadata = load_safetensors(path)
    if metadata.get("saeuron_checkpoint") != CHECKPOINT_FORMAT:
        raise StoreError(f"{path}: not a saeuron training checkpoint")
    state = json.loads(metadata["state"])
    with torch.no_grad():
        for name, value in sae.tensors().items():
            value.copy_(tensors[f"sae.{name}"])
    opt_state: dict[int, dict[str, Tensor]] = {}
    for i, (name, _) in enumerate(sae.named_parameters()):
        entry = {key.rsplit(".", 1)[1]: t for key, t in tensors.items() if key.startswith(f"opt.{name}.")
                 and key.count(".") == name.count(".") + 2}
        if entry:
            opt_state[i] = entry
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    return tensors["tokens_since_fired"].clone(), state


def _resume(ckpt: Optional[Path], sae: TopKSAE, opt: torch.optim.Optimizer, since_fired: Tensor,
            run_state: dict[str, Any], info: Any,
            device: str | torch.device) -> tuple[bool, Tensor, dict[str, Any]]:
    """``(resumed, dead-latent counters, run state)``: from ``ckpt`` (loaded into ``sae`` and ``opt``) when rank 0
    has it, else the fresh ones given."""
    resume = bool(distributed.broadcast_object(ckpt is not None and ckpt.is_file(), info=info))
    if not resume:
        return False, since_fired, run_state
    assert ckpt is not None
    if not ckpt.is_file():
        raise StoreError(f"{ckpt}: rank 0 resumes from this checkpoint but rank {info.rank} cannot see it; "
                         f"put checkpoints on a filesystem every rank shares")
    since_fired, saved = _load_checkpoint(ckpt, sae, opt)
    # Settings added since the checkpoint was written count as their current values.
    saved_config = {**run_state["train_config"], **saved["train_config"]}
    if saved_config != run_state["train_config"] or saved["sae_config"] != run_state["sae_config"]:
        raise ConfigError(f"{ckpt}: checkpoint was made with other training settings; "
                          f"use the same settings to resume or another checkpoint path")
    return True, since_fired.to(device), saved


def _batches(source: BatchSource, config: TrainConfig, sae: TopKSAE, start: int, resume: bool, info: Any,
             device: str | torch.device) -> tuple[Iterator[Tensor], Optional[Prefetch]]:
    """This rank's batches from step ``start`` (prefetched when the source asks for it); a fresh run first sets
    the decoder bias to the geometric median of the first batch."""
    batches = local_batches(source, config.batch_size, config.seed, start, info)
    prefetch: Optional[Prefetch] = None
    if not resume:
        first = next(batches).to(device)
    if getattr(source, "prefetch", False):
        batches = prefetch = Prefetch(batches, pin=device_type(device) == "cuda")
    if not resume:
        batches = itertools.chain([first], batches)
        with torch.no_grad():
            if info.enabled:  # the median of the whole first global batch, on rank 0, then broadcast
                whole = distributed.all_gather_cat(first.to(sae.dtype), info)
                if info.is_main:
                    sae.b_dec.copy_(geometric_median(whole, config.geometric_median_iters))
            else:
                sae.b_dec.copy_(geometric_median(first, config.geometric_median_iters))
    return batches, prefetch


def _summary(config: TrainConfig, total: int, base_lr: float, history: list[dict[str, float]], train_step: TrainStep,
             source_info: Optional[dict[str, Any]], info: Any) -> dict[str, Any]:
    """The ``training`` summary saved in the SAE file."""
    last = history[-1] if history else {}
    return {
        "steps": total, "tokens": total * config.batch_size, "batch_size": config.batch_size, "lr": base_lr,
        "final": {k: v for k, v in last.items() if k != "step"}, "config": asdict(config),
        "history": history[-200:], "select_dtype": str(train_step.select_dtype).replace("torch.", ""),
        **({"source": source_info} if source_info else {}),
        **({"world_size": info.world_size} if info.world_size > 1 else {}),
    }


def train_sae(source: BatchSource, config: TrainConfig, *, hook_point: str = "", model_family: str = "",
              residual: bool = False, checkpoint: Optional[str | Path] = None, out: Optional[str | Path] = None,
              device: str | torch.device = "cpu", progress: bool = True,
              on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
              source_info: Optional[dict[str, Any]] = None) -> TrainResult:
    """Train a TopK SAE on ``source``; resume from ``checkpoint`` if it exists; write ``out`` at the end.

    Inside an initialised ``torch.distributed`` group every rank calls this with the same
    arguments (``config.batch_size`` is the global batch); rank 0 writes ``checkpoint`` and
    ``out``, which must be on a filesystem every rank sees for resuming.
    """
    config.validate()
    info = distributed.current()
    rank_rows(config.batch_size, info.rank, info.world_size)
    d_in = source.d_in
    n_latents = config.n_latents or d_in * config.expansion_factor
    if config.k > n_latents:
        raise ConfigError(f"train: k ({config.k}) must not exceed the number of latents ({n_latents})")
    total = config.steps if config.steps is not None else max(
        1, math.ceil(config.epochs * source.batches_per_epoch(config.batch_size)))
    total = int(distributed.broadcast_object(total, info=info))
    base_lr = config.lr or auto_lr(n_latents)
    sae_config = SAEConfig(d_in=d_in, n_latents=n_latents, k=config.k, hook_point=hook_point,
                           model_family=model_family, residual=residual)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sae = TopKSAE(sae_config, device=device)
    opt = make_optimizer(sae, base_lr)
    since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)
    run_state = {"step": 0, "train_config": asdict(config), "sae_config": sae_config.to_dict(), "history": []}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    resume, since_fired, run_state = _resume(ckpt, sae, opt, since_fired, run_state, info, device)
    history: list[dict[str, float]] = run_state["history"]
    start = int(run_state["step"])
    batches, prefetch = _batches(source, config, sae, start, resume, info, device)
    if info.enabled:  # one set of weights and dead-latent counters for everyone, as DDP does at start
        with torch.no_grad():
            for tensor in sae.tensors().values():
                distributed.broadcast_(tensor, info=info)
            distributed.broadcast_(since_fired, info=info)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress or not info.is_main)
    window: list[dict[str, float]] = []
    sae.train()
    train_step = TrainStep(sae, opt, since_fired, config, info)
    began = time.perf_counter()
    try:
        for step in range(start, total):
            x = next(batches).to(device=device, dtype=sae.dtype, non_blocking=True)
            metrics = train_step(x, lr_at(step, total, base_lr, config.warmup_steps, config.lr_end_factor))
            window.append(metrics)
            done = step + 1
            if done % config.log_every == 0 or done == total:
                row = {"step": done, **{k: sum(m[k] for m in window) / len(window) for k in window[0]}}
                history.append(row)
                window.clear()
                bar.set_postfix(fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_frac']:.3f}")
            bar.update(1)
            if ckpt is not None and info.is_main and (done % config.checkpoint_every == 0 or done == total):
                saving = time.perf_counter()
                run_state.update(step=done, history=history)
                _save_checkpoint(ckpt, sae, opt, since_fired, run_state)
                began += time.perf_counter() - saving  # throughput counts training, not checkpoint writes
            if on_step is not None:
                on_step(done, metrics)
    finally:
        bar.close()
        if prefetch is not None:
            prefetch.close()
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - began
    speed = (total - start) * config.batch_size / elapsed if total > start and elapsed > 0 else None
    sae.set_decoder_norm_to_unit_norm()
    sae.eval()
    sae.training_summary = _summary(config, total, base_lr, history, train_step, source_info, info)
    if out is not None and info.is_main:
        save_sae(sae, out)
    distributed.barrier(info)  # every rank returns once the files are written
    return TrainResult(sae=sae, history=history, tokens_since_fired=since_fired.cpu(), tokens_per_second=speed)
