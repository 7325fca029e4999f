"""The node pack inside the real ComfyUI host (in-process, CPU): patching, sampling, equivalence."""

import json

import comfy_host
import pytest
import torch
from conftest import HOOK

from saeuron_core.concepts.learning import learn_concept
from saeuron_core.erasure.eraser import ConceptEraser
from saeuron_core.erasure.regions import RegionEdit
from saeuron_core.errors import ConfigError
from saeuron_core.hosts.hooks import BlockHook
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import concept_names, get_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE
from comfy_host import combo_choices


@pytest.fixture(scope="module")
def host(comfy, tiny_pipe, tmp_path_factory):
    import comfy_host

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK, model_family="sd1"))
    learn_concept(tiny_pipe, sae, "cat", ["a cat", "a small cat"], ["a dog", "a house"], steps=10,
                  guidance_scale=5.0, min_specificity=0.0, progress=False)
    learn_concept(tiny_pipe, sae, "dog", ["a dog", "a big dog"], ["a cat", "a house"], steps=10,
                  guidance_scale=5.0, min_specificity=0.0, progress=False)
    models = comfy_host._STATE["models"]
    save_sae(sae, models / "sae" / "tiny.safetensors")
    clip = comfy_host.tiny_clip(tiny_pipe, tmp_path_factory.mktemp("clip"))
    return {"pack": comfy, "model": comfy_host.tiny_model(tiny_pipe.unet), "clip": clip, "sae": sae,
            "models": models, "pipe": tiny_pipe}


def node(host, name):
    """The node class ComfyUI registered for ``name`` (V3: classmethods ``execute`` / ``validate_inputs``)."""
    import comfy_host

    return comfy_host.node_class(name)


def sae_at(host, hook_point: str, residual: bool = False) -> TopKSAE:
    """The host's SAE (weights and the concepts cat and dog) placed at another block of the same width."""
    sae = TopKSAE(SAEConfig(**{**host["sae"].config.to_dict(), "hook_point": hook_point, "residual": residual}))
    sae.load_state_dict(host["sae"].state_dict())
    sae.concepts, sae.extra_tensors = host["sae"].concepts, host["sae"].extra_tensors
    return sae


def run(host, name, *args, **kwargs):
    """``execute`` of a node; its outputs as a tuple (and the NodeOutput's ``ui``)."""
    out = node(host, name).execute(*args, **kwargs)
    return out.args


def sample(host, model, prompt="a cat", seed=0, steps=4):
    import nodes as comfy_nodes

    clip = host["clip"]
    pos = [[clip.encode_from_tokens(clip.tokenize(prompt)), {}]]
    neg = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


PACK_NODES = {"SAeUronLoadSAE", "SAeUronConceptEraser", "SAeUronLearnConcept", "SAeUronSaveSAE",
              "SAeUronFeatureInspector", "SAeUronLoadDiffusersModel", "SAeUronEmptyLatent", "SAeUronLoadConcepts",
              "SAeUronSaveConcepts"}


def test_every_node_is_a_v3_node_registered_through_the_entry_point(host):
    """ComfyUI loaded the pack through ``comfy_entrypoint`` (it exports no NODE_CLASS_MAPPINGS) as V3 nodes."""
    import comfy_host
    from comfy_api.latest import io

    assert set(comfy_host._STATE["node_ids"]) == PACK_NODES
    assert not hasattr(host["pack"], "NODE_CLASS_MAPPINGS") and callable(host["pack"].comfy_entrypoint)
    for name in PACK_NODES:
        assert issubclass(node(host, name), io.ComfyNode)


def test_nodes_have_tooltips_descriptions_and_category(host):
    for name in PACK_NODES:
        cls = node(host, name)
        assert cls.CATEGORY == "SAeUron" and cls.DESCRIPTION
        for spec in cls.INPUT_TYPES()["required"].values():
            assert spec[1].get("tooltip"), cls


def test_load_sae_lists_native_files_and_imported_folders(host):
    folder = host["models"] / "sae" / "unet.up_blocks.1.attentions.1"
    folder.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in host["sae"].tensors().items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 32, "num_latents": 128, "k": 8}))
    choices = combo_choices(node(host, "SAeUronLoadSAE").INPUT_TYPES()["required"]["sae_name"])
    assert {"tiny.safetensors", "unet.up_blocks.1.attentions.1"} <= set(choices)
    loaded = run(host, "SAeUronLoadSAE", "tiny.safetensors")[0]
    assert concept_names(loaded) == ["cat", "dog"]
    assert run(host, "SAeUronLoadSAE", "unet.up_blocks.1.attentions.1")[0].source_format == "sparsify"
    with pytest.raises(ConfigError, match="outside the sae model folder"):
        run(host, "SAeUronLoadSAE", "../../etc/passwd")


