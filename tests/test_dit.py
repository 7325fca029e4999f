"""DiT models (FLUX, SD3/MMDiT): erasure through the diffusers hooks and through ComfyUI's block replacements
(``patches_replace["dit"]``, the real ComfyUI host) agree on tiny random-weight models converted by ComfyUI's own
key map; residual SAEs; the Concept Eraser and Feature Inspector nodes sample a tiny FLUX through ComfyUI."""

from __future__ import annotations

import pytest
import torch
from planted import concept

from saeuron_core.erasure.eraser import erase
from saeuron_core.errors import ConfigError
from saeuron_core.hosts.hooks import BlockHook
from saeuron_core.sae.library import add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

SIGMA = 0.6  # timestep 600 on both hosts


def dit_sae(width: int, hook_point: str, residual: bool = False) -> TopKSAE:
    """A random SAE of the block's width whose concept "cat" is features 0-7 wherever they fire."""
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=width, n_latents=64, k=16, hook_point=hook_point, residual=residual))
    add_concept(sae, concept("cat", {range(50): list(range(4))}, threshold=0.0, mu=1.0))
    return sae


@pytest.fixture(scope="module")
def models(comfy):
    import comfy_host
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    out = {}
    for arch, cls, cfg in (("flux", FluxTransformer2DModel, comfy_host.TINY_FLUX),
                           ("sd3", SD3Transformer2DModel, comfy_host.TINY_SD3)):
        torch.manual_seed(0)
        model = cls(**cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
        out[arch] = (model, comfy_host.tiny_dit(model))
    return out


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` latents as FLUX's 2x2 patch tokens ``[B, H*W/4, 4C]`` (diffusers' and ComfyUI's order)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def forward_both(arch, models, sae=None, method="ablate", strength=10.0, **region):
    """One CFG-batched ``[uncond, cond]`` call of the denoiser in diffusers and in ComfyUI, erased by ``sae`` if
    given: ``(diffusers output, ComfyUI output)``, both as ComfyUI lays them out."""
    import comfy_host

    model, patcher = models[arch]
    torch.manual_seed(3)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.randn(2, 16)
    with torch.no_grad():
        if arch == "flux":
            ids = torch.zeros(4, 4, 3)
            ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
            call = dict(hidden_states=pack(x), encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=torch.full((2,), SIGMA), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3),
                        return_dict=False)
        else:
            call = dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=torch.full((2,), SIGMA * 1000), return_dict=False)
        if sae is None:
            diffusers_out = model(**call)[0]
        else:
            with erase(model, sae, ["cat"], method, strength=strength, cfg_layout="uncond_cond", **region):
                diffusers_out = model(**call)[0]
    if arch == "flux":
        diffusers_out = diffusers_out  # already packed tokens
    erased = patcher if sae is None else comfy_host.node_class("SAeUronConceptEraser").execute(
        patcher, sae, "cat", method, strength, 0.0, 1.0, "both", **region).args[0]
    options = {**erased.model_options["transformer_options"], "cond_or_uncond": [1, 0],
               "sigmas": torch.tensor([SIGMA])}
    sampling = erased.model.model_sampling
    erased.patch_model()
    try:
        with torch.no_grad():
            t = sampling.timestep(torch.full((2,), SIGMA))
            comfy_out = erased.model.diffusion_model(x, t, context=ctx, y=pooled, transformer_options=options)
    finally:
        erased.unpatch_model()
    return diffusers_out, (pack(comfy_out) if arch == "flux" else comfy_out)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_the_tiny_models_are_the_same_model_in_both_hosts(models, arch):
    diffusers_out, comfy_out = forward_both(arch, models)
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)


CASES = [("flux", "transformer_blocks.1", False), ("flux", "single_transformer_blocks.0", False),
         ("flux", "transformer_blocks.0", True), ("flux", "single_transformer_blocks.1", True),
         ("sd3", "transformer_blocks.0", False), ("sd3", "transformer_blocks.0", True)]


@pytest.mark.parametrize("arch, hook_point, residual", CASES)
@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_comfyui_and_diffusers_erase_the_same(models, arch, hook_point, residual, method):
    width = 32 if arch == "flux" else 128
    sae = dit_sae(width, hook_point, residual)
    plain = forward_both(arch, models)[0]
    diffusers_out, comfy_out = forward_both(arch, models, sae, method, 10.0 if method == "ablate" else 1.0)
    assert not torch.allclose(diffusers_out, plain, atol=1e-4), "nothing was erased"
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)
    zero = forward_both(arch, models, sae, "ablate", 0.0)
    torch.testing.assert_close(zero[1], plain, atol=1e-5, rtol=1e-5)  # strength 0 changes nothing in ComfyUI


@pytest.mark.parametrize("hook_point", ["transformer_blocks.1", "single_transformer_blocks.0"])
@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_a_painted_mask_limits_the_erasure_on_flux_the_same_in_both_hosts(models, hook_point, method):
    sae = dit_sae(32, hook_point)
    top = torch.zeros(1, 64, 64)
    top[:, :32] = 1.0  # the upper half of a 64 px picture: the upper two of the 4x4 patch rows
    strength = 10.0 if method == "ablate" else 1.0
    whole = forward_both("flux", models, sae, method, strength)[0]
    plain = forward_both("flux", models)[0]
    for mode in ("inside", "outside"):
        diffusers_out, comfy_out = forward_both("flux", models, sae, method, strength, mask=top, mask_mode=mode)
        assert not torch.allclose(diffusers_out, plain, atol=1e-4) and not torch.allclose(diffusers_out, whole,
                                                                                         atol=1e-4)
        torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)


def test_erasers_chain_on_one_dit_block(models):
    """Two erasers on the same FLUX block: both edits apply (the second runs around the first)."""
    import comfy_host

    eraser = comfy_host.node_class("SAeUronConceptEraser")
    patcher = models["flux"][1]
    one = dit_sae(32, "transformer_blocks.1")
    first = eraser.execute(patcher, one, "cat", "ablate", 10.0, 0.0, 1.0, "both").args[0]
    both = eraser.execute(first, one, "cat", "ablate", 10.0, 0.0, 1.0, "both").args[0]
    replaced = both.model_options["transformer_options"]["patches_replace"]["dit"]
    assert list(replaced) == [("double_block", 1)]
    assert "patches_replace" not in patcher.model_options["transformer_options"]  # the input MODEL is unchanged
    assert replaced[("double_block", 1)].__self__.previous is not None


@pytest.mark.parametrize("hook_point, width, message", [
    ("transformer_blocks.9", 32, "has no block transformer_blocks.9; it has 2 transformer_blocks"),
    ("transformer_blocks.0", 48, "expects 48 channels but transformer_blocks.0 of this model has 32"),
    ("up_blocks.1.attentions.1", 32, "is not a block of this FLUX model"),
])
def test_an_sae_that_does_not_fit_the_dit_is_refused(models, hook_point, width, message):
    import comfy_host

    sae = dit_sae(width, hook_point)
    with pytest.raises(ConfigError, match=message):
        comfy_host.node_class("SAeUronConceptEraser").execute(models["flux"][1], sae, "cat", "ablate", 1.0, 0.0, 1.0,
                                                               "both")
    with pytest.raises(ConfigError, match="single-stream"):
        comfy_host.node_class("SAeUronConceptEraser").execute(models["sd3"][1], dit_sae(128, "single_transformer_blocks.0"),
                                                              "cat", "ablate", 1.0, 0.0, 1.0, "both")


def test_flux_samples_through_comfyui_with_the_eraser_and_the_inspector(models):
    """ComfyUI's own sampler on a guidance-distilled-style FLUX call (cfg 1: no unconditional half)."""
    import comfy_host

    import nodes as comfy_nodes

    patcher = models["flux"][1]
    sae = dit_sae(32, "transformer_blocks.1")
    torch.manual_seed(4)
    pos = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 16)}]]
    neg = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 16)}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample(model, cfg):
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(model, 0, 3, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]

    erased = comfy_host.node_class("SAeUronConceptEraser").execute(patcher, sae, "cat", "ablate", 10.0, 0.0, 1.0,
                                                                   "both").args[0]
    for cfg in (1.0, 3.0):
        plain, changed = sample(patcher, cfg), sample(erased, cfg)
        assert torch.isfinite(changed).all() and not torch.allclose(plain, changed)
    assert torch.equal(sample(patcher, 1.0), plain if cfg == 1.0 else sample(patcher, 1.0))

    class PixelVAE:  # the overlay needs an image: show the latent's first 3 channels
        def decode(self, samples):
            return ((samples[:, :3] + 1) / 2).clamp(0, 1).movedim(1, -1)

    with torch.inference_mode():
        out = comfy_host.node_class("SAeUronFeatureInspector").execute(
            patcher, sae, pos, neg, latent, PixelVAE(), "cat", 0, 3, 1.0, "euler", "simple", 4)
    overlay, heat, summary = out.args
    assert overlay.shape == (1, 8, 8, 3) and heat.shape == (1, 8, 8) and float(heat.max()) > 0
    assert len(summary.strip().splitlines()) == 3


def test_learn_concept_node_learns_on_flux(models, tiny_pipe, tmp_path):
    """Learn Concept samples a tiny FLUX with ComfyUI's sampler (a tiny CLIP: its 32-wide states are the text,
    FLUX reads the first 16 of its pooled output) and adds a concept selected at the DiT block."""
    import comfy_host

    from saeuron_core.sae.library import concept_names, get_concept

    clip = comfy_host.tiny_clip(tiny_pipe, tmp_path / "clip")
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=64, k=16, hook_point="transformer_blocks.1", residual=True))
    learned = comfy_host.node_class("SAeUronLearnConcept").execute(
        models["flux"][1], clip, sae, {"samples": torch.zeros(1, 4, 8, 8)}, "cat", "a cat\na small cat",
        "a dog\na house", 0, 3, 1.0, "euler", "simple", 4, min_specificity=0.0).args[0]
    assert concept_names(learned) == ["cat"] and not sae.concepts
    data = get_concept(learned, "cat")
    assert int(data.n_selected[data.observed].min()) > 0 and data.max_timestep == 1000


def test_a_flux_sae_folder_in_the_published_layout_erases_the_same_in_both_hosts(models, tmp_path):
    """A folder laid out like the public FLUX SAE (config.json + state_dict.pth, no block in its name), loaded by
    the Load SAE node with its hook_point and converted to the native file: a residual SAE that erases at the DiT
    block identically in ComfyUI and diffusers, before and after conversion."""
    import comfy_host
    from test_import_sdlens import write_sdlens

    from saeuron_core.sae.files import load_sae, save_sae

    folder = comfy_host._STATE["models"] / "sae" / "SAE_flux_tiny"
    write_sdlens(folder, d=32, n=64, k=8, final=False)
    loaded = comfy_host.node_class("SAeUronLoadSAE").execute("SAE_flux_tiny", hook_point="transformer_blocks.1").args[0]
    assert loaded.config.residual and loaded.config.hook_point == "transformer_blocks.1"
    updates = []  # the block's updates on the test input: the concept is the features they use most
    with BlockHook(models["flux"][0], "transformer_blocks.1", lambda call: updates.append(call.tokens), residual=True):
        forward_both("flux", models)
    codes = loaded.encode(torch.cat(updates).flatten(0, 1))
    active = codes.indices[codes.values > 0]
    top = torch.bincount(active, minlength=64).topk(4).indices.tolist()
    add_concept(loaded, concept("cat", {range(50): top}, threshold=0.0, mu=1.0))
    save_sae(loaded, tmp_path / "native.safetensors")
    plain = forward_both("flux", models)[0]
    results = []
    for sae in (loaded, load_sae(tmp_path / "native.safetensors")):
        diffusers_out, comfy_out = forward_both("flux", models, sae, "ablate", 10.0)
        assert not torch.allclose(diffusers_out, plain, atol=1e-4)
        torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=1e-4)
        results.append(diffusers_out)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
