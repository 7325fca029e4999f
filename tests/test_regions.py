"""Paint where to erase: an edit kept only inside (or outside) a mask, on UNet grids and DiT token sequences."""

import contextlib

import pytest
import torch
from conftest import HOOK
from planted import D, sae_with_concepts

from saeuron_core.erasure.eraser import ConceptEraser, erase
from saeuron_core.erasure.regions import RegionEdit, token_grid, token_mask
from saeuron_core.errors import ConfigError
from saeuron_core.hosts.hooks import BlockCall, BlockHook


def call_of(tokens, spatial=None, is_cond=None):
    batch = tokens.shape[0]
    return BlockCall(tokens=tokens, spatial=spatial, timesteps=torch.full((batch,), 500.0),
                     is_cond=torch.ones(batch, dtype=torch.bool) if is_cond is None else is_cond, call_index=0)


def cat_tokens(batch=2, h=4, w=4):
    """Every token carries the planted "cat" feature 3."""
    x = torch.zeros(batch, h * w, D)
    x[..., 3] = 2.0
    return x


LEFT = torch.zeros(16, 16)
LEFT[:, :8] = 1.0  # the left half of the picture


@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_edits_stay_inside_or_outside_the_painted_region(method):
    eraser = ConceptEraser(sae_with_concepts(), ["cat"], method, strength=1.0 if method == "replace" else 5.0,
                           source="sample")
    x = cat_tokens()
    full = eraser(call_of(x, (4, 4)))
    inside = RegionEdit(eraser, LEFT)(call_of(x, (4, 4)))
    outside = RegionEdit(eraser, LEFT, "outside")(call_of(x, (4, 4)))
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    left = left.flatten()
    if method == "ablate":  # replace on a map the concept covers entirely has nothing to copy from: mean fallback
        assert not torch.equal(full[:, left], x[:, left])
    assert torch.equal(inside[:, left], full[:, left]) and torch.equal(inside[:, ~left], x[:, ~left])
    assert torch.equal(outside[:, ~left], full[:, ~left]) and torch.equal(outside[:, left], x[:, left])


def test_dit_sequences_take_the_grid_of_the_mask_aspect_ratio():
    assert token_grid(16, None, 64, 64) == (4, 4)
    assert token_grid(32, None, 64, 128) == (4, 8)
    assert token_grid(12, (3, 4), 1, 1) == (3, 4)
    with pytest.raises(ConfigError, match="cannot lay 7 tokens out as a grid"):
        token_grid(7, None, 64, 64)
    wide = torch.zeros(1, 8, 16)
    wide[..., 8:] = 1.0  # right half
    rows = token_mask(wide, call_of(torch.zeros(1, 8, D)))
    assert rows.tolist() == [[False, False, True, True, False, False, True, True]]


def test_each_picture_uses_its_mask_and_cfg_halves_their_picture_s():
    masks = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])  # picture 0 everywhere, picture 1 nowhere
    is_cond = torch.tensor([False, False, True, True])  # [uncond 0, uncond 1, cond 0, cond 1]
    rows = token_mask(masks, call_of(torch.zeros(4, 4, D), (2, 2), is_cond))
    assert rows.all(1).tolist() == [True, False, True, False] and not rows[1].any()


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 4, 5), "shape"), (torch.full((4, 4), 2.0), "between 0 and 1"),
    (torch.full((4, 4), float("nan")), "finite"), ([[1.0]], "tensor"),
])
def test_bad_masks_are_refused(bad, message):
    eraser = ConceptEraser(sae_with_concepts(), ["cat"], "ablate")
    with pytest.raises(ConfigError, match=message):
        RegionEdit(eraser, bad)
    with pytest.raises(ConfigError, match="mask_mode must be"):
        RegionEdit(eraser, LEFT, "middle")


def test_erase_with_a_mask_changes_only_the_region_of_the_block(tiny_pipe):
    """Through the diffusers hook on the tiny pipeline's UNet: the hooked block's output changes only inside."""
    from saeuron_core.concepts.learning import learn_concept
    from saeuron_core.sae.model import SAEConfig, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK))
    learn_concept(tiny_pipe, sae, "cat", ["a cat"], ["a dog"], steps=4, guidance_scale=5.0, min_specificity=0.0,
                  progress=False)
    unet = tiny_pipe.unet
    seen = {}

    def record(name):
        def fn(call):
            seen[name] = call.tokens.clone()
        return fn

    torch.manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    for options in (None, {}, {"mask": LEFT}, {"mask": LEFT, "mask_mode": "outside"}):
        with contextlib.ExitStack() as stack, torch.no_grad():
            if options is not None:
                stack.enter_context(erase(unet, sae, ["cat"], "ablate", strength=20.0, **options))
            name = "plain" if options is None else options.get("mask_mode", "inside" if "mask" in options else "full")
            stack.enter_context(BlockHook(unet, HOOK, record(name), cfg_layout="uncond_cond"))  # sees the edit
            unet(x, t, encoder_hidden_states=ctx)
    h, w = 8, 8  # the block's grid for 8x8 latents (up_blocks.1 is at full resolution here)
    left = (torch.arange(h * w) % w) < w // 2
    plain, full = seen["plain"], seen["full"]
    assert not torch.equal(full[:, left], plain[:, left])
    assert torch.equal(seen["inside"][:, ~left], plain[:, ~left]) and torch.equal(seen["inside"][:, left], full[:, left])
    assert torch.equal(seen["outside"][:, left], plain[:, left]) and torch.equal(seen["outside"][:, ~left],
                                                                                full[:, ~left])