def test_eraser_patches_a_clone_and_never_the_input(host):
    model = host["model"]
    before = sample(host, model)
    options_before = json.dumps(str(model.model_options)), dict(model.object_patches)
    erased_model = run(host, "SAeUronConceptEraser", model, host["sae"], "cat", "ablate", 20.0, 0.0, 1.0,
                                                            "both")[0]
    erased = sample(host, erased_model)
    after = sample(host, model)
    assert not torch.allclose(before, erased)
    assert torch.equal(before, after)
    assert (json.dumps(str(model.model_options)), dict(model.object_patches)) == options_before
    zero = run(host, "SAeUronConceptEraser", model, host["sae"], "cat", "ablate", 0.0, 0.0, 1.0, "both")[0]
    assert torch.equal(sample(host, zero), before)


def test_erasers_chain(host):
    model = host["model"]
    eraser = node(host, "SAeUronConceptEraser")
    cat = eraser.execute(model, host["sae"], "cat", "ablate", 20.0, 0.0, 1.0, "both").args[0]
    both_chained = eraser.execute(cat, host["sae"], "dog", "ablate", 20.0, 0.0, 1.0, "both").args[0]
    both_at_once = eraser.execute(model, host["sae"], "cat, dog", "ablate", 20.0, 0.0, 1.0, "both").args[0]
    chained, at_once, only_cat = (sample(host, m, "a cat and a dog") for m in (both_chained, both_at_once, cat))
    assert not torch.allclose(chained, only_cat)
    assert len(both_chained.model_options["transformer_options"]["patches"]["output_block_patch"]) == 2
    assert torch.isfinite(at_once).all() and torch.isfinite(chained).all()


def raw_outputs(host, hook_point, sae, method="ablate", **options):
    """One UNet call on the same inputs through diffusers hooks and through the ComfyUI patch."""
    import comfy.utils

    torch.manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    out = erased_outputs(host, host["model"], host["pipe"].unet, sae, hook_point, "cat", method, x, ctx, **options)
    assert isinstance(comfy.utils.get_attr(host["model"].model, "diffusion_model.output_blocks.5.1"),
                      __import__("comfy.ldm.modules.attention", fromlist=["x"]).SpatialTransformer)
    return out


def comfy_forward(patched, x, t, ctx, sigma):
    """One CFG-batched ``[uncond, cond]`` call of a patched MODEL's UNet, with the options ComfyUI's sampler sets."""
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [1, 0], "sigmas": sigma}
    patched.patch_model()
    try:
        with torch.no_grad():
            return patched.model.diffusion_model(x, timesteps=t, context=ctx, transformer_options=options)
    finally:
        patched.unpatch_model()


def erased_outputs(host, model, unet, sae, hook_point, concept, method, x, ctx, **options):
    """``(diffusers output, ComfyUI output, plain output)`` of one CFG-batched UNet call with ``concept`` erased."""
    strength = 10.0 if method == "ablate" else 1.0
    sigma = model.model.model_sampling.sigma(torch.tensor([620.0]))
    t = model.model.model_sampling.timestep(sigma).float()
    region = {k: options.pop(k) for k in ("mask", "mask_mode") if k in options}
    fn = ConceptEraser(sae, [concept], method, strength=strength, **options)
    if "mask" in region:
        fn = RegionEdit(fn, region["mask"], region.get("mask_mode", "inside"))
    with torch.no_grad(), BlockHook(unet, hook_point, fn, cfg_layout="uncond_cond", residual=sae.config.residual):
        diffusers_out = unet(x, t.expand(2), encoder_hidden_states=ctx).sample
    node_options = {k: (", ".join(f"{c}={e}" for c, e in v.items()) if k == "detect_with" else v)
                    for k, v in options.items()}
    patched = run(host, "SAeUronConceptEraser", model, sae, concept, method, strength, 0.0, 1.0, "both",
                  **node_options, **region)[0]
    comfy_out = comfy_forward(patched, x, t.expand(2), ctx, sigma)
    with torch.no_grad():
        plain = unet(x, t.expand(2), encoder_hidden_states=ctx).sample
    return diffusers_out, comfy_out, plain


@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_comfyui_and_diffusers_paths_agree(host, method):
    diffusers_out, comfy_out, plain = raw_outputs(host, HOOK, host["sae"], method)
    assert not torch.allclose(diffusers_out, plain, atol=1e-4)
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_a_residual_sae_erases_the_same_in_both_hosts(host, method):
    """An SAE reading the block's update (output - input): an object patch (it sees the block's input) even where
    an output patch would do, and the same erasure as the diffusers residual hook."""
    sae = sae_at(host, HOOK, residual=True)
    patched = run(host, "SAeUronConceptEraser", host["model"], sae, "cat", method, 10.0 if method == "ablate" else 1.0,
                  0.0, 1.0, "both")[0]
    assert list(patched.object_patches) == ["diffusion_model.output_blocks.4.1"]
    diffusers_out, comfy_out, plain = raw_outputs(host, HOOK, sae, method)
    assert not torch.allclose(diffusers_out, plain, atol=1e-4)
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(diffusers_out, raw_outputs(host, HOOK, host["sae"], method)[0], atol=1e-4)


