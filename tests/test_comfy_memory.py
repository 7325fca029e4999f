"""The SAE under ComfyUI's memory manager (``comfy.model_management``, CPU): loaded with the patched MODEL, counted,
partially offloadable and freed; one copy per SAE however many erasers use it, and none kept by the erasers."""

from __future__ import annotations

import torch
from test_comfy_nodes import host, run, sample  # noqa: F401  (host is a fixture)

from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.sae.model import TopKSAE


def sae_bytes(sae: TopKSAE) -> int:
    return sum(p.numel() * p.element_size() for p in sae.parameters())


def loaded_sae_patchers() -> list:
    import comfy.model_management
    import comfy_host

    weights = comfy_host.pack_module("nodes.sae_model").SAEWeights
    return [m.model for m in comfy.model_management.current_loaded_models
            if m.model is not None and isinstance(m.model.model, weights)]


def eraser(model, sae, concept: str, method: str = "ablate"):
    return run(None, "SAeUronConceptEraser", model, sae, concept, method, 10.0 if method == "ablate" else 1.0,
               0.0, 1.0, "both")[0]


def test_erasers_on_one_sae_share_one_model_that_comfyui_loads_counts_and_frees(host):
    import comfy.model_management
    import comfy_host

    key = comfy_host.pack_module("nodes.sae_model").ADDITIONAL_MODELS_KEY
    model, sae = host["model"], host["sae"]
    comfy.model_management.unload_all_models()
    chained = eraser(eraser(model, sae, "cat"), sae, "dog")
    other = eraser(model, sae, "dog", "replace")
    attached = chained.get_additional_models_with_key(key)
    assert len(attached) == 1 and attached[0].model is other.get_additional_models_with_key(key)[0].model
    assert not model.get_additional_models_with_key(key)  # the input MODEL is unchanged
    # ComfyUI moves the SAE's own parameters: the patcher's module holds them, not copies
    held = {id(p) for p in attached[0].model.parameters()}
    assert held == {id(p) for p in sae.parameters()}
    assert attached[0].model_size() == sae_bytes(sae)

    sample(host, chained)
    sample(host, other)
    loaded = loaded_sae_patchers()
    assert len(loaded) == 1 and loaded[0].model is attached[0].model  # one copy for both graphs
    assert loaded[0].loaded_size() == sae_bytes(sae)
    comfy.model_management.unload_all_models()  # what POST /free does
    assert loaded_sae_patchers() == []


def test_a_partly_offloaded_sae_erases_the_same(host):
    """ComfyUI may offload part of the SAE (lowvram): its leaves move one by one, the count follows, and the eraser
    reads the weights wherever they are."""
    import comfy.model_management

    model, sae = host["model"], host["sae"]
    comfy.model_management.unload_all_models()
    erased = eraser(model, sae, "cat")
    whole = sample(host, erased)
    patcher = loaded_sae_patchers()[0]
    freed = patcher.partially_unload(patcher.offload_device, memory_to_free=1)
    assert 0 < freed < sae_bytes(sae) and patcher.loaded_size() == sae_bytes(sae) - freed
    assert torch.equal(sample(host, erased), whole)
    comfy.model_management.unload_all_models()


def test_the_eraser_keeps_no_copy_of_the_sae(host):
    sae = host["sae"]
    fn = ConceptEraser(sae, ["cat"], "ablate", strength=10.0)
    assert sae.on_device(sae.device) is sae
    moved = sae.on_device(torch.device("meta"))  # elsewhere: a copy for one call, with the same weights' shapes
    assert moved is not sae and moved.W_dec.device.type == "meta" and moved.W_dec.shape == sae.W_dec.shape
    held = [v for v in vars(fn).values() if isinstance(v, TopKSAE)]
    nested = [v for v in vars(fn).values() if isinstance(v, dict) and any(isinstance(x, TopKSAE) for x in v.values())]
    assert held == [sae] and not nested
