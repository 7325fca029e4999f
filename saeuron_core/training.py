"""TopK SAE training on streamed activations.

Loss ``FVU + auxk_alpha * AuxK`` (AuxK: the top ``d_in // 2`` pre-activations of dead latents
predict the residual), ``b_dec`` initialised to the geometric median of the first batch,
decoder rows renormalised before every batch with the gradient's parallel component removed
before every step, linear warm-up then linear decay, gradient-norm clipping, Adam. Checkpoints
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

import inspect
import itertools
import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .distributed import DistInfo
from .errors import ConfigError, StoreError
from .formats import atomic_save_safetensors, load_safetensors, save_sae
from .sae import SAEConfig, TopKSAE, auto_lr
from .store import ActivationStore, generator

CHECKPOINT_FORMAT = "1"


class BatchSource(Protocol):
    """Where training batches come from (an :class:`ActivationStore` or a :class:`TensorSource`).

    A source may also accept ``rank`` and ``world_size`` keyword arguments in ``iter_batches``
    and then yield only that rank's ``batch_size // world_size`` rows of each global batch; a
    source that does not is read whole on every rank and sliced.
    """

    @property
    def d_in(self) -> int: ...

    def iter_batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0) -> Iterator[Tensor]: ...

    def batches_per_epoch(self, batch_size: int) -> int: ...


class TensorSource:
    """In-memory activations ``[tokens, d_in]`` as a batch source (reshuffled every epoch)."""

    prefetch = True  # batches may be read ahead by a background thread

    def __init__(self, data: Tensor) -> None:
        if data.dim() != 2:
            raise ConfigError(f"TensorSource expects [tokens, d_in], got shape {tuple(data.shape)}")
        self.data = data

    @property
    def d_in(self) -> int:
        return self.data.shape[1]

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.data.shape[0] // batch_size

    def iter_batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0, rank: int = 0,
                     world_size: int = 1) -> Iterator[Tensor]:
        per_epoch = self.batches_per_epoch(batch_size)
        if per_epoch == 0:
            raise ConfigError(f"{self.data.shape[0]} tokens are fewer than one batch of {batch_size}")
        lo, hi = _rank_rows(batch_size, rank, world_size)
        epoch, b = divmod(start_batch, per_epoch)
        while True:
            perm = torch.randperm(self.data.shape[0], generator=generator("tensor", seed, epoch))
            for i in range(b, per_epoch):
                yield self.data[perm[i * batch_size + lo:i * batch_size + hi]].float()
            epoch, b = epoch + 1, 0


def _rank_rows(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of each global batch that belong to ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} of world size {world_size} is not a valid rank")
    if batch_size % world_size:
        raise ConfigError(f"train: the global batch size ({batch_size}) must be divisible by the number of ranks "
                          f"({world_size})")
    local = batch_size // world_size
    return rank * local, (rank + 1) * local


class StoreSource:
    """Adapter giving an :class:`ActivationStore` the :class:`BatchSource` interface."""

    prefetch = True  # batches may be read ahead by a background thread

    def __init__(self, store: ActivationStore, group_size: int = 4) -> None:
        self.store = store
        self.group_size = group_size

    @property
    def d_in(self) -> int:
        return self.store.d_in

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.store.batches_per_epoch(batch_size, self.group_size)

    def iter_batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0, rank: int = 0,
                     world_size: int = 1) -> Iterator[Tensor]:
        return self.store.iter_batches(batch_size, seed=seed, group_size=self.group_size, start_batch=start_batch,
                                       rank=rank, world_size=world_size)


def _local_batches(source: BatchSource, batch_size: int, seed: int, start: int, info: DistInfo) -> Iterator[Tensor]:
    """This rank's rows of every global batch from ``start`` on (all of them at world size 1)."""
    if info.world_size == 1:
        return source.iter_batches(batch_size, seed=seed, start_batch=start)
    params = inspect.signature(source.iter_batches).parameters
    if "rank" in params and "world_size" in params:
        return source.iter_batches(batch_size, seed=seed, start_batch=start, rank=info.rank,
                                   world_size=info.world_size)
    lo, hi = _rank_rows(batch_size, info.rank, info.world_size)
    return (batch[lo:hi] for batch in source.iter_batches(batch_size, seed=seed, start_batch=start))