@pytest.mark.parametrize("method", ["ablate", "replace"])
@pytest.mark.parametrize("hook_point", [HOOK, "up_blocks.1.attentions.2"])  # an output patch, an object patch
def test_a_painted_mask_limits_the_erasure_the_same_in_both_hosts(host, method, hook_point):
    sae = sae_at(host, hook_point)
    left = torch.zeros(1, 16, 16)
    left[..., :8] = 1.0
    whole = raw_outputs(host, hook_point, sae, method)
    for mode in ("inside", "outside"):
        diffusers_out, comfy_out, plain = raw_outputs(host, hook_point, sae, method, mask=left, mask_mode=mode)
        assert not torch.allclose(diffusers_out, plain, atol=1e-4) and not torch.allclose(diffusers_out, whole[0],
                                                                                         atol=1e-4)
        torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)
    error = node(host, "SAeUronConceptEraser").validate_inputs(concepts="cat", mask_mode="middle")
    assert isinstance(error, str) and "mask_mode 'middle' is not one of the choices" in error


def test_min_coverage_reaches_the_eraser_and_gates_images(host):
    gated = raw_outputs(host, HOOK, host["sae"], min_coverage=0.05)
    torch.testing.assert_close(gated[1], gated[0], atol=1e-4, rtol=1e-4)   # node and diffusers agree
    closed = raw_outputs(host, HOOK, host["sae"], min_coverage=1.0)
    assert not torch.allclose(raw_outputs(host, HOOK, host["sae"])[0], closed[2], atol=1e-4)
    torch.testing.assert_close(closed[1], closed[2], atol=1e-5, rtol=1e-5)  # nothing covers the whole map
    error = node(host, "SAeUronConceptEraser").validate_inputs(concepts="cat", min_coverage=1.5)
    assert isinstance(error, str) and "min_coverage must be between 0 and 1" in error
    # another entry decides where cat is: the node passes 'concept=entry' pairs through
    by_dog = raw_outputs(host, HOOK, host["sae"], min_coverage=0.05, detect_with={"cat": "dog"})
    torch.testing.assert_close(by_dog[1], by_dog[0], atol=1e-4, rtol=1e-4)
    error = node(host, "SAeUronConceptEraser").validate_inputs(concepts="cat", detect_with="cat")
    assert isinstance(error, str) and "detect_with takes 'concept=entry' pairs" in error
    with pytest.raises(ConfigError, match="unknown concept 'horse'"):
        run(host, "SAeUronConceptEraser", host["model"], host["sae"], "cat", "ablate", 1.0, 0.0, 1.0, "both",
                                                 min_coverage=0.1, detect_with="cat=horse")


def test_the_erasers_option_inputs_come_from_erase_options(host):
    """The Concept Eraser's inputs method to detect_with are EraseOptions' fields with node metadata; ComfyUI hands
    validate_inputs the widget inputs only, as a signature naming each would get."""
    import inspect

    from comfy_api.internal import first_real_override

    from saeuron_core.erasure.options import EraseOptions

    eraser = node(host, "SAeUronConceptEraser")
    ids = [i.id for i in eraser.define_schema().inputs]
    assert ids == ["model", "sae", "concepts", "method", "strength", "start_percent", "end_percent", "cfg_half",
                   "min_coverage", "detect_with", "mask", "mask_mode", "replace_also_at"]
    spec = inspect.getfullargspec(first_real_override(eraser, "validate_inputs"))
    assert spec.varkw is None and sorted(spec.args[1:]) == sorted(set(ids) - {"model", "sae", "mask"})
    want = EraseOptions(method="replace", strength=0.5, start=0.1, end=0.9, cfg="cond", min_coverage=0.2,
                        detect_with={"cat": "dog"})
    assert eraser.options("replace", 0.5, 0.1, 0.9, "cond", 0.2, "cat=dog") == want
    assert eraser.options("replace", 0.5, 0.1, 0.9, cfg_half="cond", min_coverage=0.2, detect_with="cat=dog") == want
    assert eraser.options() == EraseOptions(detect_with={})  # a widget not given: its default
    with pytest.raises(TypeError, match="unknown or repeated input cfg"):
        eraser.options(cfg="cond")


