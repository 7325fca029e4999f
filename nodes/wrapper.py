"""A stand-in for a ``SpatialTransformer`` that runs an SAE patch on its output (ComfyUI object patch)."""

from __future__ import annotations

from typing import Any

from comfy.ldm.modules.attention import SpatialTransformer
from torch import nn

from .comfy_layout import ComfyBlockPatch


class SAEWrappedTransformer(SpatialTransformer):
    """Still a ``SpatialTransformer`` (ComfyUI dispatches on the type), delegating to the wrapped one.

    Attribute look-ups fall through to the wrapped module so ComfyUI's weight patching by the
    original key names keeps working while the object patch is applied.
    """

    def __init__(self, inner: nn.Module, patch: ComfyBlockPatch) -> None:
        nn.Module.__init__(self)
        self.inner = inner
        self.__dict__["sae_patch"] = patch  # not a submodule: the patch holds the SAE

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        # The wrapped weights keep their own key names, so ComfyUI's weight patches (LoRA) still find them.
        return self._modules["inner"].state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def forward(self, x: Any, context: Any = None, transformer_options: Any = {}, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(x, context, transformer_options, *args, **kwargs)
        return self.sae_patch.apply(out, transformer_options, x)
