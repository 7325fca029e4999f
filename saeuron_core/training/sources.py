"""Where training batches come from: a :class:`BatchSource` yields global batches of activation rows (an
in-memory tensor, an activation store, or an online source from :mod:`saeuron_core.data.online`); under
``torchrun`` each rank gets its own rows of every global batch. Batches are prefetched on a thread."""

from __future__ import annotations

import inspect
import queue
import threading
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor

from ..data.distributed import DistInfo, rank_rows
from ..data.store import ActivationStore
from ..errors import ConfigError
from ..seeds import generator


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
        lo, hi = rank_rows(batch_size, rank, world_size)
        epoch, b = divmod(start_batch, per_epoch)
        while True:
            perm = torch.randperm(self.data.shape[0], generator=generator("tensor", seed, epoch))
            for i in range(b, per_epoch):
                yield self.data[perm[i * batch_size + lo:i * batch_size + hi]].float()
            epoch, b = epoch + 1, 0


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


def local_batches(source: BatchSource, batch_size: int, seed: int, start: int, info: DistInfo) -> Iterator[Tensor]:
    """This rank's rows of every global batch from ``start`` on (all of them at world size 1)."""
    if info.world_size == 1:
        return source.iter_batches(batch_size, seed=seed, start_batch=start)
    params = inspect.signature(source.iter_batches).parameters
    if "rank" in params and "world_size" in params:
        return source.iter_batches(batch_size, seed=seed, start_batch=start, rank=info.rank,
                                   world_size=info.world_size)
    lo, hi = rank_rows(batch_size, info.rank, info.world_size)
    return (batch[lo:hi] for batch in source.iter_batches(batch_size, seed=seed, start_batch=start))


class Prefetch:
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

    def __iter__(self) -> "Prefetch":
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