class _Prefetch:
    """Reads an iterator ahead in a daemon thread (data loading overlaps the training step).

    Batches come out in the same order, so training is unchanged; on CUDA they are pinned so
    the copy to the device can be asynchronous. Errors in the thread are raised by ``next``.
    """

    _END = object()

    def __init__(self, it: Iterator[Tensor], depth: int = 4, pin: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="saeuron-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[Tensor]) -> None:
        try:
            for batch in it:
                if not self._put(batch.pin_memory() if self._pin else batch):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def __iter__(self) -> "_Prefetch":
        return self

    def __next__(self) -> Tensor:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class TrainConfig:
    """Training hyper-parameters; ``steps`` wins over ``epochs`` when both are given."""

    expansion_factor: int = 16
    n_latents: Optional[int] = None
    k: int = 32
    batch_size: int = 4096
    steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: Optional[float] = None
    warmup_steps: int = 0
    lr_end_factor: float = 0.0
    auxk_alpha: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    geometric_median_iters: int = 100

    def validate(self) -> None:
        positive = ("expansion_factor", "k", "batch_size", "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train: {name} must be >= 1, got {getattr(self, name)}")
        if self.steps is None and self.epochs is None:
            raise ConfigError("train: give a number of steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train: steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train: epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"train: lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.lr_end_factor <= 1 or self.warmup_steps < 0 or self.auxk_alpha < 0 or self.grad_clip <= 0:
            raise ConfigError("train: need 0 <= lr_end_factor <= 1, warmup_steps >= 0, auxk_alpha >= 0, grad_clip > 0")


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


def train_sae(source: BatchSource, config: TrainConfig, *, hook_point: str = "", model_family: str = "",
              checkpoint: Optional[str | Path] = None, out: Optional[str | Path] = None,
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
    _rank_rows(config.batch_size, info.rank, info.world_size)
    d_in = source.d_in
    n_latents = config.n_latents or d_in * config.expansion_factor
    if config.k > n_latents:
        raise ConfigError(f"train: k ({config.k}) must not exceed the number of latents ({n_latents})")
    total = config.steps if config.steps is not None else max(
        1, math.ceil(config.epochs * source.batches_per_epoch(config.batch_size)))
    total = int(distributed.broadcast_object(total, info=info))
    base_lr = config.lr or auto_lr(n_latents)
    sae_config = SAEConfig(d_in=d_in, n_latents=n_latents, k=config.k, hook_point=hook_point,
                           model_family=model_family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sae = TopKSAE(sae_config, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr, eps=6.25e-10)
    since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)
    run_state = {"step": 0, "train_config": asdict(config), "sae_config": sae_config.to_dict(), "history": []}

    ckpt = Path(checkpoint) if checkpoint is not None else None
    resume = bool(distributed.broadcast_object(ckpt is not None and ckpt.is_file(), info=info))
    if resume:
        assert ckpt is not None
        if not ckpt.is_file():
            raise StoreError(f"{ckpt}: rank 0 resumes from this checkpoint but rank {info.rank} cannot see it; "
                             f"put checkpoints on a filesystem every rank shares")
        since_fired, saved = _load_checkpoint(ckpt, sae, opt)
        since_fired = since_fired.to(device)
        if saved["train_config"] != run_state["train_config"] or saved["sae_config"] != run_state["sae_config"]:
            raise ConfigError(f"{ckpt}: checkpoint was made with other training settings; "
                              f"use the same settings to resume or another checkpoint path")
        run_state = saved

    history: list[dict[str, float]] = run_state["history"]
    start = int(run_state["step"])
    batches = _local_batches(source, config.batch_size, config.seed, start, info)
    prefetch: Optional[_Prefetch] = None
    if not resume:
        first = next(batches).to(device)
    if getattr(source, "prefetch", False):
        batches = prefetch = _Prefetch(batches, pin=_device_type(device) == "cuda")
    if not resume:
        batches = itertools.chain([first], batches)
        with torch.no_grad():
            if info.enabled:  # the median of the whole first global batch, on rank 0, then broadcast
                whole = distributed.all_gather_cat(first.to(sae.dtype), info)
                if info.is_main:
                    sae.b_dec.copy_(geometric_median(whole, config.geometric_median_iters))
            else:
                sae.b_dec.copy_(geometric_median(first, config.geometric_median_iters))
    if info.enabled:  # one set of weights and dead-latent counters for everyone, as DDP does at start
        with torch.no_grad():
            for tensor in sae.tensors().values():
                distributed.broadcast_(tensor, info=info)
            distributed.broadcast_(since_fired, info=info)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress or not info.is_main)
    window: list[dict[str, float]] = []
    sae.train()
    began = time.perf_counter()
    try:
        for step in range(start, total):
            x = next(batches).to(device=device, dtype=sae.dtype, non_blocking=True)
            metrics = _train_step(sae, opt, x, since_fired, config,
                                  lr_at(step, total, base_lr, config.warmup_steps, config.lr_end_factor), dist=info)
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
    if _device_type(device) == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - began
    speed = (total - start) * config.batch_size / elapsed if total > start and elapsed > 0 else None
    sae.set_decoder_norm_to_unit_norm()
    sae.eval()
    last = history[-1] if history else {}
    sae.training_summary = {
        "steps": total, "tokens": total * config.batch_size, "batch_size": config.batch_size, "lr": base_lr,
        "final": {k: v for k, v in last.items() if k != "step"}, "config": asdict(config),
        "history": history[-200:], **({"source": source_info} if source_info else {}),
        **({"world_size": info.world_size} if info.world_size > 1 else {}),
    }
    if out is not None and info.is_main:
        save_sae(sae, out)
    distributed.barrier(info)  # every rank returns once the files are written
    return TrainResult(sae=sae, history=history, tokens_since_fired=since_fired.cpu(), tokens_per_second=speed)


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def _auxk_numerator(sae: TopKSAE, pre: Tensor, recon: Tensor, x: Tensor, dead: Tensor, n_dead: int,
                    config: TrainConfig) -> Tensor:
    """AuxK's squared error before dividing by the batch variance: the top ``d_in // 2`` pre-activations
    of dead latents predict the residual ``x - recon`` (scaled down while few latents are dead)."""
    if not n_dead or config.auxk_alpha <= 0:
        return torch.zeros((), device=x.device)
    k_aux = min(sae.d_in // 2, n_dead)
    scale = min(n_dead / (sae.d_in // 2), 1.0)
    aux_values, aux_indices = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False)
    e_hat = sae.decode(aux_values, aux_indices, bias=False)
    return scale * (e_hat - (x - recon).detach()).pow(2).sum()


def _train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor,
                config: TrainConfig, lr: float, dist: Optional[DistInfo] = None) -> dict[str, float]:
    if dist is not None and dist.enabled:
        return _train_step_distributed(sae, opt, x, since_fired, config, lr, dist)
    sae.set_decoder_norm_to_unit_norm()
    pre = sae.pre_acts(x)
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    recon = sae.decode(values, indices)
    total_var = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    fvu = (recon - x).pow(2).sum() / total_var

    dead = since_fired > config.dead_tokens_threshold
    n_dead = int(dead.sum())
    auxk = _auxk_numerator(sae, pre, recon, x, dead, n_dead, config) / total_var
    loss = fvu + config.auxk_alpha * auxk

    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()

    with torch.no_grad():
        fired = torch.zeros_like(dead)
        fired[indices[values > 0]] = True
        since_fired += x.shape[0]
        since_fired[fired] = 0
    return {"loss": float(loss.detach()), "fvu": float(fvu.detach()), "auxk": float(auxk.detach()),
            "l0": float((values > 0).sum(-1).float().mean()), "dead_frac": n_dead / sae.n_latents, "lr": lr}


def _train_step_distributed(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor,
                            config: TrainConfig, lr: float, dist: DistInfo) -> dict[str, float]:
    """:func:`_train_step` on this rank's rows ``x`` of a global batch: the same maths on the global batch.

    Loss = (sum of squared errors over the global batch + alpha * AuxK numerator) / global
    variance; each rank back-propagates its share and the gradients are summed over ranks.
    """
    n_global = x.shape[0] * dist.world_size
    sae.set_decoder_norm_to_unit_norm()
    pre = sae.pre_acts(x)
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    recon = sae.decode(values, indices)
    with torch.no_grad():
        mean = distributed.all_reduce_sum(x.sum(dim=0), dist) / n_global
        total_var = distributed.all_reduce_sum((x - mean).pow(2).sum().reshape(1), dist)[0].clamp_min(1e-12)
    err = (recon - x).pow(2).sum()

    dead = since_fired > config.dead_tokens_threshold
    n_dead = int(dead.sum())
    aux = _auxk_numerator(sae, pre, recon, x, dead, n_dead, config)
    loss = (err + config.auxk_alpha * aux) / total_var

    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(sae.parameters())
    with torch.no_grad():
        fired = torch.zeros(sae.n_latents, device=x.device, dtype=x.dtype)
        fired[indices[values > 0]] = 1
        stats = torch.stack([err.detach(), aux.detach().to(err.dtype), (values > 0).sum().to(err.dtype)])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # One all-reduce for gradients, loss numerators, L0 and fired latents.
        flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads] + [stats, fired]), dist)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        stats, fired_any = flat[offset:offset + 3], flat[offset + 3:] > 0
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()

    with torch.no_grad():
        since_fired += n_global
        since_fired[fired_any] = 0
    fvu, auxk = float(stats[0] / total_var), float(stats[1] / total_var)
    return {"loss": fvu + config.auxk_alpha * auxk, "fvu": fvu, "auxk": auxk, "l0": float(stats[2]) / n_global,
            "dead_frac": n_dead / sae.n_latents, "lr": lr}