def test_an_eraser_option_added_to_erase_options_reaches_the_node_and_the_cli(host):
    """Adding an eraser option is one EraseOptions field, whose metadata says where it is offered, and its test."""
    import argparse
    import dataclasses
    import inspect
    import sys

    from saeuron_cli.erase import erase_fields
    from saeuron_core.erasure.options import EraseOptions

    @dataclasses.dataclass(frozen=True)
    class WithFeather(EraseOptions):
        feather: int = dataclasses.field(default=0, metadata={
            "help": "replace: soften the mask's edge over this many patches", "cli": True,
            "node": {"input": "feather_px", "widget": "int", "tooltip": "Soften the mask's edge.", "min": 0, "max": 8,
                     "step": 1, "optional": True}})

    shipped = sys.modules[node(host, "SAeUronConceptEraser").__module__].ERASER_OPTIONS
    added = type(shipped)(WithFeather)
    assert added.names() == [*shipped.names(), "feather_px"]
    widget = added.inputs()[-1]
    assert (widget.id, widget.default, widget.min, widget.max, widget.step, widget.optional, widget.tooltip) == \
        ("feather_px", 0, 0, 8, 1, True, "Soften the mask's edge.")
    assert [i.as_dict() for i in added.inputs()[:-1]] == [i.as_dict() for i in shipped.inputs()]
    assert added.build(("replace", 0.5), {"feather_px": 3}) == WithFeather(method="replace", strength=0.5, feather=3,
                                                                           detect_with={})
    assert "feather_px" in inspect.signature(added.signed(lambda concepts="", **options: None)).parameters
    parser = argparse.ArgumentParser()
    erase_fields(WithFeather).add_to(parser)
    args = parser.parse_args(["--method", "replace", "--feather", "2"])
    assert erase_fields(WithFeather).build(args) == WithFeather(method="replace", feather=2)
    assert erase_fields(WithFeather).names == (*erase_fields().names, "feather")


def test_block_before_an_upsampler_or_last_uses_an_object_patch(host):
    """up_blocks.1.attentions.2 is the UNet's last block here: it needs the wrapped SpatialTransformer."""
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point="up_blocks.1.attentions.2"))
    sae.concepts, sae.extra_tensors = host["sae"].concepts, host["sae"].extra_tensors
    patched = run(host, "SAeUronConceptEraser", host["model"], sae, "cat", "ablate", 10.0, 0.0, 1.0, "both")[0]
    assert list(patched.object_patches) == ["diffusion_model.output_blocks.5.1"]
    diffusers_out, comfy_out, plain = raw_outputs(host, "up_blocks.1.attentions.2", sae)
    assert not torch.allclose(diffusers_out, plain, atol=1e-4)
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)
    # While patched, the wrapped weights keep their key names (ComfyUI's LoRA patching relies on them).
    patched.patch_model()
    try:
        keys = set(patched.model.state_dict())
    finally:
        patched.unpatch_model()
    assert keys == set(host["model"].model.state_dict())


def test_an_eraser_built_after_another_clone_was_sampled_wraps_the_original_block(host):
    """ComfyUI 0.3.x leaves a sampled clone's object patches applied on the shared model until it unpatches
    lazily. An eraser built then, on another clone of the same MODEL, must still wrap the model's own block,
    not the other clone's eraser: the same pictures as when built on an unpatched model."""
    import comfy.model_management

    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point="up_blocks.1.attentions.2"))  # object patch
    sae.concepts, sae.extra_tensors = host["sae"].concepts, host["sae"].extra_tensors
    model = host["model"]
    comfy.model_management.unload_all_models()
    replace_alone = sample(host, run(host, "SAeUronConceptEraser", model, sae, "cat", "replace", 1.0, 0.0, 1.0,
                                     "both")[0])
    comfy.model_management.unload_all_models()
    ablate = run(host, "SAeUronConceptEraser", model, sae, "cat", "ablate", 20.0, 0.0, 1.0, "both")[0]
    ablated = sample(host, ablate)  # leaves ablate's wrapper on the shared model
    replace = run(host, "SAeUronConceptEraser", model, sae, "cat", "replace", 1.0, 0.0, 1.0, "both")[0]
    assert not isinstance(replace.object_patches["diffusion_model.output_blocks.5.1"].sae_inner,
                          type(replace.object_patches["diffusion_model.output_blocks.5.1"]))
    assert torch.equal(sample(host, replace), replace_alone)
    assert not torch.equal(ablated, replace_alone)
    comfy.model_management.unload_all_models()


