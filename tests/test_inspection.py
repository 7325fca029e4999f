import numpy as np
import pytest
import torch
from conftest import HOOK
from PIL import Image

from saeuron_core.concepts.learning import learn_concept
from saeuron_core.erasure.eraser import erase
from saeuron_core.errors import ConfigError
from saeuron_core.hosts.hooks import pipeline_hook
from saeuron_core.inspection import compare_erasure, describe_concept, erasure_grid, image_grid, inspect, save_png
from saeuron_core.sae.library import ConceptData, add_concept, get_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

STEPS = 4


def px(im):
    """Pixels as an int tensor [H, W, 3]."""
    return torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.int64))


@pytest.fixture(scope="module")
def sae(tiny_pipe):
    """A random SAE on the tiny model with a learned 'cat' and a concept whose selection is empty."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK, model_family="tiny"))
    learn_concept(tiny_pipe, sae, "cat", ["a cat", "a red cat"], ["a dog", "a green tree"], steps=STEPS,
                  min_specificity=0.0, progress=False)
    nb, m = 50, 4
    add_concept(sae, ConceptData(name="nothing", bucket_width=20.0, max_timestep=1000,
                                 feature_ids=torch.zeros(nb, m, dtype=torch.long), scores=torch.zeros(nb, m),
                                 mu=torch.zeros(nb, m), threshold=torch.zeros(nb, m),
                                 n_selected=torch.zeros(nb, dtype=torch.long), observed=torch.ones(nb, dtype=torch.bool)))
    return sae


@pytest.fixture(scope="module")
def result(tiny_pipe, sae):
    return inspect(tiny_pipe, sae, "a red cat", concepts=["cat", "nothing"], steps=STEPS, seed=3, top=6)


def test_records_match_the_sae_codes_of_each_step(tiny_pipe, sae, result):
    tokens = []
    with pipeline_hook(tiny_pipe, HOOK, lambda call: tokens.append((call.tokens[call.is_cond][0].clone(),
                                                                    float(call.timesteps[call.is_cond][0])))):
        inspect(tiny_pipe, sae, "a red cat", steps=STEPS, seed=3)  # same generation, recorded independently
    cat = get_concept(sae, "cat")
    assert len(result.steps) == len(tokens) == STEPS
    assert result.spatial == (8, 8) and result.image.size == (16, 16)
    for i, (rec, (x, t)) in enumerate(zip(result.steps, tokens)):
        assert rec.step == i and rec.timestep == t
        dense = sae.dense_codes(x)  # [64, n_latents]
        mean = dense.mean(0)
        assert rec.top_ids == mean.topk(6).indices.tolist()
        assert rec.top_values == pytest.approx(mean.topk(6).values.tolist(), rel=1e-5)
        ids = cat.features_at(t)
        assert rec.features["cat"] == ids
        assert torch.allclose(rec.heat["cat"], dense[:, ids].sum(-1).reshape(8, 8), atol=1e-6)
        b = int(t // cat.bucket_width)
        thr = cat.threshold[b, : len(ids)]
        assert torch.equal(rec.fired["cat"], (dense[:, ids] > thr).any(-1).reshape(8, 8))
        # Only small per-step summaries are kept, never the codes.
        assert all(v.numel() == 64 for v in (*rec.heat.values(), *rec.fired.values()))
    assert [r.timestep for r in result.steps] == sorted((r.timestep for r in result.steps), reverse=True)
    assert any(r.fired["cat"].any() for r in result.steps)


def test_fired_mask_is_what_the_eraser_detects(tiny_pipe, sae, result):
    # dilation 0: the detection itself (replace grows its mask by one patch by default)
    with erase(tiny_pipe, sae, "cat", "replace", cfg="cond", record_masks=True, dilation=0) as eraser:
        inspect(tiny_pipe, sae, "a red cat", steps=STEPS, seed=3)
    # The first call sees unedited activations in both runs.
    assert torch.equal(eraser.masks[0].mask[0], result.steps[0].fired["cat"])


def test_heatmaps(result):
    mean = result.heatmap("cat")
    assert mean.shape == (16, 16) and mean.dtype == torch.float32
    assert float(mean.max()) == pytest.approx(1.0) and float(mean.min()) >= 0.0
    assert result.heatmap("cat", step=-1).shape == (16, 16)
    assert torch.equal(result.heatmap("nothing"), torch.zeros(16, 16))
    with pytest.raises(ConfigError, match="out of range"):
        result.heatmap("cat", step=STEPS)
    with pytest.raises(ConfigError, match="inspected concepts: 'cat', 'nothing'"):
        result.heatmap("dog")


def test_summary_has_one_line_per_step(result):
    lines = result.summary().splitlines()
    assert len(lines) == STEPS
    for line, rec in zip(lines, result.steps):
        assert line.startswith(f"step {rec.step:3d} t=") and f"{rec.top_ids[0]}:" in line
        assert "cat:" in line and "/64 fired" in line


def test_save_overlay_writes_a_red_tinted_png(tmp_path, result):
    path = result.save_overlay(tmp_path / "sub" / "o.png", "cat")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (16, 16)
        over = px(im)
    base = px(result.image)
    heat = result.heatmap("cat")
    assert (over[..., 0] >= base[..., 0]).all() and (over[..., 1:] <= base[..., 1:]).all()
    assert not torch.equal(over[heat > 0.5], base[heat > 0.5])
    plain = result.save_overlay(tmp_path / "plain.png")
    with Image.open(plain) as im:
        assert torch.equal(px(im), base)
    with pytest.raises(ConfigError, match=".png"):
        result.save_overlay(tmp_path / "o.jpg", "cat")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["o.png", "plain.png", "sub"]  # no temp files left


def test_without_cfg_other_scheduler_and_restored_state(tiny_pipe, sae):
    before = tiny_pipe.scheduler
    res = inspect(tiny_pipe, sae, "a cat", concepts="cat", steps=3, guidance_scale=1.0, scheduler="euler", top=500)
    assert tiny_pipe.scheduler is before
    assert len(res.steps) == 3 and len(res.steps[0].top_ids) == sae.n_latents
    assert res.summary().count("\n") == 2


def test_errors(tiny_pipe, sae):
    with pytest.raises(ConfigError, match="this SAE knows: 'cat', 'nothing'"):
        inspect(tiny_pipe, sae, "a cat", concepts=["dog"], steps=2)
    with pytest.raises(ConfigError, match="steps and top"):
        inspect(tiny_pipe, sae, "a cat", steps=0)
    with pytest.raises(ConfigError, match="non-empty prompt"):
        inspect(tiny_pipe, sae, " ", steps=2)
    wide = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, hook_point=HOOK))
    with pytest.raises(ConfigError, match="expects 16 channels"):
        inspect(tiny_pipe, wide, "a cat", steps=2)


def test_compare_erasure_and_grid(tiny_pipe, sae, tmp_path):
    prompts = ["a cat", "a red cat"]
    pairs = compare_erasure(tiny_pipe, sae, "cat", prompts, strength=2.0, steps=STEPS, seed=1, batch_size=1)
    assert len(pairs) == 2
    assert all(a.size == b.size == (16, 16) for a, b in pairs)
    assert any(not torch.equal(px(a), px(b)) for a, b in pairs)
    same = compare_erasure(tiny_pipe, sae, "cat", prompts, strength=0.0, steps=STEPS, seed=1)
    assert all(torch.equal(px(a), px(b)) for a, b in same)
    # Same seed, batched or not: the "before" images agree across calls.
    assert all(torch.equal(px(a), px(c)) for (a, _), (c, _) in zip(same, pairs))
    grid = erasure_grid(pairs, prompts)
    assert grid.size == (32, 32)
    assert torch.equal(px(grid.crop((16, 16, 32, 32))), px(pairs[1][1]))
    with pytest.raises(ConfigError, match="strength"):
        compare_erasure(tiny_pipe, sae, "cat", prompts, strength=-1.0, steps=STEPS)
    with pytest.raises(ConfigError, match="none of them empty"):
        compare_erasure(tiny_pipe, sae, "cat", ["a cat", ""], steps=STEPS)


def test_image_grid_labels_only_on_large_cells():
    big = [[Image.new("RGB", (128, 96), (40, 90, 160)) for _ in range(2)]]
    plain = image_grid(big)
    labelled = image_grid(big, labels=[["before: a very long prompt indeed, longer than the cell", "after"]])
    assert plain.size == labelled.size == (256, 96)
    assert not torch.equal(px(plain), px(labelled))
    small = [[Image.new("RGB", (16, 16))] * 2]
    assert torch.equal(px(image_grid(small, labels=[["x", "y"]])), px(image_grid(small)))
    with pytest.raises(ConfigError, match="same size"):
        image_grid([[Image.new("RGB", (16, 16)), Image.new("RGB", (8, 8))]])
    with pytest.raises(ConfigError, match=".png"):
        save_png(plain, "x.jpg")


def test_describe_concept(sae):
    d = describe_concept(get_concept(sae, "cat"), n_timesteps=2, n_features=2)
    assert d["n_buckets"] == 50 and d["observed_buckets"] == STEPS
    assert len(d["selected"]) == 2 and d["selected"][0]["timestep"] > d["selected"][1]["timestep"]
    assert all(len(s["features"]) <= 2 for s in d["selected"])


def test_compare_erasure_with_saes_on_two_blocks(tiny_pipe, sae):
    down = TopKSAE(SAEConfig(d_in=sae.d_in, n_latents=sae.n_latents, k=sae.k, hook_point="down_blocks.0.attentions.1"))
    down.load_state_dict(sae.state_dict())
    down.concepts, down.extra_tensors = sae.concepts, sae.extra_tensors
    prompts = ["a cat"]
    one = compare_erasure(tiny_pipe, sae, "cat", prompts, strength=2.0, steps=STEPS, seed=1)
    both = compare_erasure(tiny_pipe, [sae, down], "cat", prompts, strength=2.0, steps=STEPS, seed=1)
    assert torch.equal(px(one[0][0]), px(both[0][0]))          # the same "before"
    assert not torch.equal(px(one[0][1]), px(both[0][1]))      # the second block changes the "after"
    with pytest.raises(ConfigError, match="several without hook_point"):
        compare_erasure(tiny_pipe, [sae, down], "cat", prompts, steps=STEPS, hook_point=HOOK)
