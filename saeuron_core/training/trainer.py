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

import inspect
import itertools
import json
import math
import queue
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..data import distributed
from ..data.distributed import DistInfo
from ..data.store import ActivationStore
from ..errors import ConfigError, StoreError
from ..sae.files import save_sae
from ..sae.model import SAEConfig, TopKSAE, auto_lr
from ..safetensors_io import atomic_save_safetensors, load_safetensors
from ..seeds import generator

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
    #: dtype of the candidate-selection matmul ("auto": bfloat16 where the hardware has it natively;
    #: the code values and all gradients are float32 either way, see :class:`TrainStep`)
    select_dtype: str = "auto"

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
        if self.select_dtype not in SELECT_DTYPES:
            raise ConfigError(f"train: select_dtype must be one of {', '.join(SELECT_DTYPES)}, got {self.select_dtype!r}")


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


def train_sae(source: BatchSource, config: TrainConfig, *, hook_point: str = "", model_family: str = "",
              residual: bool = False,
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
                           model_family=model_family, residual=residual)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sae = TopKSAE(sae_config, device=device)
    opt = make_optimizer(sae, base_lr)
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
        # Settings added since the checkpoint was written count as their current values.
        saved_config = {**run_state["train_config"], **saved["train_config"]}
        if saved_config != run_state["train_config"] or saved["sae_config"] != run_state["sae_config"]:
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
        "history": history[-200:], "select_dtype": str(train_step.select_dtype).replace("torch.", ""),
        **({"source": source_info} if source_info else {}),
        **({"world_size": info.world_size} if info.world_size > 1 else {}),
    }
    if out is not None and info.is_main:
        save_sae(sae, out)
    distributed.barrier(info)  # every rank returns once the files are written
    return TrainResult(sae=sae, history=history, tokens_since_fired=since_fired.cpu(), tokens_per_second=speed)


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


class _Pairs:
    """``[B, c]`` (token, latent) pairs held latent-major (CSR over latents) for the sparse products.

    Every product a TopK step needs beyond the one dense selection matmul touches only these
    ``B * c`` pairs: per-pair dot products (sampled dense-dense matmul), per-latent weighted sums
    of token rows (``embedding_bag`` over the latent-major order) and per-latent scalar sums.
    """

    def __init__(self, indices: Tensor, n_latents: int, dtype: torch.dtype) -> None:
        self.shape = indices.shape
        self.n_latents = n_latents
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        self.latents = flat[self.order]
        self.tokens = self.order // indices.shape[1]
        self.crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
        torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=self.crow[1:])
        self.mask = self._csr(torch.zeros_like(flat, dtype=dtype))

    def _csr(self, values: Tensor) -> Tensor:
        """The sparse ``[n_latents, B]`` matrix with ``values`` (latent-major order) at the pairs."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.tokens, values, size=(self.n_latents, self.shape[0]),
                                           check_invariants=False)

    def dots(self, weight: Tensor, rows: Tensor) -> Tensor:
        """``[B, c]``: ``weight[latent] . rows[token]`` for every pair."""
        out = torch.empty_like(self.mask.values())
        out[self.order] = torch.sparse.sampled_addmm(self.mask, weight, rows.t(), beta=0.0).values()
        return out.view(self.shape)

    def row_sums(self, rows: Tensor, weights: Tensor, out: Tensor) -> Tensor:
        """``out [n_latents, d]``: for each latent, the ``weights``-weighted sum of its pairs' token ``rows``."""
        return torch.addmm(out, self._csr(weights.reshape(-1)[self.order]), rows, beta=0.0, out=out)

    def latent_sums(self, weights: Tensor, out: Tensor) -> Tensor:
        """``out [n_latents]``: for each latent, the sum of its pairs' ``weights``."""
        return out.zero_().index_add_(0, self.latents, weights.reshape(-1)[self.order])


SELECT_DTYPES = ("auto", "float32", "bfloat16")


def resolve_select_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the selection matmul: ``auto`` is bfloat16 where the hardware multiplies it
    natively (CUDA, CPUs with AVX512-BF16 or AMX), float32 elsewhere."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if native else torch.float32
    return torch.float32


