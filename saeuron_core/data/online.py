"""Online training data: the pipeline samples, a hook feeds a shuffling buffer, the SAE trains on it.

:class:`OnlineSource` is a batch source for :func:`saeuron_core.training.train_sae` that needs no
activation store: it runs the diffusion pipeline over the ``(seed, prompt)`` items (the same
items, hook and row selection as ``collect``), keeps the recorded tokens in a buffer of
``buffer_tokens`` tokens and hands out shuffled batches from it; nothing is written to disk but
the training checkpoints.

When to choose it: when the store would not fit on disk (SAeUron's ~1e9 tokens of 1280 channels
are ~2.6 TB in float16) or would be read only once (``--epochs 1`` or fewer), since generating
costs about as much as collecting would. When not to: for several epochs (every epoch re-runs
the diffusion model, by far the most expensive part), for sweeps over SAE settings on the same
data, and when a resumed run must be bit-for-bit identical (after a resume the buffer is
refilled from a fresh draw of the items rather than restored, so the continuation is
statistically, not bitwise, the same).

Under ``torchrun`` each rank samples its own chunks of items (chunk ``c`` -> rank
``c % world_size``, as in collection) into its own buffer and gives ``batch_size / world_size``
rows per global batch; the training step combines them as for a store.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, StoreError
from ..hosts.diffusers import set_scheduler
from ..hosts.hooks import BlockCall, block_channels, denoiser, get_submodule
from ..sae.model import dtype_from_name
from ..seeds import generator
from .collection import CollectConfig, call_rows, run_chunk
from .distributed import rank_rows


class OnlineSource:
    """Batches straight from the pipeline through a shuffling buffer (see the module docstring).

    ``config`` holds the sampling and recording settings (``batch_size`` is the number of items
    per pipeline call, ``dtype`` the precision tokens are kept in, as a store would keep them).
    Once the buffer holds ``buffer_tokens`` tokens it is shuffled and half of it handed out as
    batches, so a batch mixes tokens from about ``buffer_tokens / tokens_per_item`` generations.
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], config: CollectConfig, *, buffer_tokens: int = 2 ** 18) -> None:
        config.validate()
        if not prompts:
            raise ConfigError("online: no prompts given")
        if buffer_tokens < 1:
            raise ConfigError(f"online: buffer_tokens must be >= 1, got {buffer_tokens}")
        self.pipe = pipe
        self.prompts = list(prompts)
        self.config = config
        self.buffer_tokens = buffer_tokens
        self.store_dtype = dtype_from_name(config.dtype)
        self.items = [(seed, p) for seed in config.seeds for p in range(len(self.prompts))]
        self.n_chunks = -(-len(self.items) // config.batch_size)
        self.generated_items = 0
        self._d_in: Optional[int] = None
        self._tokens_per_item: Optional[int] = None
        set_scheduler(pipe, config.scheduler)

    def _chunk_tokens(self, chunk: Sequence[tuple[int, int]]) -> Tensor:
        rows: list[Tensor] = []

        def record(call: BlockCall) -> None:
            rows.extend(acts for acts, _ in call_rows(call, chunk, self.config, self.store_dtype))

        run_chunk(self.pipe, self.prompts, chunk, self.config, record)
        self.generated_items += len(chunk)
        if not rows:
            raise StoreError(f"online: hook point {self.config.hook_point!r} was never called during sampling")
        return torch.cat(rows)

    def _probe(self) -> None:
        tokens = self._chunk_tokens(self.items[:1])
        self._d_in, self._tokens_per_item = tokens.shape[1], tokens.shape[0]

    @property
    def d_in(self) -> int:
        if self._d_in is None:
            model = denoiser(self.pipe)
            channels = block_channels(get_submodule(model, self.config.hook_point), model)
            if channels is not None:
                self._d_in = channels
            else:
                self._probe()
        assert self._d_in is not None
        return self._d_in

    @property
    def tokens_per_item(self) -> int:
        """Tokens one ``(seed, prompt)`` item gives (measured with one generation)."""
        if self._tokens_per_item is None:
            self._probe()
        assert self._tokens_per_item is not None
        return self._tokens_per_item

    def batches_per_epoch(self, batch_size: int) -> int:
        """Global batches in one pass over all items (an epoch re-runs the pipeline over every item)."""
        return len(self.items) * self.tokens_per_item // batch_size

    def iter_batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0, rank: int = 0,
                     world_size: int = 1) -> Iterator[Tensor]:
        """Endless stream of this rank's ``batch_size // world_size`` rows per global batch.

        A pure function of ``seed`` and ``start_batch``: each pass visits this rank's chunks in an
        order drawn from them, and a resumed run (``start_batch`` > 0) draws a fresh order.
        """
        lo, hi = rank_rows(batch_size, rank, world_size)
        local = hi - lo
        mine = [c for c in range(self.n_chunks) if c % world_size == rank]
        if not mine:
            raise ConfigError(f"online: {len(self.items)} items in chunks of {self.config.batch_size} leave rank "
                              f"{rank} of {world_size} without work; use more prompts/seeds or fewer ranks")
        capacity = max(self.buffer_tokens, 2 * local)
        size = self.config.batch_size
        buffer: list[Tensor] = []
        buffered = 0
        refills = 0
        passes = 0
        while True:
            order = torch.randperm(len(mine), generator=generator("online-order", seed, start_batch, rank, passes))
            for i in order.tolist():
                c = mine[i]
                tokens = self._chunk_tokens(self.items[c * size:(c + 1) * size])
                if self._d_in is None:
                    self._d_in = tokens.shape[1]
                buffer.append(tokens)
                buffered += tokens.shape[0]
                while buffered >= capacity:
                    pool = torch.cat(buffer)
                    perm = torch.randperm(pool.shape[0], generator=generator("online-shuffle", seed, start_batch,
                                                                            rank, refills)).to(pool.device)
                    refills += 1
                    n_out = (capacity // 2) // local * local or local
                    for b in range(n_out // local):
                        yield pool[perm[b * local:(b + 1) * local]].float()
                    rest = pool[perm[n_out:]]
                    buffer, buffered = [rest], rest.shape[0]
            passes += 1
