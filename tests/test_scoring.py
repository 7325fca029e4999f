import pytest
import torch
from conftest import HOOK
from planted import concept, planted_sae

from saeuron_core.concepts.learning import learn_concept
from saeuron_core.concepts.stats import ConceptStats
from saeuron_core.errors import ConfigError
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import add_concept, concept_names, get_concept, remove_concept


def codes(rows, tokens, feats_vals):
    """Top-k codes [rows, tokens, k] where every token has the same (feature, value) pairs."""
    idx = torch.tensor([f for f, _ in feats_vals]).expand(rows, tokens, -1).clone()
    val = torch.tensor([v for _, v in feats_vals], dtype=torch.float32).expand(rows, tokens, -1).clone()
    return val, idx


def test_score_formula_mu_threshold_and_selection():
    stats = ConceptStats(8, bucket_width=100, max_timestep=1000)
    t = torch.tensor([950.0, 950.0])
    stats.add(True, t, *codes(2, 4, [(1, 3.0), (2, 1.0)]))      # with the concept
    stats.add(False, t, *codes(2, 4, [(2, 1.0), (4, 1.0)]))     # without it
    data = stats.result("c", top_n=2)
    b = 9
    # p_c = [0, .75, .25, 0, 0, ...], p_o = [0, 0, .5, 0, .5, ...] -> score 1: .75, 2: -.25, 4: -.5
    assert data.feature_ids[b, 0] == 1 and data.scores[b, 0] == pytest.approx(0.75, abs=1e-6)
    assert int(data.n_selected[b]) == 1  # only features more active with the concept are selected
    assert data.mu[b, 0] == pytest.approx(3.0) and data.threshold[b, 0] == pytest.approx(1.5)
    assert data.features_at(999.0) == [1]
    # Buckets never observed take the nearest observed bucket's data.
    assert data.observed.tolist() == [False] * 9 + [True]
    assert data.features_at(10.0) == [1]


def test_min_specificity_drops_strong_features_that_also_fire_without_the_concept():
    stats = ConceptStats(8, bucket_width=100, max_timestep=1000)
    t = torch.tensor([950.0, 950.0])
    # Feature 1 is large with and without the concept (mean 10 vs 6); feature 3 is small but only fires with it.
    stats.add(True, t, *codes(2, 4, [(1, 10.0), (3, 1.0)]))
    stats.add(False, t, *codes(2, 4, [(1, 6.0), (5, 1.0)]))
    # SAeUron's score ranks feature 1 first (p_c .91 - p_o .86 = .05 vs .09 for feature 3; both selected).
    old = stats.result("c", top_n=2, min_specificity=0.0)
    assert sorted(old.features_at(999.0)) == [1, 3]
    # Specificity (10 - 6) / 16 = .25 for feature 1, 1.0 for feature 3.
    new = stats.result("c", top_n=2, min_specificity=0.5)
    assert new.features_at(999.0) == [3]
    assert new.feature_ids[9, 1] == 1  # still a candidate (for inspection), just not selected
    assert new.info["selection"]["min_specificity"] == 0.5
    assert stats.result("c", top_n=2, min_specificity=0.2).features_at(999.0) == [3, 1]
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="min_specificity must be in"):
            stats.result("c", min_specificity=bad)
    # Nothing specific enough: a clear error instead of a concept that erases nothing.
    same = ConceptStats(8, bucket_width=100, max_timestep=1000)
    same.add(True, t, *codes(2, 4, [(1, 2.0), (2, 1.0)]))
    same.add(False, t, *codes(2, 4, [(1, 1.5), (2, 1.0)]))
    with pytest.raises(ConfigError, match="'c': no SAE feature is more active .* at least 0.5 specific"):
        same.result("c", min_specificity=0.5)
    assert same.result("c", min_specificity=0.1).features_at(999.0) == [1]


def test_peak_specificity_drops_features_a_sibling_concept_shares():
    """Feature 1 fires on the concept and on one of four negative prompts (a sibling, like ring for circle):
    pooled over all negatives it looks specific; against that one prompt it is not."""
    stats = ConceptStats(8, bucket_width=100, max_timestep=1000, n_groups=5)
    t = torch.tensor([950.0])
    stats.add_groups(torch.tensor([0]), t, *codes(1, 4, [(1, 4.0), (3, 1.0)]))   # the concept
    stats.add_groups(torch.tensor([1]), t, *codes(1, 4, [(1, 4.0), (6, 1.0)]))   # its sibling
    for g in (2, 3, 4):
        stats.add_groups(torch.tensor([g]), t, *codes(1, 4, [(6, 1.0), (7, 1.0)]))
    merged = stats.merge([0], [1, 2, 3, 4], peak=True)
    assert stats.merge([0], [1, 2, 3, 4]).negative_peak is None  # only kept when asked for
    # Pooled: feature 1 has mean 4 vs 1, specificity .6 (selected); against the sibling 4 vs 4, specificity 0.
    assert sorted(merged.result("c", top_n=2).features_at(999.0)) == [1, 3]
    peak = merged.result("c", top_n=2, peak_specificity=0.2)
    assert peak.features_at(999.0) == [3] and peak.info["selection"]["peak_specificity"] == 0.2
    with pytest.raises(ConfigError, match="peak_specificity must be in"):
        merged.result("c", peak_specificity=1.5)
    # A two-group table has one negative group: the peak is its mean, the same as the pooled criterion.
    two = ConceptStats(8, bucket_width=100, max_timestep=1000)
    two.add(True, t, *codes(1, 4, [(1, 4.0), (3, 1.0)]))
    two.add(False, t, *codes(1, 4, [(1, 4.0), (6, 1.0)]))
    assert two.result("c", top_n=2, min_specificity=0.0, peak_specificity=0.2).features_at(999.0) == [3]


