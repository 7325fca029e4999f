"""Hooks on any block of a diffusers denoiser (a UNet, or a FLUX / SD3 transformer), seen as tokens ``[B, N, C]``.

A :class:`BlockHook` attaches by dotted path (``up_blocks.1.attentions.1``, ``transformer_blocks.18``), hands each
call's output to a function as a :class:`BlockCall` (tokens, the timestep of every batch row, which rows are the
conditional half under classifier-free guidance) and, if the function returns new tokens, puts them back in the
module's own layout. With ``residual=True`` the function sees the block's update (output minus input) and its
edit is added onto the output. Of a DiT block (text and image streams) only the image stream is seen. Hooks are
removed on exit, also on exceptions, leaving the model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, HookError

CfgLayout = Literal["none", "uncond_cond", "cond_uncond"]


@dataclass
class BlockCall:
    """One call of the hooked module.

    ``tokens``: ``[B, N, C]``; ``spatial``: ``(H, W)`` when the module returned ``[B, C, H, W]``;
    ``timesteps``: ``[B]`` float timestep values (``None`` outside a UNet forward);
    ``is_cond``: ``[B]`` bool, True for rows conditioned on the prompt; ``call_index``: 0, 1, ...
    """

    tokens: Tensor
    spatial: Optional[tuple[int, int]]
    timesteps: Optional[Tensor]
    is_cond: Tensor
    call_index: int


HookFn = Callable[[BlockCall], Optional[Tensor]]


def edit_block(fn: HookFn, out_tokens: Tensor, in_tokens: Optional[Tensor],
               make_call: Callable[[Tensor], BlockCall]) -> Optional[Tensor]:
    """Run ``fn`` on a block's output tokens, or on its update (output minus input) when ``in_tokens`` is given.

    Returns the block's new output tokens, or ``None`` when ``fn`` changed nothing. A residual edit is added
    onto the output, so tokens the function leaves alone stay bit for bit.
    """
    if in_tokens is not None and in_tokens.shape != out_tokens.shape:
        raise HookError(f"residual SAE: the block's input {tuple(in_tokens.shape)} does not match its output "
                        f"{tuple(out_tokens.shape)}, so it has no update to read")
    tokens = out_tokens if in_tokens is None else out_tokens - in_tokens
    new = fn(make_call(tokens))
    if new is None:
        return None
    if new.shape != tokens.shape:
        raise HookError(f"hook function returned shape {tuple(new.shape)}, expected {tuple(tokens.shape)}")
    return new if in_tokens is None else out_tokens + (new.to(out_tokens.dtype) - tokens)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` with an error that lists what exists at the failing level."""
    current: nn.Module = model
    walked: list[str] = []
    for part in path.split("."):
        children = dict(current.named_children())
        if part not in children:
            where = ".".join(walked) or type(model).__name__
            raise HookError(f"hook point {path!r}: {where!r} has no child {part!r}; it has {sorted(children)}")
        current = children[part]
        walked.append(part)
    return current


def to_tokens(hidden: Tensor) -> tuple[Tensor, Optional[tuple[int, int]]]:
    """``[B, C, H, W]`` -> ``([B, H*W, C], (H, W))``; ``[B, N, C]`` passes through."""
    if hidden.dim() == 4:
        b, c, h, w = hidden.shape
        return hidden.permute(0, 2, 3, 1).reshape(b, h * w, c), (h, w)
    if hidden.dim() == 3:
        return hidden, None
    raise HookError(f"hooked module output has shape {tuple(hidden.shape)}; expected [B, C, H, W] or [B, N, C]")


def from_tokens(tokens: Tensor, spatial: Optional[tuple[int, int]], like: Tensor) -> Tensor:
    """Inverse of :func:`to_tokens`, in the dtype/device of ``like``."""
    tokens = tokens.to(device=like.device, dtype=like.dtype)
    if spatial is None:
        return tokens
    h, w = spatial
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(like))


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


# DiT blocks return ``(encoder_hidden_states, hidden_states)``: the image stream is the second element.
_IMAGE_STREAM_SECOND = {"FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock"}
# Denoisers whose forward gets the timestep divided by 1000 (FLUX pipelines pass sigma); timestep values are kept on
# the 0..1000 scale of every other model so that concept data learned in one host apply in the other.
_TIMESTEP_SCALE = {"FluxTransformer2DModel": 1000.0}


