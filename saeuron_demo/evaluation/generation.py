"""Generating a run of the grid: the hooks that erase and record the hooked blocks, the batched
generation, and the classifier's reading of the images (:class:`RunOutput`)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.hosts.hooks import BlockCall, HookFn, pipeline_hook


@dataclass
class RunOutput:
    """Images of one run (prompt-major, seeds inner) and the classifier's reading of them."""

    images: Tensor        # uint8 [P * S, 3, H, W]
    objects: Tensor       # [P * S] predicted object
    styles: Tensor        # [P * S] predicted style
    object_prob: Tensor   # [P * S, n_objects] softmax
    style_prob: Tensor    # [P * S, n_styles]
    act_mean: dict[str, Tensor]  # hook point -> [P, C] per-prompt mean of that block's (cond) output
    act_sq: dict[str, Tensor]    # hook point -> [P, C] per-prompt mean of its square
    seconds: float


class ActivationStats:
    """Per-prompt running mean of the hooked block's conditional output and of its square."""

    def __init__(self, n_prompts: int) -> None:
        self.n_prompts = n_prompts
        self.sum: Optional[Tensor] = None
        self.sq: Optional[Tensor] = None
        self.count = torch.zeros(n_prompts, dtype=torch.float64)
        self.groups = torch.zeros(0, dtype=torch.long)  # prompt of each row of the current batch

    def add(self, tokens: Tensor) -> None:
        """Add ``tokens`` ``[rows, N, C]`` (rows of the current batch) to their prompts' sums."""
        rows = tokens.detach().double().cpu()
        if self.sum is None:
            self.sum = torch.zeros(self.n_prompts, rows.shape[-1], dtype=torch.float64)
            self.sq = torch.zeros_like(self.sum)
        assert self.sq is not None
        self.sum.index_add_(0, self.groups, rows.sum(1))
        self.sq.index_add_(0, self.groups, (rows * rows).sum(1))
        self.count.index_add_(0, self.groups, torch.full((rows.shape[0],), float(rows.shape[1]), dtype=torch.float64))

    def means(self) -> tuple[Tensor, Tensor]:
        """``(mean, mean of the square)``, each ``[P, C]``."""
        assert self.sum is not None and self.sq is not None, "no activations were recorded"
        n = self.count.clamp_min(1)[:, None]
        return self.sum / n, self.sq / n


def observer(eraser: Optional[HookFn], stats: ActivationStats) -> Callable[[BlockCall], Optional[Tensor]]:
    """Block hook: ``eraser``'s edit (if any), then the conditional rows of what the block passes on recorded."""

    def observe(call: BlockCall) -> Optional[Tensor]:
        new = eraser(call) if eraser is not None else None
        tokens = call.tokens if new is None else new
        stats.add(tokens[call.is_cond])
        return new
    return observe


@contextmanager
def hooked(pipe: Any, stats: Mapping[str, ActivationStats], erasers: Mapping[str, ConceptEraser],
           follow: Mapping[str, Sequence[str]]) -> Iterator[None]:
    """Every hook point of ``stats`` observed (and erased where ``erasers`` has one); what the eraser of a
    detecting block in ``follow`` detects is replaced too at the later blocks it lists."""
    mounts = {hp: e.mounts(follow.get(hp, ()), hook_point=hp) for hp, e in erasers.items()}
    with ExitStack() as hooks:
        for hp, st in stats.items():
            own = mounts[hp][0] if hp in mounts else None
            hooks.enter_context(pipeline_hook(pipe, hp, observer(own.fn if own else None, st),
                                              residual=own.residual if own else False))
        for hp in follow:
            for point, fn, residual in mounts.get(hp, [])[1:]:
                hooks.enter_context(pipeline_hook(pipe, point, fn, residual=residual))
        yield


@contextmanager
def scheduler_set(pipe: Any, name: str) -> Iterator[None]:
    """``pipe`` with the scheduler ``name``, its own one back afterwards."""
    from saeuron_core.hosts.diffusers import set_scheduler

    old = pipe.scheduler
    set_scheduler(pipe, name)
    try:
        yield
    finally:
        pipe.scheduler = old


def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], stats: Mapping[str, ActivationStats], *,
                    steps: int, guidance: float, batch_size: int, negative: Optional[str] = None) -> Tensor:
    """Every prompt once per seed (prompt-major, seeds inner), ``batch_size`` images at a time: uint8
    ``[P * S, 3, H, W]``. Tells ``stats`` which prompt each row of a batch comes from."""
    from saeuron_core.hosts.diffusers import generate

    from ..dataset import from_model_range

    work = [(i, seed) for i in range(len(prompts)) for seed in seeds]
    images: list[Tensor] = []
    for begin in range(0, len(work), batch_size):
        chunk = work[begin:begin + batch_size]
        groups = torch.tensor([i for i, _ in chunk], dtype=torch.long)
        for st in stats.values():
            st.groups = groups
        out = generate(pipe, [prompts[i] for i, _ in chunk], [seed for _, seed in chunk], steps=steps,
                       guidance_scale=guidance, output_type="latent",
                       negative_prompt=[negative] * len(chunk) if negative else None)
        images.append(from_model_range(out.images.float().cpu()))
    return torch.cat(images)


def classify(classifier: Any, images: Tensor, stats: Mapping[str, ActivationStats], seconds: float) -> RunOutput:
    """The run's :class:`RunOutput`: the classifier's reading of ``images`` and the blocks' statistics."""
    from ..classifier import predict_proba

    po, ps = predict_proba(classifier, images)
    moments = {hp: st.means() for hp, st in stats.items()}
    return RunOutput(images, po.argmax(1), ps.argmax(1), po, ps, {hp: m[0] for hp, m in moments.items()},
                     {hp: m[1] for hp, m in moments.items()}, seconds)