def test_erasers_on_two_blocks_chain_like_two_diffusers_hooks(host):
    """An eraser on a down block (object patch) chained with one on the up block (output patch), as the
    erase_object_and_style workflow does with the demo's object and style SAEs: the same output as two
    diffusers hooks, and the input MODEL untouched."""
    down = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point="down_blocks.0.attentions.1"))
    down.concepts, down.extra_tensors = host["sae"].concepts, host["sae"].extra_tensors
    model, unet, eraser = host["model"], host["pipe"].unet, node(host, "SAeUronConceptEraser")
    torch.manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    sigma = model.model.model_sampling.sigma(torch.tensor([620.0]))
    t = model.model.model_sampling.timestep(sigma).float().expand(2)
    with torch.no_grad(), BlockHook(unet, "down_blocks.0.attentions.1", ConceptEraser(down, ["cat"], "ablate",
                                                                                       strength=10.0),
                                    cfg_layout="uncond_cond"), \
            BlockHook(unet, HOOK, ConceptEraser(host["sae"], ["dog"], "ablate", strength=10.0), cfg_layout="uncond_cond"):
        both = unet(x, t, encoder_hidden_states=ctx).sample
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
    first = eraser.execute(model, down, "cat", "ablate", 10.0, 0.0, 1.0, "both").args[0]
    chained = eraser.execute(first, host["sae"], "dog", "ablate", 10.0, 0.0, 1.0, "both").args[0]
    assert list(chained.object_patches) == ["diffusion_model.input_blocks.2.1"]
    assert len(chained.model_options["transformer_options"]["patches"]["output_block_patch"]) == 1
    assert not model.object_patches and "patches" not in model.model_options.get("transformer_options", {})
    comfy_out = comfy_forward(chained, x, t, ctx, sigma)
    assert not torch.allclose(both, plain, atol=1e-4)
    torch.testing.assert_close(comfy_out, both, atol=1e-4, rtol=1e-4)


def test_eraser_errors(host):
    eraser = node(host, "SAeUronConceptEraser")
    with pytest.raises(ConfigError, match=r"unknown concept 'horse'; this SAE knows: 'cat', 'dog'"):
        eraser.execute(host["model"], host["sae"], "horse", "ablate", 1.0, 0.0, 1.0, "both")
    with pytest.raises(ConfigError, match="no concept chosen; this SAE knows: cat, dog"):
        eraser.execute(host["model"], host["sae"], " , ", "ablate", 1.0, 0.0, 1.0, "both")
    wide = TopKSAE(SAEConfig(d_in=1280, n_latents=64, k=4, hook_point=HOOK))
    with pytest.raises(ConfigError, match="expects 1280 channels but 'up_blocks.1.attentions.1' of this model has 32"):
        eraser.execute(host["model"], wide, "cat", "ablate", 1.0, 0.0, 1.0, "both")
    elsewhere = TopKSAE(SAEConfig(d_in=32, n_latents=64, k=4, hook_point="up_blocks.3.attentions.1"))
    elsewhere.concepts, elsewhere.extra_tensors = {}, {}
    with pytest.raises(ConfigError, match="no attention block 'up_blocks.3.attentions.1'; it has"):
        eraser.execute(host["model"], elsewhere, "cat", "ablate", 1.0, 0.0, 1.0, "both")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        eraser.execute(host["model"], host["sae"], "cat", "replace", 2.0, 0.0, 1.0, "both")


def test_learn_concept_and_save_sae(host):
    learned = run(host, "SAeUronLearnConcept", 
        host["model"], host["clip"], host["sae"], {"samples": torch.zeros(1, 4, 8, 8)}, "tree",
        "a tree\na tall tree", "a house\na car", 0, 3, 5.0, "euler", "normal", 2, min_specificity=0.0)[0]
    assert concept_names(learned) == ["cat", "dog", "tree"]
    assert concept_names(host["sae"]) == ["cat", "dog"]  # the input SAE is not changed
    save = node(host, "SAeUronSaveSAE")
    save.execute(learned, "learned.safetensors", False)
    assert concept_names(load_sae(host["models"] / "sae" / "learned.safetensors")) == ["cat", "dog", "tree"]
    with pytest.raises(ConfigError, match="already exists"):
        save.execute(learned, "learned", False)
    save.execute(host["sae"], "learned", True)
    assert concept_names(load_sae(host["models"] / "sae" / "learned.safetensors")) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="inside the sae model folder"):
        save.execute(learned, "../escape.safetensors", False)


def test_learn_concept_checks_each_negative_prompt_with_peak_specificity(host):
    learn = node(host, "SAeUronLearnConcept")
    # One negative prompt is the positive prompt itself (same seed, so the same activations): pooled with
    # the other negative, the concept's features still stand out; checked against each one, none does.
    args = (host["model"], host["clip"], host["sae"], {"samples": torch.zeros(1, 4, 8, 8)}, "tree",
            "a tree", "a tree\na car", 0, 3, 5.0, "euler", "normal", 2)
    pooled = get_concept(learn.execute(*args, min_specificity=0.0).args[0], "tree")
    assert int(pooled.n_selected.sum()) > 0
    with pytest.raises(ConfigError, match="against every negative prompt"):
        learn.execute(*args, min_specificity=0.0, peak_specificity=0.05)
    with pytest.raises(ConfigError, match="peak_specificity must be in"):
        learn.execute(*args, peak_specificity=1.5)


