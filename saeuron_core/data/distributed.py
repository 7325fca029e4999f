"""Running under ``torchrun``: process-group setup and the few collectives the library needs.

Nothing here is home-made communication: it is ``torch.distributed`` (gloo on CPU, NCCL on
CUDA) with the rendezvous ``torchrun`` sets up through its environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A plain ``python``/``saeuron``
process, or ``torchrun`` with one process, is world size 1 and takes exactly the single-process
code paths; library functions read the rank from an already initialised default process group
(:func:`current`), so callers that set up ``torch.distributed`` themselves need nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ConfigError

TIMEOUT_ENV = "SAEURON_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` picks its GPU on the host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when there are other ranks to talk to (an initialised group with more than one process)."""
        return self.world_size > 1 and _initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current() -> DistInfo:
    """Rank and world size of the default process group, or rank 0 of 1 when there is none."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if _initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)
    return DistInfo(0, 1, 0)


def resolve_device(device: str | torch.device, info: Optional[DistInfo] = None) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` when several ranks share a host."""
    device = torch.device(device)
    info = info or current()
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", info.local_rank)
    return device


_OWNED = False


def init_from_env(device: str | torch.device = "cpu", *, backend: Optional[str] = None,
                  timeout_minutes: Optional[float] = None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (no-op for world size 1).

    ``backend`` defaults to NCCL for CUDA devices and gloo otherwise; the timeout (minutes) to
    ``$SAEURON_DIST_TIMEOUT_MIN`` or 60. An already initialised group is reused. Returns the
    rank information and the device this rank should use.
    """
    global _OWNED
    world = launched_world_size()
    if world > 1 and not _initialized():
        if not torch.distributed.is_available():
            raise ConfigError("launched with WORLD_SIZE > 1 but this torch build has no torch.distributed")
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun")
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda but CUDA is not available on this host")
            torch.cuda.set_device(dev.index if dev.index is not None else local_rank)
        if backend is None:
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if timeout_minutes is None:
            timeout_minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        _OWNED = True
    info = current()
    return info, resolve_device(device, info)


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    global _OWNED
    if _OWNED and _initialized():
        torch.distributed.destroy_process_group()
    _OWNED = False


# -- collectives (no-ops at world size 1) -------------------------------------------------

def barrier(info: Optional[DistInfo] = None) -> None:
    info = info or current()
    if info.enabled:
        torch.distributed.barrier()


def all_reduce_sum(tensor: Tensor, info: Optional[DistInfo] = None) -> Tensor:
    """In-place sum over ranks; returns ``tensor``."""
    info = info or current()
    if info.enabled:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0, info: Optional[DistInfo] = None) -> Tensor:
    """In-place broadcast from ``src``; returns ``tensor``."""
    info = info or current()
    if info.enabled:
        torch.distributed.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int = 0, info: Optional[DistInfo] = None) -> Any:
    """A picklable value as ``src`` has it (small things only: flags, step counts)."""
    info = info or current()
    if not info.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(tensor: Tensor, info: Optional[DistInfo] = None) -> Tensor:
    """Concatenation along dim 0 of every rank's ``tensor`` (same shape on every rank), in rank order."""
    info = info or current()
    if not info.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_object(obj: Any, info: Optional[DistInfo] = None) -> list[Any]:
    info = info or current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def rank_rows(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of each global batch of ``batch_size`` rows that belong to ``rank`` of ``world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} of world size {world_size} is not a valid rank")
    if batch_size % world_size:
        raise ConfigError(f"the global batch size ({batch_size}) must be divisible by the number of ranks "
                          f"({world_size})")
    local = batch_size // world_size
    return rank * local, (rank + 1) * local
