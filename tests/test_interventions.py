import dataclasses
import pathlib
import re

import pytest
import torch
from conftest import HOOK
from planted import D, sae_with_concepts

from saeuron_core.concepts.learning import learn_concept
from saeuron_core.erasure.eraser import ConceptEraser, erase
from saeuron_core.erasure.options import EraseOptions
from saeuron_core.erasure.regions import RegionEdit
from saeuron_core.errors import ConfigError, HookError
from saeuron_core.hosts.diffusers import generate
from saeuron_core.hosts.hooks import BlockCall
from saeuron_core.sae.library import get_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

H = W = 8


def call_for(tokens, timesteps, is_cond=None, spatial=(H, W)):
    b = tokens.shape[0]
    return BlockCall(tokens=tokens, spatial=spatial, timesteps=torch.as_tensor(timesteps, dtype=torch.float32),
                     is_cond=torch.ones(b, dtype=torch.bool) if is_cond is None else is_cond, call_index=0)


def background(b=2, seed=0):
    """Tokens [b, 64, D] with small values on channels 10..15 only (no concept features fire)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, H * W, D)
    x[..., 10:] = torch.rand(b, H * W, 6, generator=g) * 0.5 + 0.5
    return x


def test_ablation_changes_only_firing_features_where_they_fire():
    sae = sae_with_concepts()
    x = background()
    x[0, :5, 3] = 2.0     # concept fires strongly
    x[0, 5:8, 3] = 0.05   # below the 0.1 threshold: not firing
    x[1, 10, 5] = 1.0     # the other concept: not erased here
    out = ConceptEraser(sae, ["cat"], "ablate", strength=4.0)(call_for(x, [900.0, 900.0]))
    expected = x.clone()
    expected[0, :5, 3] = 2.0 * (-4.0 * 0.5)  # a -> gamma * mu * a
    assert torch.equal(out, expected)
    untouched = torch.ones(2, H * W, dtype=torch.bool)
    untouched[0, :5] = False
    assert torch.equal(out[untouched], x[untouched])  # bit-for-bit, reconstruction error kept


def test_two_concepts_compose_and_strengths_are_per_concept():
    sae = sae_with_concepts()
    x = background()
    x[0, 0, 3] = 2.0
    x[0, 1, 5] = 2.0
    out = ConceptEraser(sae, {"cat": 1.0, "dog": 3.0}, "ablate")(call_for(x, [100.0, 100.0]))
    assert out[0, 0, 3] == pytest.approx(-1.0) and out[0, 1, 5] == pytest.approx(-3.0)
    only_cat = ConceptEraser(sae, ["cat"], "ablate")(call_for(x, [100.0, 100.0]))
    assert only_cat[0, 1, 5] == 2.0


def test_features_follow_the_timestep_value():
    sae = sae_with_concepts()
    x = background()
    x[:, 0, 7] = 2.0
    x[:, 0, 8] = 2.0
    out = ConceptEraser(sae, ["early"], "ablate")(call_for(x, [900.0, 100.0]))
    assert out[0, 0, 7] < 0 and out[0, 0, 8] == 2.0   # noisy timestep: feature 7
    assert out[1, 0, 7] == 2.0 and out[1, 0, 8] < 0   # clean timestep: feature 8


@pytest.mark.parametrize("kwargs", [dict(strength=0.0), dict(concepts=[]), dict(start=0.5, end=0.8)])
def test_identity_cases_on_a_block_call(kwargs):
    sae = sae_with_concepts()
    x = background()
    x[:, :4, 3] = 2.0
    concepts = kwargs.pop("concepts", ["cat"])
    eraser = ConceptEraser(sae, concepts, "ablate", **kwargs)
    assert eraser(call_for(x, [900.0, 950.0])) is None  # progress 0.1 / 0.05: outside 0.5..0.8


def test_cfg_rows_option():
    sae = sae_with_concepts()
    x = background(4)
    x[:, 0, 3] = 2.0
    is_cond = torch.tensor([False, False, True, True])
    cond_only = ConceptEraser(sae, ["cat"], cfg="cond")(call_for(x, [500.0] * 4, is_cond))
    assert cond_only[:2, 0, 3].tolist() == [2.0, 2.0] and (cond_only[2:, 0, 3] < 0).all()
    uncond_only = ConceptEraser(sae, ["cat"], cfg="uncond")(call_for(x, [500.0] * 4, is_cond))
    assert (uncond_only[:2, 0, 3] < 0).all() and uncond_only[2:, 0, 3].tolist() == [2.0, 2.0]


def test_min_coverage_edits_only_images_where_the_concept_covers_enough_of_the_map():
    sae = sae_with_concepts()
    x = background(2)
    x[0, :16, 3] = 2.0   # cat on a quarter of image 0
    x[1, :4, 3] = 2.0    # cat on a few tokens of image 1 (the stray firing the gate is for)
    x[1, :32, 5] = 2.0   # dog on half of image 1
    call = call_for(x, [500.0, 500.0])
    plain = ConceptEraser(sae, {"cat": 2.0, "dog": 2.0}, "ablate")(call)
    gated = ConceptEraser(sae, {"cat": 2.0, "dog": 2.0}, "ablate", min_coverage=0.2)(call)
    assert torch.equal(gated[0], plain[0])                      # 25% cat: edited as without the gate
    assert (plain[1, :4, 3] < 0).all() and torch.equal(gated[1, :4, 3], x[1, :4, 3])  # 6% cat: left alone
    assert torch.equal(gated[1, :, 5], plain[1, :, 5])         # 50% dog: erased
    # one gate per concept: cat needs 5% of the map, dog 60%
    per = ConceptEraser(sae, {"cat": 2.0, "dog": 2.0}, "ablate", min_coverage={"cat": 0.05, "dog": 0.6})(call)
    assert torch.equal(per[:, :, 3], plain[:, :, 3]) and torch.equal(per[1, :, 5], x[1, :, 5])
    # nothing passes the gate: the call changes nothing
    assert ConceptEraser(sae, ["cat"], "ablate", min_coverage=0.9)(call) is None
    # zero keeps the ungated behaviour bit for bit
    assert torch.equal(ConceptEraser(sae, {"cat": 2.0, "dog": 2.0}, "ablate", min_coverage=0.0)(call), plain)


def test_min_coverage_reads_the_conditional_row_for_both_halves_of_an_image():
    sae = sae_with_concepts()
    x = background(4)
    x[:, :4, 3] = 2.0    # every row: cat on 4 tokens
    x[2, :32, 3] = 2.0   # the conditional row of image 0 shows it on half the map
    is_cond = torch.tensor([False, False, True, True])
    out = ConceptEraser(sae, ["cat"], "ablate", min_coverage=0.25)(call_for(x, [500.0] * 4, is_cond))
    assert (out[0, :4, 3] < 0).all() and (out[2, :32, 3] < 0).all()       # image 0, both halves
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])          # image 1 left alone
    cond_only = ConceptEraser(sae, ["cat"], "ablate", cfg="cond", min_coverage=0.25)(
        call_for(x, [500.0] * 4, is_cond))
    assert torch.equal(cond_only[0], x[0]) and (cond_only[2, :32, 3] < 0).all()
    eraser = ConceptEraser(sae, ["cat"], "replace", min_coverage=0.25, dilation=0, record_masks=True)
    replaced = eraser(call_for(x, [500.0] * 4, is_cond))
    assert torch.equal(replaced[1], x[1]) and torch.equal(replaced[3], x[3])
    assert eraser.masks[0].mask[[1, 3]].sum() == 0 and eraser.masks[0].mask[2].sum() == 32


def test_detect_with_lets_another_entry_decide_where_the_concept_is():
    from planted import concept

    from saeuron_core.sae.library import add_concept

    sae = sae_with_concepts()
    add_concept(sae, concept("cat (detector)", {range(50): [4]}))
    x = background(2)
    x[:, :16, 3] = 2.0   # cat's own feature on a quarter of both images
    x[0, 20:36, 4] = 2.0  # the detector's feature only in image 0
    call = call_for(x, [500.0, 500.0])
    out = ConceptEraser(sae, {"cat": 2.0}, min_coverage=0.2, detect_with={"cat": "cat (detector)"})(call)
    assert (out[0, :16, 3] < 0).all() and torch.equal(out[0, :, 4], x[0, :, 4])  # edits cat's feature, not the detector's
    assert torch.equal(out[1], x[1])                                              # no detector: left alone
    own = ConceptEraser(sae, {"cat": 2.0}, min_coverage=0.2)(call)
    assert (own[1, :16, 3] < 0).all()                                             # its own features: both images
    ungated = ConceptEraser(sae, {"cat": 2.0}, detect_with={"cat": "cat (detector)"})(call)
    assert torch.equal(ungated, own)                                              # no gate: the detector is unused
    with pytest.raises(ConfigError, match=r"unknown concept 'cat \(detecter\)'; this SAE knows: 'cat', 'cat \(detector\)'"):
        ConceptEraser(sae, ["cat"], min_coverage=0.2, detect_with={"cat": "cat (detecter)"})
    with pytest.raises(ConfigError, match="detect_with is set for 'dog', which this eraser does not erase"):
        ConceptEraser(sae, ["cat"], min_coverage=0.2, detect_with={"dog": "cat (detector)"})


@pytest.mark.parametrize("bad, match", [
    (1.5, "min_coverage must be between 0 and 1"), (-0.1, "min_coverage must be between 0 and 1"),
    (float("nan"), "min_coverage must be between 0 and 1"), ({"cat": 2.0}, "min_coverage for 'cat'"),
    ({"horse": 0.1}, "min_coverage is set for 'horse', which this eraser does not erase"),
])
def test_bad_min_coverage(bad, match):
    with pytest.raises(ConfigError, match=match):
        ConceptEraser(sae_with_concepts(), ["cat"], min_coverage=bad)


def channel_stats_error(out, clean):
    mean_err = (out.mean(1) - clean.mean(1)).norm() / clean.mean(1).norm()
    std_err = (out.std(1) - clean.std(1)).norm() / clean.std(1).norm()
    return float(mean_err), float(std_err)


def test_replace_detects_the_planted_region_and_keeps_statistics(capsys):
    sae = sae_with_concepts()
    clean = background(1)  # the same feature map without the concept
    x = clean.clone()
    region = torch.zeros(H, W, dtype=torch.bool)
    region[2:5, 3:6] = True
    x[0, region.flatten(), 3] = 1.5
    eraser = ConceptEraser(sae, ["cat"], "replace", dilation=0, record_masks=True)
    out = eraser(call_for(x, [500.0]))
    assert torch.equal(eraser.masks[0].mask[0], region)
    assert torch.equal(out[0, ~region.flatten()], x[0, ~region.flatten()])  # undetected: bit-for-bit
    assert (out[0, region.flatten(), 3] == 0).all()  # replaced by tokens without the concept
    ablated = ConceptEraser(sae, ["cat"], "ablate", strength=100.0)(call_for(x, [500.0]))
    # Per-channel mean / std over the map, relative L2 error against the concept-free map.
    rep_err, abl_err = channel_stats_error(out, clean), channel_stats_error(ablated, clean)
    with capsys.disabled():
        print(f"\nblock statistics vs concept-free map (mean err, std err): with concept "
              f"{channel_stats_error(x, clean)}, replace {rep_err}, ablate x100 {abl_err}")
    assert max(rep_err) < 0.10
    assert max(abl_err) > 0.10
    dilated = ConceptEraser(sae, ["cat"], "replace", dilation=1, record_masks=True)
    dilated(call_for(x, [500.0]))
    assert int(dilated.masks[0].mask.sum()) == 25  # 3x3 region grown by one patch each way


def test_replace_sources():
    sae = sae_with_concepts()
    x = background(2)
    x[1, :3, 3] = 1.5  # concept in the conditional row only
    is_cond = torch.tensor([False, True])
    out = ConceptEraser(sae, ["cat"], "replace", source="uncond", dilation=0)(call_for(x, [500.0, 500.0], is_cond))
    assert torch.equal(out[1, :3], x[0, :3]) and torch.equal(out[1, 3:], x[1, 3:])
    near = ConceptEraser(sae, ["cat"], "replace", source="nearest", dilation=0)(call_for(x, [500.0, 500.0], is_cond))
    assert torch.equal(near[1, 0], x[1, 8])  # (0,0) -> nearest undetected patch: (1,0), tie broken by order
    half = ConceptEraser(sae, ["cat"], "replace", strength=0.5)(call_for(x, [500.0, 500.0], is_cond))
    assert torch.allclose(half[1, :3, 3], torch.full((3,), 0.75))
    # Without an unconditional half (CFG off) it falls back to undetected patches of the same map.
    alone = ConceptEraser(sae, ["cat"], "replace", source="uncond", dilation=0)(call_for(x, [500.0, 500.0]))
    assert (alone[1, :3, 3] == 0).all() and torch.equal(alone[1, 3:], x[1, 3:])


def test_replace_with_the_mean_of_the_k_nearest_undetected_patches():
    sae = sae_with_concepts()
    x = background(2)
    x[1, :3, 3] = 1.5
    is_cond = torch.tensor([False, True])
    out = ConceptEraser(sae, ["cat"], "replace", source="nearest", neighbors=3, dilation=0)(call_for(x, [500.0, 500.0], is_cond))
    # (0,0): the three nearest undetected patches are (1,0), (1,1) and (0,3) / (2,0) at distance 2: the mean of
    # the three topk picks, all concept-free
    assert (out[1, :3, 3] == 0).all() and torch.equal(out[1, 3:], x[1, 3:]) and torch.equal(out[0], x[0])
    d = torch.cdist(torch.tensor([[0.0, 0.0]]), torch.tensor([[r, c] for r in range(H) for c in range(W)],
                                                              dtype=torch.float32))[0]
    d[:3] = float("inf")
    assert torch.allclose(out[1, 0], x[1, d.topk(3, largest=False).indices].mean(0))
    with pytest.raises(ConfigError, match="neighbors must be a whole number >= 1"):
        ConceptEraser(sae, ["cat"], "replace", source="nearest", neighbors=0)


def test_a_follower_replaces_what_was_detected_at_a_later_block():
    sae = sae_with_concepts()
    x = background(2)
    x[1, :3, 3] = 1.5  # the concept in the conditional row, first three patches of the 8x8 map
    is_cond = torch.tensor([False, True])
    eraser = ConceptEraser(sae, ["cat"], "replace", source="uncond", dilation=0)
    follow = eraser.follower()
    eraser(call_for(x, [500.0, 500.0], is_cond))
    later = torch.randn(2, 16 * 16, 5)  # a later block: another grid and width
    out = follow(call_for(later, [500.0, 500.0], is_cond, spatial=(16, 16)))
    grid = torch.zeros(16, 16, dtype=torch.bool)
    grid[:2, :6] = True  # the three detected 8x8 patches, nearest-resized to 16x16
    assert torch.equal(out[1, grid.flatten()], later[0, grid.flatten()])  # the uncond row's tokens there
    assert torch.equal(out[1, ~grid.flatten()], later[1, ~grid.flatten()]) and torch.equal(out[0], later[0])
    # another call (a block that runs before the detecting one, or another step) is left alone
    assert follow(call_for(later, [400.0, 400.0], is_cond, spatial=(16, 16))) is None
    eraser(call_for(background(2), [300.0, 300.0], is_cond))  # nothing detected in this call
    assert follow(call_for(later, [300.0, 300.0], is_cond, spatial=(16, 16))) is None
    with pytest.raises(ConfigError, match="only method 'replace'"):
        ConceptEraser(sae, ["cat"], "ablate").follower()


def test_mounts_are_the_eraser_at_its_block_then_its_followers():
    sae = sae_with_concepts()
    x = background(2)
    x[1, :3, 3] = 1.5
    is_cond = torch.tensor([False, True])
    eraser = ConceptEraser(sae, ["cat"], "replace", source="uncond", dilation=0)
    (point, fn, residual), *later = eraser.mounts(["down_blocks.2.attentions.1", "mid_block.attentions.0"])
    assert (point, fn, residual) == (sae.config.hook_point, eraser, False)
    assert [(m.point, m.residual) for m in later] == [("down_blocks.2.attentions.1", False),
                                                      ("mid_block.attentions.0", False)]
    call = call_for(x, [500.0, 500.0], is_cond)
    assert torch.equal(fn(call), ConceptEraser(sae, ["cat"], "replace", source="uncond", dilation=0)(call))
    tokens = torch.randn(2, 16 * 16, 5)
    replayed = later[0].fn(call_for(tokens, [500.0, 500.0], is_cond, spatial=(16, 16)))
    assert replayed is not None and not torch.equal(replayed, tokens)
    # the detection, read without editing: where the features fire, on every row
    assert torch.equal(eraser.detection_mask(call)[1, :3], torch.ones(3, dtype=torch.bool))
    assert not eraser.detection_mask(call)[:, 3:].any() and not eraser.detection_mask(call)[0].any()
    # another point; with a mask, every function is a region edit of it
    mask = torch.zeros(8, 8)
    mask[:4] = 1.0
    mounts = eraser.mounts(["mid_block.attentions.0"], mask, "outside", hook_point="mid_block.attentions.1")
    assert [m.point for m in mounts] == ["mid_block.attentions.1", "mid_block.attentions.0"]
    assert all(isinstance(m.fn, RegionEdit) and m.fn.mode == "outside" for m in mounts)
    assert mounts[0].fn.fn is eraser and mounts[1].fn.fn.eraser is eraser
    assert eraser.mounts() == [(sae.config.hook_point, eraser, False)]
    with pytest.raises(ConfigError, match="only method 'replace'"):
        ConceptEraser(sae, ["cat"], "ablate").mounts(["mid_block.attentions.0"])
    residual = sae_with_concepts()
    residual.config = dataclasses.replace(residual.config, residual=True)
    assert [m.residual for m in ConceptEraser(residual, ["cat"], "replace").mounts(["mid_block.attentions.0"])] == [
        True, False]


def test_nothing_outside_the_erasure_package_reaches_into_an_eraser():
    root = pathlib.Path(__file__).resolve().parents[1]
    private = re.compile(r"\.(_detect|_replacement|_blend|_ablate|_gate|_tables|_last_mask|_build_tables)\b")
    erasure = root / "saeuron_core" / "erasure"
    for path in [*(root / "saeuron_core").rglob("*.py"), *(root / "nodes").rglob("*.py"), *(root / "scripts").rglob("*.py")]:
        if erasure not in path.parents:
            assert not private.search(path.read_text()), f"{path.relative_to(root)} calls an eraser's private method"


def test_fp16_tokens_with_fp32_sae():
    sae = sae_with_concepts()
    x = background().half()
    x[0, :2, 3] = 2.0
    for method in ("ablate", "replace"):
        out = ConceptEraser(sae, ["cat"], method, dilation=0)(call_for(x, [500.0, 500.0]))
        assert out.dtype == torch.float16
        assert torch.equal(out[0, 2:], x[0, 2:]) and torch.equal(out[1], x[1])
        assert (out[0, :2, 3] != 2.0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(strength=-1.0), "between 0 and 100"), (dict(strength=float("nan")), "between 0 and 100"),
    (dict(strength=1000.0), "between 0 and 100"), (dict(method="replace", strength=2.0), "between 0 and 1"),
    (dict(start=0.8, end=0.2), "0 <= start <= end <= 1"), (dict(method="melt"), "'ablate' or 'replace'"),
    (dict(cfg="sometimes"), "'both', 'cond' or 'uncond'"),
])
def test_bad_options(bad, match):
    with pytest.raises(ConfigError, match=match):
        ConceptEraser(sae_with_concepts(), ["cat"], **bad)


def test_one_options_object_or_its_fields_by_name():
    x = background()
    x[0, :5, 3] = 2.0
    call = call_for(x, [900.0, 900.0])
    options = EraseOptions(method="ablate", strength=4.0, start=0.0, end=1.0)
    by_name = ConceptEraser(sae_with_concepts(), ["cat"], "ablate", strength=4.0)(call)
    assert torch.equal(ConceptEraser(sae_with_concepts(), ["cat"], options=options)(call), by_name)
    # fields by name change the given options; the options object itself is left as it was
    weaker = ConceptEraser(sae_with_concepts(), ["cat"], options=options, strength=2.0)
    assert weaker.options.strength == 2.0 and options.strength == 4.0
    assert not torch.equal(weaker(call), by_name)
    with pytest.raises(ConfigError, match="unknown eraser option strenght; the options are .*strength"):
        ConceptEraser(sae_with_concepts(), ["cat"], strenght=2.0)
    with pytest.raises(ConfigError, match="between 0 and 1 for method 'replace'"):
        EraseOptions.build(options, method="replace")  # strength 4 is no share of replacement


def test_unknown_concept_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown concept 'horse'; this SAE knows: 'cat', 'dog', 'early'"):
        ConceptEraser(sae_with_concepts(), ["horse"])


# -- on a real (tiny) diffusers pipeline ------------------------------------------------------------

@pytest.fixture(scope="module")
def learned(tiny_pipe):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK))
    learn_concept(tiny_pipe, sae, "cat", ["a cat", "a small cat"], ["a dog", "a house"], steps=10,
                  guidance_scale=5.0, scheduler="ddim", min_specificity=0.0, progress=False)
    return sae


def latents(pipe, prompts=("a cat",), steps=4, **kw):
    return generate(pipe, list(prompts), list(range(len(prompts))), steps=steps, guidance_scale=5.0, **kw).images


@pytest.mark.parametrize("kwargs", [dict(strength=0.0), dict(concepts=[]), dict(start=0.3, end=0.4)])
def test_pipeline_identity(tiny_pipe, learned, kwargs):
    base = latents(tiny_pipe)
    concepts = kwargs.pop("concepts", ["cat"])
    with erase(tiny_pipe, learned, concepts, strength=kwargs.pop("strength", 5.0), **kwargs):
        same = latents(tiny_pipe)
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)


def test_pipeline_other_sampler_and_step_count_use_the_nearest_learned_timestep(fresh_tiny_pipe, learned):
    """Learned with 10 DDIM steps; applied with 4 Euler steps the features come from the nearest bucket."""
    pipe = fresh_tiny_pipe
    from saeuron_core.hosts.diffusers import set_scheduler

    set_scheduler(pipe, "euler")
    data = get_concept(learned, "cat")
    learned_t = torch.tensor(sorted({float(t) for t in range(1, 1000, 100)}))  # DDIM-10: 901, 801, ..., 1
    seen = []
    base = latents(pipe)
    with erase(pipe, learned, ["cat"], strength=20.0) as eraser:
        original = eraser.buckets
        eraser.buckets = lambda t, n: seen.append(t.clone()) or original(t, n)
        erased = latents(pipe)
    assert not torch.allclose(base, erased)
    assert len(seen) == 4
    for t in torch.cat(seen).unique():
        nearest = learned_t[(learned_t // 20 - t // 20).abs().argmin()]
        assert data.features_at(float(t)) == data.features_at(float(nearest))


def test_pipeline_cfg_batch_non_square_and_masks(tiny_pipe, learned):
    prompts = ("a cat", "a dog")
    base = latents(tiny_pipe, prompts, height=16, width=24)
    assert base.shape == (2, 4, 8, 12)
    with erase(tiny_pipe, learned, ["cat"], "replace", record_masks=True, threshold_scale=0.0) as eraser:
        replaced = latents(tiny_pipe, prompts, height=16, width=24)
    assert eraser.masks and all(m.mask.shape == (4, 8, 12) for m in eraser.masks)
    assert not torch.allclose(base, replaced)
    with erase(tiny_pipe, learned, ["cat"], "ablate", strength=20.0):
        ablated = latents(tiny_pipe, prompts, height=16, width=24)
    assert not torch.allclose(base, ablated)


def test_pipeline_fp16_unet_with_fp32_sae(fresh_tiny_pipe, learned):
    pipe = fresh_tiny_pipe
    pipe.unet.half()
    seen = []
    with erase(pipe, learned, ["cat"], strength=5.0) as eraser:
        original = eraser._ablate
        eraser._ablate = lambda sae, x, *a: seen.append(x.dtype) or original(sae, x, *a)
        sample = torch.randn(2, 4, 8, 8, dtype=torch.float16)
        ctx = torch.randn(2, 77, 32, dtype=torch.float16)
        with torch.no_grad():
            out = pipe.unet(sample, torch.tensor(500), encoder_hidden_states=ctx).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert seen and all(d == torch.float16 for d in seen)


def test_pipeline_errors(tiny_pipe, learned):
    wide = TopKSAE(SAEConfig(d_in=64, n_latents=128, k=8, hook_point=HOOK, model_family="sd1"))
    with pytest.raises(ConfigError, match=r"SAE expects 64 channels but 'up_blocks\.1\.attentions\.1' of this model has 32"):
        with erase(tiny_pipe, wide, []):
            pass
    with pytest.raises(HookError, match="has no child"):
        with erase(tiny_pipe, learned, ["cat"], hook_point="up_blocks.9"):
            pass
    with pytest.raises(ConfigError, match="unknown concept"):
        with erase(tiny_pipe, learned, ["horse"]):
            pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_pipe.unet.modules())


def test_erase_on_a_bare_unet(tiny_pipe, learned):
    unet = tiny_pipe.unet
    torch.manual_seed(0)
    sample, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = unet(sample, torch.tensor(300), encoder_hidden_states=ctx).sample
        with erase(unet, learned, ["cat"], strength=20.0, threshold_scale=0.0, cfg="cond") as eraser:
            erased = unet(sample, torch.tensor(300), encoder_hidden_states=ctx).sample
            assert eraser.active_rows(_probe_call()).tolist() == [False, True]  # [uncond, cond] by default
        after = unet(sample, torch.tensor(300), encoder_hidden_states=ctx).sample
    assert not torch.allclose(base, erased) and torch.equal(base, after)
    assert torch.equal(base[0], erased[0])  # the unconditional row is untouched with cfg="cond"


def test_erase_also_at_replaces_at_later_blocks_too(tiny_pipe, learned):
    unet = tiny_pipe.unet
    torch.manual_seed(0)
    sample, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    later = "up_blocks.1.attentions.2"  # after HOOK (up_blocks.1.attentions.1) in the forward pass
    with torch.no_grad():
        with erase(unet, learned, ["cat"], "replace", threshold_scale=0.0, source="uncond", cfg="cond"):
            one = unet(sample, torch.tensor(300), encoder_hidden_states=ctx).sample
        with erase(unet, learned, ["cat"], "replace", threshold_scale=0.0, source="uncond", cfg="cond",
                   also_at=[later]):
            both = unet(sample, torch.tensor(300), encoder_hidden_states=ctx).sample
        after = unet(sample, torch.tensor(300), encoder_hidden_states=ctx).sample
    assert not torch.allclose(one, both)
    assert torch.equal(one[0], both[0])  # the unconditional row is untouched with cfg="cond"
    assert not torch.allclose(after, both)  # the hooks are gone on exit


def _probe_call():
    return BlockCall(tokens=torch.zeros(2, 4, 32), spatial=(2, 2), timesteps=torch.tensor([300.0, 300.0]),
                     is_cond=torch.tensor([False, True]), call_index=0)


@pytest.mark.parametrize("method", ["ablate", "replace"])
def test_non_finite_activations_create_no_new_nans(method):
    sae = sae_with_concepts()
    x = background()
    x[0, :4, 3] = 2.0
    x[0, 1, 3] = float("inf")
    x[0, 2, 10] = float("nan")
    x[1, 5, 3] = float("-inf")
    out = ConceptEraser(sae, ["cat"], method)(call_for(x, [500.0, 500.0]))
    assert torch.equal(torch.isnan(out), torch.isnan(x))  # NaN exactly where it was
    finite = torch.isfinite(x).all(-1)
    assert torch.isfinite(out[finite]).all()
    assert out[0, 0, 3] != 2.0 and out[0, 3, 3] != 2.0  # finite concept tokens are still erased


@pytest.mark.parametrize("sae_dtype, x_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                                (torch.float32, torch.bfloat16)])
def test_low_precision_sae_and_model_combinations(sae_dtype, x_dtype):
    sae = sae_with_concepts().to(sae_dtype)
    x = background().to(x_dtype)
    x[0, :3, 3] = 2.0
    x[1, 0, 3] = 60000.0 if x_dtype != torch.bfloat16 else 1e30  # overflows an fp16 SAE's arithmetic
    out = ConceptEraser(sae, ["cat"], "ablate", strength=100.0)(call_for(x, [500.0, 500.0]))
    assert out.dtype == x_dtype and torch.isfinite(out).all()
    assert (out[0, :3, 3].float() < 0).all()
    assert torch.equal(out[0, 3:], x[0, 3:])