def test_feature_inspector_outputs_overlay_mask_and_summary(host):
    import comfy_host

    clip = host["clip"]
    pos = [[clip.encode_from_tokens(clip.tokenize("a cat")), {}]]
    neg = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    inspector = node(host, "SAeUronFeatureInspector")
    with torch.inference_mode():
        out = inspector.execute(host["model"], host["sae"], pos, neg, {"samples": torch.zeros(1, 4, 8, 8)},
                                comfy_host.tiny_vae(), "cat", 0, 4, 5.0, "euler", "normal", 5)
    overlay, heat, summary = out.args
    assert overlay.shape == (1, 16, 16, 3) and 0 <= float(overlay.min()) and float(overlay.max()) <= 1
    assert heat.shape == (1, 16, 16) and 0 <= float(heat.min()) and float(heat.max()) <= 1
    assert len(summary.strip().splitlines()) == 4 and out.ui["text"] == [summary]
    preview = out.ui["saeuron_overlay"]  # the temp preview the page shows on the node
    assert len(preview) == 1 and preview[0]["type"] == "temp"
    with pytest.raises(ConfigError, match="choose a concept"):
        inspector.execute(host["model"], host["sae"], pos, neg, {"samples": torch.zeros(1, 4, 8, 8)},
                          comfy_host.tiny_vae(), "", 0, 4, 5.0, "euler", "normal", 5)


def test_load_diffusers_model_matches_the_diffusers_components(host, tmp_path):
    import folder_paths

    pipe = host["pipe"]
    root = host["models"] / "diffusers"
    pipe.save_pretrained(str(root / "tiny"), safe_serialization=True)
    folder_paths.folder_names_and_paths["diffusers"] = ([str(root)], ["folder"])
    loader = node(host, "SAeUronLoadDiffusersModel")
    assert combo_choices(loader.INPUT_TYPES()["required"]["model_path"]) == ["tiny", "saeuron-demo"]  # the pack's demo last
    model, clip, vae = loader.execute("tiny").args
    torch.manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(model.model.diffusion_model(x, timesteps=t, context=ctx),
                                   pipe.unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-5, rtol=1e-5)
        ids = pipe.tokenizer("a red cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = clip.encode_from_tokens(clip.tokenize("a red cat"))
        assert (cond - pipe.text_encoder(ids)[0]).abs().max() < 1e-2
        latent = torch.randn(1, 4, 8, 8)
        image = vae.decode(latent)
        torch.testing.assert_close(image[0].permute(2, 0, 1), (pipe.vae.decode(latent).sample[0] / 2 + 0.5).clamp(0, 1),
                                   atol=1e-5, rtol=1e-5)
    assert model.model.latent_format.scale_factor == pipe.vae.config.scaling_factor
    with pytest.raises(ConfigError, match="outside the diffusers model folder"):
        loader.execute("../sae")


def test_unloading_and_reloading_the_model_keeps_the_behaviour(host):
    import comfy.model_management

    erased_model = run(host, "SAeUronConceptEraser", host["model"], host["sae"], "cat", "replace", 1.0, 0.0,
                                                            1.0, "both")[0]
    first, plain = sample(host, erased_model), sample(host, host["model"])
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(host, erased_model), first)
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(host, host["model"]), plain)