def denoiser(pipe: Any) -> nn.Module:
    """The denoising network of a diffusers pipeline: its ``unet`` or its ``transformer``."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ConfigError(f"{type(pipe).__name__} has neither a unet nor a transformer to hook")


def _stream_index(module: nn.Module) -> int:
    return 1 if type(module).__name__ in _IMAGE_STREAM_SECOND else 0


def _primary(output: Any, index: int = 0) -> Tensor:
    if index:
        if isinstance(output, (tuple, list)) and len(output) > index and isinstance(output[index], Tensor):
            return output[index]
        raise HookError(f"cannot read the image stream (element {index}) of a block output of type "
                        f"{type(output).__name__}")
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # diffusers BaseOutput
        first = output.to_tuple()[0]
        if isinstance(first, Tensor):
            return first
    raise HookError(f"cannot read hidden states from a module output of type {type(output).__name__}")


def _replace_primary(output: Any, new: Tensor, index: int = 0) -> Any:
    if index:
        return type(output)([*output[:index], new, *output[index + 1:]])
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    key = next(iter(output.keys()))
    output[key] = new
    return output


def cfg_rows(batch: int, layout: CfgLayout) -> Tensor:
    """Boolean ``[batch]`` mask of conditional rows for a CFG batch layout."""
    if layout == "none":
        return torch.ones(batch, dtype=torch.bool)
    if batch % 2:
        raise HookError(f"CFG layout {layout!r} needs an even batch, got {batch} rows")
    half = torch.zeros(batch // 2, dtype=torch.bool)
    first, second = (half, ~half) if layout == "uncond_cond" else (~half, half)
    return torch.cat([first, second])


def block_channels(module: nn.Module, model: Optional[nn.Module] = None) -> Optional[int]:
    """Channel count of a block's output when it can be read from its configuration (of a DiT block: the
    transformer's width, from ``model``'s config)."""
    if type(module).__name__ in _IMAGE_STREAM_SECOND and model is not None:
        cfg = getattr(model, "config", None)
        heads, head_dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "attention_head_dim", None)
        if isinstance(heads, int) and isinstance(head_dim, int):
            return heads * head_dim
    for attr in ("out_channels", "in_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
        value = getattr(getattr(module, "config", None), attr, None)
        if isinstance(value, int):
            return value
    return None


def check_sae_fits(unet: nn.Module, hook_point: str, sae: Any) -> nn.Module:
    """The hooked module, after checking that its width matches the SAE's ``d_in``."""
    module = get_submodule(unet, hook_point)
    channels = block_channels(module, unet)
    if channels is not None and channels != sae.d_in:
        raise ConfigError(f"the SAE expects {sae.d_in} channels but {hook_point!r} of this model has {channels}; "
                          f"this SAE was made for {sae.config.hook_point or 'another block'} of "
                          f"{sae.config.model_family or 'another model'}")
    return module


class BlockHook:
    """Context manager: call ``fn`` on every output of ``model.<path>``.

    ``model`` is the denoiser (its forward pre-hook records the timestep of each call).
    ``cfg_layout`` says how the batch is split under CFG: ``"uncond_cond"`` (diffusers'
    pipelines: ``cat([uncond, cond])``), ``"cond_uncond"``, ``"none"`` (every row conditional),
    or a zero-argument callable returning one of those at each call (see :func:`pipeline_hook`).
    ``residual``: hand ``fn`` the block's update (output minus input) and add its edit onto the output.
    """

    def __init__(self, model: nn.Module, path: str, fn: HookFn,
                 cfg_layout: CfgLayout | Callable[[], CfgLayout] = "none", residual: bool = False) -> None:
        self.model = model
        self.path = path
        self.module = get_submodule(model, path)
        self.fn = fn
        self.cfg_layout = cfg_layout
        self.residual = residual
        self.stream = _stream_index(self.module)
        self.timestep_scale = _TIMESTEP_SCALE.get(type(model).__name__, 1.0)
        self.calls = 0
        self._timesteps: Optional[Tensor] = None
        self._layout: CfgLayout = "none"
        self._handles: list[Any] = []

    # Recording the timestep on the UNet is needed because the hooked block never sees it.
    def _unet_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 and isinstance(args[1], (Tensor, int, float)) else kwargs.get("timestep")
        if sample is None or t is None:
            self._timesteps = None
        else:
            t = torch.as_tensor(t).detach().float().flatten().cpu() * self.timestep_scale
            self._timesteps = t.expand(sample.shape[0]).clone() if t.numel() == 1 else t
        layout = self.cfg_layout() if callable(self.cfg_layout) else self.cfg_layout
        if layout not in ("none", "uncond_cond", "cond_uncond"):
            raise HookError(f"cfg_layout must be 'none', 'uncond_cond' or 'cond_uncond', got {layout!r}")
        self._layout = layout

    def _unet_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._timesteps = None

    def _block_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = _primary(output, self.stream)
        out_tokens, spatial = to_tokens(hidden)
        in_tokens = None
        if self.residual:
            given = kwargs.get("hidden_states", args[0] if args else None)
            if not isinstance(given, Tensor):
                raise HookError(f"residual hook on {self.path!r}: the block was called without hidden states")
            in_tokens = to_tokens(given)[0]

        def make_call(tokens: Tensor) -> BlockCall:
            self.calls += 1
            return BlockCall(tokens=tokens, spatial=spatial, timesteps=self._timesteps,
                             is_cond=cfg_rows(tokens.shape[0], self._layout), call_index=self.calls - 1)

        new = edit_block(self.fn, out_tokens, in_tokens, make_call)
        return None if new is None else _replace_primary(output, from_tokens(new, spatial, hidden), self.stream)

    def attach(self) -> "BlockHook":
        if self._handles:
            raise HookError("hook is already attached")
        try:
            if self.module is not self.model:
                self._handles.append(self.model.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
                self._handles.append(self.model.register_forward_hook(self._unet_post_hook))
            self._handles.append(self.module.register_forward_hook(self._block_hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._timesteps = None

    def __enter__(self) -> "BlockHook":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def pipeline_cfg_layout(pipe: Any) -> Callable[[], CfgLayout]:
    """CFG layout of a diffusers pipeline, read at each denoiser call (``[uncond, cond]`` when CFG is on; FLUX
    pipelines run the halves in separate calls, and guidance-distilled ones have no unconditional half)."""
    def layout() -> CfgLayout:
        return "uncond_cond" if bool(getattr(pipe, "do_classifier_free_guidance", False)) else "none"
    return layout


def pipeline_hook(pipe: Any, path: str, fn: HookFn, residual: bool = False) -> BlockHook:
    """A :class:`BlockHook` on the pipeline's denoiser that labels CFG halves the way the pipeline batches them."""
    return BlockHook(denoiser(pipe), path, fn, cfg_layout=pipeline_cfg_layout(pipe), residual=residual)
