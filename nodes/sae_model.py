"""The SAE as a model of ComfyUI's memory manager, loaded with the MODEL it patches.

Every patch that runs an SAE attaches that SAE's :class:`ModelPatcher` as one of the MODEL's additional models, so
the sampler loads it with the MODEL, ``comfy.model_management`` counts it, offloads it (all or, in lowvram mode,
part of it) and frees it on ``/free``. One patcher per SAE: every eraser on that SAE shares its single device copy.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from saeuron_core.sae.model import TopKSAE

ADDITIONAL_MODELS_KEY = "saeuron_sae"
_PATCHERS: "weakref.WeakKeyDictionary[TopKSAE, Any]" = weakref.WeakKeyDictionary()


class _Tensors(nn.Module):
    """A leaf holding parameters of a module that also has children (the SAE's own ``W_dec``, ``b_dec``)."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name, param)


class SAEWeights(nn.Module):
    """The SAE's weights as leaf modules, the unit ComfyUI loads and offloads one at a time.

    The leaves hold the SAE's own parameter objects, and moving a module moves its parameters in place, so wherever
    ComfyUI puts them is where the SAE's weights are; the SAE's forward code is not involved.
    """

    def __init__(self, sae: TopKSAE) -> None:
        super().__init__()
        for index, (_, module) in enumerate(sae.named_modules()):
            own = dict(module.named_parameters(recurse=False))
            if own:
                leaf = module if next(module.children(), None) is None else _Tensors(own)
                self.add_module(f"part{index}", leaf)


def sae_model(sae: TopKSAE) -> Any:
    """The one ModelPatcher of ``sae`` (made on first use): loads it on ComfyUI's torch device, offloads it where
    ComfyUI offloads the UNet."""
    import comfy.model_management
    import comfy.model_patcher

    patcher = _PATCHERS.get(sae)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(SAEWeights(sae),
                                                   load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _PATCHERS[sae] = patcher
    return patcher


def attach_sae(model: Any, sae: TopKSAE) -> None:
    """Make ``sae`` one of the additional models of the MODEL clone ``model`` (once, however many patches use it)."""
    attached = model.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    patcher = sae_model(sae)
    if all(m.model is not patcher.model for m in attached):
        model.set_additional_models(ADDITIONAL_MODELS_KEY, [*attached, patcher])