def test_pixel_space_demo_model_loads_and_samples_with_stock_nodes(host):
    """The demo model's layout (pixel space, no vae/) through Load Diffusers Model, KSampler and VAEDecode."""
    import folder_paths
    from test_demo_pipeline import _save_random_demo

    import nodes as comfy_nodes
    from saeuron_demo.pipeline import load_demo_pipeline

    root = host["models"] / "diffusers"
    _save_random_demo(root / "pixel-demo")
    folder_paths.folder_names_and_paths["diffusers"] = ([str(root)], ["folder"])
    pipe = load_demo_pipeline(root / "pixel-demo")
    model, clip, vae = run(host, "SAeUronLoadDiffusersModel", "pixel-demo")
    torch.manual_seed(0)
    x, ctx, t = torch.randn(2, 3, 32, 32), torch.randn(2, 77, 64), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(model.model.diffusion_model(x, timesteps=t, context=ctx),
                                   pipe.unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-5, rtol=1e-5)
        ids = pipe.tokenizer("a star in stripes style", padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        cond = clip.encode_from_tokens(clip.tokenize("a star in stripes style"))
        assert (cond - pipe.text_encoder(ids)[0]).abs().max() < 1e-2
    latent = run(host, "SAeUronEmptyLatent", vae, 32, 32, 2)[0]
    assert latent["samples"].shape == (2, 3, 32, 32) and not latent["samples"].any()
    pos = comfy_nodes.CLIPTextEncode().encode(clip, "a star in stripes style")[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    with torch.inference_mode():
        out = comfy_nodes.common_ksampler(model, 0, 3, 3.0, "ddim", "normal", pos, neg, latent)[0]
    image = comfy_nodes.VAEDecode().decode(vae, out)[0]
    assert image.shape == (2, 32, 32, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert torch.equal(vae.encode(image), (image * 2 - 1).movedim(-1, 1))
    import comfy_host

    sd_like = comfy_host.tiny_vae()
    f = sd_like.downscale_ratio
    assert run(host, "SAeUronEmptyLatent", sd_like, 8 * f, 8 * f, 1)[0]["samples"].shape == (1, 4, 8, 8)
    with pytest.raises(ConfigError, match=f"multiples of the VAE's downscale factor {f}"):
        run(host, "SAeUronEmptyLatent", sd_like, 8 * f + 1, 8 * f, 1)


def test_cosine_schedule_matches_diffusers(host):
    import comfy.model_sampling

    from saeuron_demo.model import train_scheduler

    sched = train_scheduler()
    settings = comfy_host.pack_module("nodes.comfy_layout").sampling_settings_from_scheduler(dict(sched.config))

    class Config:
        sampling_settings = settings

    ms = comfy.model_sampling.ModelSamplingDiscrete(Config())
    ac = sched.alphas_cumprod.double()
    torch.testing.assert_close(ms.sigmas.double(), ((1 - ac) / ac).sqrt(), atol=1e-5, rtol=1e-3)  # ComfyUI keeps float32


@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_shipped_demo_erasure_agrees_between_comfyui_and_diffusers(host, method):
    """The shipped demo model and SAE: erasing "stripes" gives the same UNet output in both hosts."""
    import shutil

    import folder_paths
    from comfy_host import DEMO_ASSETS

    from saeuron_demo.pipeline import load_demo_pipeline

    root = host["models"] / "diffusers"
    if not (root / "shipped-demo").exists():
        shutil.copytree(DEMO_ASSETS / "model", root / "shipped-demo")
    folder_paths.folder_names_and_paths["diffusers"] = ([str(root)], ["folder"])
    model = run(host, "SAeUronLoadDiffusersModel", "shipped-demo")[0]
    pipe = load_demo_pipeline(DEMO_ASSETS / "model")
    sae = load_sae(DEMO_ASSETS / "sae.safetensors")
    ids = pipe.tokenizer(["", "a star in stripes style"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
    torch.manual_seed(5)
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1) * 2.0
    diffusers_out, comfy_out, plain = erased_outputs(host, model, pipe.unet, sae, sae.config.hook_point, "stripes",
                                                     method, x, ctx)
    assert not torch.allclose(diffusers_out, plain, atol=1e-4), "nothing was erased"
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)


def test_linked_model_files_and_folders_load_and_only_escaping_names_are_refused(host, tmp_path):
    """Models kept on another disk and linked into ComfyUI's model folders (a linked file, a linked model folder,
    a linked sae folder) load; names that leave a folder are refused."""
    import folder_paths

    other_disk = tmp_path / "other-disk"
    save_sae(host["sae"], other_disk / "linked.safetensors")
    host["pipe"].save_pretrained(str(other_disk / "tiny-linked"), safe_serialization=True)
    (host["models"] / "sae" / "linked.safetensors").symlink_to(other_disk / "linked.safetensors")
    root = host["models"] / "diffusers"
    root.mkdir(exist_ok=True)
    (root / "tiny-linked").symlink_to(other_disk / "tiny-linked", target_is_directory=True)
    folder_paths.folder_names_and_paths["diffusers"] = ([str(root)], ["folder"])
    assert "linked.safetensors" in combo_choices(node(host, "SAeUronLoadSAE").INPUT_TYPES()["required"]["sae_name"])
    assert concept_names(run(host, "SAeUronLoadSAE", "linked.safetensors")[0]) == ["cat", "dog"]
    assert node(host, "SAeUronLoadSAE").validate_inputs(sae_name="linked.safetensors") is True
    assert "tiny-linked" in combo_choices(node(host, "SAeUronLoadDiffusersModel").INPUT_TYPES()["required"]["model_path"])
    assert run(host, "SAeUronLoadDiffusersModel", "tiny-linked")[0] is not None
    with pytest.raises(ConfigError, match="outside the diffusers model folder"):
        run(host, "SAeUronLoadDiffusersModel", "../../other-disk/tiny-linked")
    message = node(host, "SAeUronLoadSAE").validate_inputs(sae_name="../sae/linked.safetensors")
    assert isinstance(message, str) and "is not one of the choices" in message
    # the whole sae folder a link to another disk
    saved = folder_paths.folder_names_and_paths["sae"]
    (tmp_path / "models-sae").symlink_to(other_disk, target_is_directory=True)
    folder_paths.folder_names_and_paths["sae"] = ([str(tmp_path / "models-sae")], {".safetensors"})
    try:
        assert concept_names(run(host, "SAeUronLoadSAE", "linked.safetensors")[0]) == ["cat", "dog"]
    finally:
        folder_paths.folder_names_and_paths["sae"] = saved


def test_replace_also_at_later_blocks_agrees_with_the_library(host):
    """The node's replace_also_at replays the detection at a later block as erase(also_at=...) does in diffusers."""
    from saeuron_core.erasure.eraser import erase

    sae = sae_at(host, "down_blocks.0.attentions.1")
    model, unet = host["model"], host["pipe"].unet
    torch.manual_seed(6)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    sigma = model.model.model_sampling.sigma(torch.tensor([620.0]))
    t = model.model.model_sampling.timestep(sigma).float().expand(2)
    outs = {}
    for later in ((), (HOOK,)):
        with torch.no_grad(), erase(unet, sae, ["cat"], "replace", strength=1.0, also_at=later, cfg_layout="uncond_cond"):
            outs[later] = unet(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(outs[()], outs[(HOOK,)], atol=1e-4)  # the later block changes the result
    patched = run(host, "SAeUronConceptEraser", model, sae, "cat", "replace", 1.0, 0.0, 1.0, "both",
                  replace_also_at=HOOK)[0]
    comfy_out = comfy_forward(patched, x, t, ctx, sigma)
    torch.testing.assert_close(comfy_out, outs[(HOOK,)], atol=1e-4, rtol=1e-4)
    error = node(host, "SAeUronConceptEraser").validate_inputs(concepts="cat", method="ablate", replace_also_at=HOOK)
    assert isinstance(error, str) and "only method 'replace'" in error


def test_the_pack_offers_its_demo_files_and_a_users_own_files_of_those_names_win(host, tmp_path):
    """The example workflows' model and SAEs are listed without any copying; a user's own file or folder of the
    same name is listed once and is the one loaded."""
    import shutil

    import comfy_host
    import folder_paths

    files = comfy_host.demo_files()
    choices = combo_choices(node(host, "SAeUronLoadSAE").INPUT_TYPES()["required"]["sae_name"])
    assert set(files.DEMO_SAES) <= set(choices)
    styles = run(host, "SAeUronLoadSAE", "saeuron-demo-styles.safetensors")[0]
    assert concept_names(styles) == concept_names(load_sae(files.shipped_sae("saeuron-demo-styles.safetensors")))
    pipelines = combo_choices(node(host, "SAeUronLoadDiffusersModel").INPUT_TYPES()["required"]["model_path"])
    assert "saeuron-demo" in pipelines

    own = host["models"] / "sae" / "saeuron-demo-styles.safetensors"
    save_sae(host["sae"], own)
    own_model = __import__("pathlib").Path(folder_paths.get_folder_paths("diffusers")[0]) / "saeuron-demo"
    shutil.copytree(files.shipped_pipeline("saeuron-demo"), own_model)
    (own_model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**json.loads((own_model / "scheduler" / "scheduler_config.json").read_text()), "beta_schedule": "unknown"}))
    try:
        choices = combo_choices(node(host, "SAeUronLoadSAE").INPUT_TYPES()["required"]["sae_name"])
        assert choices.count("saeuron-demo-styles.safetensors") == 1
        assert concept_names(run(host, "SAeUronLoadSAE", "saeuron-demo-styles.safetensors")[0]) == ["cat", "dog"]
        pipelines = combo_choices(node(host, "SAeUronLoadDiffusersModel").INPUT_TYPES()["required"]["model_path"])
        assert pipelines.count("saeuron-demo") == 1
        with pytest.raises(ConfigError, match="beta_schedule 'unknown'"):  # the user's folder is the one read
            run(host, "SAeUronLoadDiffusersModel", "saeuron-demo")
    finally:
        own.unlink()
        shutil.rmtree(own_model)


def test_learn_concept_from_a_word(host, monkeypatch):
    import sys

    from saeuron_core.concepts.prompts import Vocabulary, prompts_from_word

    learn = node(host, "SAeUronLearnConcept")
    # The node builds its prompts from GENERIC; a small vocabulary in its place keeps the sampling short.
    small = Vocabulary(subjects=("cat", "dog", "house"), styles=("Monet", "Van Gogh", "ink"))
    monkeypatch.setattr(sys.modules[learn.__module__], "GENERIC", small)
    inputs = learn.define_schema().inputs
    assert [i.id for i in inputs[-2:]] == ["word", "kind"] and all(i.optional for i in inputs[-2:])
    args = (host["model"], host["clip"], host["sae"], {"samples": torch.zeros(1, 4, 8, 8)}, "van gogh", "", "", 0, 1,
            5.0, "euler", "normal", 2)
    assert learn.validate_inputs(concept_name="van gogh", word="Van Gogh", kind="style") is True
    assert "not both" in learn.validate_inputs(concept_name="x", positive_prompts="a x", word="x")
    assert "or a word" in learn.validate_inputs(concept_name="x")
    learned = get_concept(learn.execute(*args, min_specificity=0.0, word="Van Gogh", kind="style").args[0], "van gogh")
    assert (learned.info["word"], learned.info["kind"]) == ("Van Gogh", "style")
    assert (learned.info["positive"], learned.info["negative"]) == prompts_from_word("Van Gogh", "style", small)
    with pytest.raises(ConfigError, match="either prompt lists or a word, not both"):
        learn.execute(*args[:5], "a x", "", *args[7:], word="x")