def test_quantile_selection_and_memory_is_flat():
    stats = ConceptStats(1000, bucket_width=20, max_timestep=1000)
    size = stats.sums.numel()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # many tokens: the statistics do not grow
        idx = torch.randint(0, 1000, (4, 64, 8), generator=g)
        stats.add(True, torch.full((4,), 500.0), torch.rand(4, 64, 8, generator=g) + (idx == 7) * 5.0, idx)
        idx = torch.randint(0, 1000, (4, 64, 8), generator=g)
        stats.add(False, torch.full((4,), 500.0), torch.rand(4, 64, 8, generator=g), idx)
    assert stats.sums.numel() == size
    data = stats.result("c", quantile=0.999)
    assert data.features_at(500.0)[0] == 7 and int(data.n_selected[25]) == 1
    with pytest.raises(ConfigError, match="exactly one"):
        stats.result("c", top_n=2, quantile=0.9)
    with pytest.raises(ConfigError, match="quantile must be"):
        stats.result("c", quantile=1.5)


def test_library_add_replace_remove_and_file_round_trip(tmp_path):
    sae = planted_sae()
    add_concept(sae, concept("cat", {range(50): [3]}))
    add_concept(sae, concept("van gogh style", {range(50): [5, 6]}))
    add_concept(sae, concept("cat", {range(50): [4]}))  # replace keeps the others
    assert concept_names(sae) == ["cat", "van gogh style"]
    save_sae(sae, tmp_path / "s.safetensors")
    loaded = load_sae(tmp_path / "s.safetensors")
    assert get_concept(loaded, "cat").features_at(500) == [4]
    assert get_concept(loaded, "van gogh style").features_at(500) == [5, 6]
    remove_concept(loaded, "cat")
    assert concept_names(loaded) == ["van gogh style"]
    assert not [k for k in loaded.extra_tensors if "cat" in k]
    with pytest.raises(ConfigError, match=r"unknown concept 'cat'; this SAE knows: 'van gogh style'"):
        get_concept(loaded, "cat")
    with pytest.raises(ConfigError, match="non-empty name"):
        add_concept(loaded, concept("  ", {range(50): [1]}))


def test_learn_concept_on_a_pipeline(tiny_pipe):
    torch.manual_seed(0)
    from saeuron_core.sae.model import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK))
    add_concept(sae, concept("other", {range(50): [1]}, n_buckets=50))
    # A random SAE on a random UNet has no concept-specific features: use SAeUron's selection here.
    data = learn_concept(tiny_pipe, sae, "cat", ["a cat", "a cat on a mat"], ["a dog", "a tree"], steps=5,
                         guidance_scale=5.0, seeds=[0, 1], min_specificity=0.0, progress=False)
    assert concept_names(sae) == ["cat", "other"]
    observed = set(data.observed.nonzero().flatten().tolist())
    assert observed == {int(t) // 20 for t in tiny_pipe.scheduler.timesteps}
    assert data.info["positive"] == ["a cat", "a cat on a mat"] and data.info["tokens"]["positive"] == 2 * 2 * 5 * 64
    for b in observed:  # selected features are more active (after normalisation) with the concept
        n = int(data.n_selected[b])
        assert n >= 1 and (data.scores[b, :n] > 0).all()
    with pytest.raises(ConfigError, match="at least one positive and one negative"):
        learn_concept(tiny_pipe, sae, "x", ["a cat"], [" "], steps=2, progress=False)


def test_learn_concepts_in_one_pass_equals_one_at_a_time(tiny_pipe) -> None:
    from saeuron_core.concepts.learning import learn_concept, learn_concepts
    from saeuron_core.sae.library import get_concept
    from saeuron_core.sae.model import SAEConfig, TopKSAE

    def fresh() -> TopKSAE:
        torch.manual_seed(0)
        return TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK))

    spec = {"cat": (["a cat", "a small cat"], ["a dog", "a house"]),
            "dog": (["a dog"], ["a cat", "a house", "a small cat"])}
    together = fresh()
    learn_concepts(tiny_pipe, together, spec, steps=4, guidance_scale=5.0, seeds=[0, 1], batch_size=3,
                   min_specificity=0.0, progress=False)
    for name, (pos, neg) in spec.items():
        alone = fresh()
        learn_concept(tiny_pipe, alone, name, pos, neg, steps=4, guidance_scale=5.0, seeds=[0, 1], min_specificity=0.0,
                      progress=False)
        a, b = get_concept(together, name), get_concept(alone, name)
        assert torch.equal(a.n_selected, b.n_selected) and torch.equal(a.observed, b.observed)
        assert torch.equal(a.feature_ids[a.selected_mask()], b.feature_ids[b.selected_mask()])
        assert torch.allclose(a.mu, b.mu, rtol=1e-4, atol=1e-6)
        assert torch.allclose(a.threshold, b.threshold, rtol=1e-4, atol=1e-6)
