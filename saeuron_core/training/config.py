"""The settings a training run shares between its loop (:mod:`.trainer`) and its step (:mod:`.step`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

#: the dtypes the candidate-selection matmul may run in (see :func:`.step.resolve_select_dtype`)
SELECT_DTYPES = ("auto", "float32", "bfloat16")


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
    #: the code values and all gradients are float32 either way, see :class:`~.step.TrainStep`)
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
