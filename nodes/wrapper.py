"""A block that runs an SAE patch on its output, as a ComfyUI object patch that keeps the block's module tree."""

from __future__ import annotations

from typing import Any

from torch import nn

from .comfy_layout import ComfyBlockPatch

_WRAPPED_CLASSES: dict[type, type] = {}


class _SAEPatchedBlock:
    """Mixed into a copy of the block's own class: ComfyUI still dispatches on the type (``SpatialTransformer``)."""

    sae_inner: nn.Module
    sae_patch: ComfyBlockPatch

    def forward(self, x: Any, context: Any = None, transformer_options: Any = {}, *args: Any, **kwargs: Any) -> Any:
        # The wrapped block's forward, not its __call__: its hooks are this module's hooks and run once, around this.
        out = self.sae_inner.forward(x, context, transformer_options, *args, **kwargs)
        return self.sae_patch.apply(out, transformer_options, x)


def _wrapped_class(cls: type) -> type:
    if issubclass(cls, _SAEPatchedBlock):
        return cls
    if cls not in _WRAPPED_CLASSES:
        _WRAPPED_CLASSES[cls] = type(f"SAEPatched{cls.__name__}", (_SAEPatchedBlock, cls), {})
    return _WRAPPED_CLASSES[cls]


def wrap_block(block: nn.Module, patch: ComfyBlockPatch) -> nn.Module:
    """A stand-in for ``block`` that runs it, then ``patch`` on its output.

    It holds the very children, parameters and buffers of ``block`` under their own names (it shares their
    registries), so the model keeps every module name and weight ComfyUI knows while the object patch is applied:
    weight patches (LoRA, merges) are applied to the same tensors by the same keys, in any order of nodes. ``block``
    itself (possibly another clone's stand-in, when erasers are chained) is kept aside, not registered as a child.
    """
    wrapped = object.__new__(_wrapped_class(type(block)))
    wrapped.__dict__.update(block.__dict__)
    wrapped.__dict__["sae_inner"] = block
    wrapped.__dict__["sae_patch"] = patch  # not a submodule: the patch holds the SAE
    return wrapped