class TrainStep:
    """One training step of a TopK SAE, the one :func:`train_sae` runs, with a sparse backward.

    The loss is the module docstring's; its gradient is written out by hand because all of it
    but one matmul is sparse. Selection: ``x_c = x - b_dec`` times ``W_enc`` (the only dense
    ``[B, n_latents]`` product, in row chunks, never kept, no gradient) picks candidate latents
    per token; their pre-activations are recomputed exactly in float32 as per-pair dot products
    and the top ``k`` of those are the code. A float32 selection picks ``k`` candidates, i.e.
    exactly ``topk(relu(pre_acts(x)))``. A bfloat16 selection (about 2.5x faster on CPUs with
    native bf16) picks ``k + max(8, k // 2)``, so the code differs from float32's only when
    rounding pushes one of the true top ``k`` below all of those (measured: at most 1 token in
    4096 per step, FVU equal to 6 digits); the values are float32 either way.

    Backward: only the ``B * k`` selected pairs carry gradient, so the gradients of ``W_enc``,
    ``W_dec``, ``b_enc`` and the code are per-pair products (:class:`_Pairs`), and that of
    ``b_dec`` through ``x_c`` is ``-grad(b_enc) @ W_enc``. AuxK works on the dead latents only,
    densely in float32: four matmuls over ``n_dead`` latents, ``4 * n_dead / n_latents`` of an
    encode. Then the decoder-parallel gradient is removed, gradients clipped, and Adam steps
    (the decoder is renormalised at the start of each step).

    Under ``torch.distributed`` (``dist`` enabled) ``x`` is this rank's rows of the global
    batch; see the module docstring for what is global.
    """

    def __init__(self, sae: TopKSAE, opt: torch.optim.Optimizer, since_fired: Tensor, config: TrainConfig,
                 dist: Optional[DistInfo] = None) -> None:
        self.sae, self.opt, self.since_fired, self.config = sae, opt, since_fired, config
        self.dist = dist if dist is not None and dist.enabled else None
        self.select_dtype = resolve_select_dtype(config.select_dtype, sae.device)
        self.candidates = sae.k if self.select_dtype == sae.dtype else min(sae.k + max(8, sae.k // 2), sae.n_latents)
        self._w_select: Optional[Tensor] = None  # W_enc in the selection dtype, refreshed in place every step
        # One buffer, kept across steps, for the gradients and (for the all-reduce) the step's statistics:
        # a fresh parameter-sized tensor every step costs as much in page faults as the sparse products.
        params = (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec)
        sizes = [p.numel() for p in params] + [3, sae.n_latents]
        self._flat = torch.zeros(sum(sizes), dtype=sae.dtype, device=sae.device)
        *views, self._stats, self._fired = self._flat.split(sizes)
        self._grads = [v.view_as(p) for v, p in zip(views, params)]

    def _select(self, xc: Tensor) -> Tensor:
        """``[B, candidates]`` latent ids with the largest pre-activations (selection dtype, row chunks)."""
        weight, bias = self.sae.encoder.weight, self.sae.encoder.bias
        if self.select_dtype != weight.dtype:
            if self._w_select is None or self._w_select.shape != weight.shape:
                self._w_select = torch.empty_like(weight, dtype=self.select_dtype)
            weight = self._w_select.copy_(weight)
            bias, xc = bias.to(self.select_dtype), xc.to(self.select_dtype)
        # Row chunks of about 8M pre-activations: the block stays in cache for the top-k.
        parts = max(1, -(-xc.shape[0] * self.sae.n_latents // (1 << 23)))
        return torch.cat([F.linear(rows, weight, bias).topk(self.candidates, dim=-1, sorted=False).indices
                          for rows in xc.tensor_split(parts)])

    @property
    def buffers(self) -> list[Tensor]:
        """The tensors this step keeps between calls besides the SAE and the optimizer state (the
        gradient buffer and the selection copy of ``W_enc``), for memory accounting."""
        return [t for t in (self._flat, self._w_select) if t is not None]

    def __call__(self, x: Tensor, lr: float) -> dict[str, float]:
        """Train on the batch ``x`` (this rank's rows) at learning rate ``lr``; returns its metrics."""
        sae, config, dist = self.sae, self.config, self.dist
        n_global = x.shape[0] * (dist.world_size if dist else 1)
        sae.set_decoder_norm_to_unit_norm()
        w_enc, b_enc, w_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
        dead = self.since_fired > config.dead_tokens_threshold
        n_dead = int(dead.sum())
        with torch.no_grad():
            mean = distributed.all_reduce_sum(x.sum(dim=0), dist) / n_global if dist else x.mean(dim=0)
            total_var = distributed.all_reduce_sum((x - mean).pow(2).sum().reshape(1), dist)[0].clamp_min(1e-12)
            xc = x - b_dec
            indices = self._select(xc)
            pairs = _Pairs(indices, sae.n_latents, x.dtype)
            values = pairs.dots(w_enc, xc) + b_enc[indices]
            if self.candidates > sae.k:
                values, pick = values.topk(sae.k, dim=-1, sorted=False)
                indices = indices.gather(1, pick)
                pairs = _Pairs(indices, sae.n_latents, x.dtype)
            values.clamp_min_(0)
            err = F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum").add_(b_dec).sub_(x)
            err_sum = err.pow(2).sum()

            # Gradients of (sum err^2 + alpha * AuxK) / total_var.
            grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec = self._grads
            grad_err = err * (2 / total_var)
            grad_code = pairs.dots(w_dec, grad_err).mul_(values > 0)
            pairs.row_sums(grad_err, values, out=grad_w_dec)
            pairs.row_sums(xc, grad_code, out=grad_w_enc)
            pairs.latent_sums(grad_code, out=grad_b_enc)
            aux = torch.zeros((), device=x.device)
            if n_dead and config.auxk_alpha > 0:
                aux = self._auxk(xc, err, dead, n_dead, total_var)
            torch.sub(grad_err.sum(dim=0), grad_b_enc @ w_enc, out=grad_b_dec)
            self._stats.copy_(torch.stack([err_sum, aux.to(err_sum.dtype), (values > 0).sum().to(err_sum.dtype)]))
            self._fired.zero_()[indices[values > 0]] = 1
            if dist:  # one all-reduce for gradients, loss numerators, L0 and fired latents
                distributed.all_reduce_sum(self._flat, dist)
            for param, grad in zip((w_enc, b_enc, w_dec, b_dec), self._grads):
                param.grad = grad
            stats = self._stats.tolist()
            fired = self._fired > 0
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            self.since_fired += n_global
            self.since_fired[fired] = 0
        fvu, auxk = stats[0] / float(total_var), stats[1] / float(total_var)
        return {"loss": fvu + config.auxk_alpha * auxk, "fvu": fvu, "auxk": auxk, "l0": stats[2] / n_global,
                "dead_frac": n_dead / sae.n_latents, "lr": lr}

    def _auxk(self, xc: Tensor, err: Tensor, dead: Tensor, n_dead: int, total_var: Tensor) -> Tensor:
        """AuxK's numerator (the top ``d_in // 2`` dead latents' reconstruction of the residual
        ``-err``, scaled down while few are dead); adds its gradients into the step's."""
        sae, alpha = self.sae, self.config.auxk_alpha
        grad_w_enc, grad_b_enc, grad_w_dec, _ = self._grads
        k_aux = min(sae.d_in // 2, n_dead)
        scale = min(n_dead / (sae.d_in // 2), 1.0)
        ids = dead.nonzero().squeeze(1)
        w_enc, w_dec = sae.encoder.weight[ids], sae.W_dec[ids]
        values, local = F.relu(F.linear(xc, w_enc, sae.encoder.bias[ids])).topk(k_aux, dim=-1, sorted=False)
        diff = F.embedding_bag(local, w_dec, per_sample_weights=values, mode="sum").add_(err)
        numerator = scale * diff.pow(2).sum()
        grad_diff = diff.mul_(2 * alpha * scale / total_var)
        code = torch.zeros(xc.shape[0], n_dead, dtype=xc.dtype, device=xc.device).scatter_(1, local, values)
        grad_w_dec.index_add_(0, ids, code.t() @ grad_diff)
        grad_code = (grad_diff @ w_dec.t()).mul_(code > 0)
        grad_w_enc.index_add_(0, ids, grad_code.t() @ xc)
        grad_b_enc.index_add_(0, ids, grad_code.sum(dim=0))
        return numerator
