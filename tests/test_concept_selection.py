"""The feature selection as one options object (Selection), the host-independent ConceptLearner, and the
learning functions' keywords."""

import dataclasses
import math

import pytest
import torch
from conftest import HOOK

from saeuron_core.concepts.learner import ConceptLearner
from saeuron_core.concepts.learning import learn_concept, learn_concepts
from saeuron_core.concepts.selection import DEFAULT_MIN_SPECIFICITY, MAX_CANDIDATES, Selection
from saeuron_core.concepts.stats import ConceptStats
from saeuron_core.errors import ConfigError
from saeuron_core.sae.library import get_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE


def fresh_sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK))


def test_selection_defaults_and_summary():
    s = Selection()
    assert (s.top_n, s.quantile, s.min_specificity, s.peak_specificity, s.bucket_width) == (
        None, None, DEFAULT_MIN_SPECIFICITY, None, 20.0)
    assert DEFAULT_MIN_SPECIFICITY == 0.5 and MAX_CANDIDATES == 64
    # What a learned concept's info["selection"] records: top_n resolved to 3, the peak floor only when given.
    assert s.summary() == {"top_n": 3, "quantile": None, "min_specificity": 0.5}
    assert Selection(quantile=0.9, peak_specificity=0.2).summary() == {
        "top_n": None, "quantile": 0.9, "min_specificity": 0.5, "peak_specificity": 0.2}
    assert all(f.metadata.get("help") for f in dataclasses.fields(Selection))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_n = 5  # type: ignore[misc]


@pytest.mark.parametrize("fields, message", [
    ({"top_n": 0}, "top_n must be between 1 and 64, got 0"),
    ({"top_n": 65}, "top_n must be between 1 and 64, got 65"),
    ({"top_n": 2, "quantile": 0.9}, "select features with exactly one of top_n or quantile"),
    ({"quantile": 1.0}, r"quantile must be in \(0, 1\), e.g. 0.9999, got 1.0"),
    ({"quantile": 0.0}, r"quantile must be in \(0, 1\)"),
    ({"min_specificity": 1.0}, r"min_specificity must be in \[0, 1\), e.g. 0.5, got 1.0"),
    ({"min_specificity": None}, r"min_specificity must be in \[0, 1\), e.g. 0.5, got None"),
    ({"min_specificity": -0.1}, r"min_specificity must be in \[0, 1\)"),
    ({"peak_specificity": 1.5}, r"peak_specificity must be in \[0, 1\) \(or not given\), e.g. 0.0, got 1.5"),
    ({"peak_specificity": "x"}, r"peak_specificity must be in \[0, 1\) \(or not given\), e.g. 0.0, got 'x'"),
    ({"bucket_width": 0}, "bucket_width must be positive"),
    ({"bucket_width": -5.0}, "bucket_width must be positive"),
    ({"bucket_width": math.nan}, "bucket_width must be positive"),
])
def test_selection_is_checked_on_construction(fields, message):
    with pytest.raises(ConfigError, match=message):
        Selection(**fields)
    with pytest.raises(ConfigError, match=message):  # also when changed from a valid one
        Selection.build(Selection(top_n=None), **fields)


def test_selection_build_changes_fields_and_refuses_unknown_ones():
    base = Selection(top_n=5, min_specificity=0.0)
    assert Selection.build(base, peak_specificity=0.1) == Selection(top_n=5, min_specificity=0.0, peak_specificity=0.1)
    assert Selection.build(top_n=2) == Selection(top_n=2) and Selection.build() == Selection()
    with pytest.raises(ConfigError, match="unknown selection option top_k; the options are bucket_width, "
                                          "min_specificity, peak_specificity, quantile, top_n"):
        Selection.build(base, top_k=2)
    with pytest.raises(ConfigError, match="unknown selection options a, b;"):
        Selection.build(a=1, b=2)


def test_stats_result_takes_a_selection_or_its_fields():
    stats = ConceptStats(8, bucket_width=100, max_timestep=1000, n_groups=2)
    t = torch.full((2,), 950)
    values = torch.tensor([[[1.0, 0.5, 0.2]], [[0.1, 0.5, 0.2]]])
    indices = torch.tensor([[[3, 1, 5]], [[3, 1, 5]]])
    stats.add_groups(torch.tensor([0, 1]), t, values, indices)
    by_name = stats.result("c", top_n=2, min_specificity=0.0, info={"k": 1})
    by_object = stats.result("c", Selection(top_n=2, min_specificity=0.0), info={"k": 1})
    for field in ("feature_ids", "scores", "mu", "threshold", "n_selected", "observed"):
        assert torch.equal(getattr(by_name, field), getattr(by_object, field))
    assert by_name.info == by_object.info == {"k": 1, "selection": {"top_n": 2, "quantile": None,
                                                                     "min_specificity": 0.0}}
    # A field by name changes the object's.
    changed = stats.result("c", Selection(top_n=2), min_specificity=0.0, info={"k": 1})
    assert changed.info == by_name.info and torch.equal(changed.feature_ids, by_name.feature_ids)
    with pytest.raises(ConfigError, match="unknown selection option topn"):
        stats.result("c", topn=2)


def test_learning_refuses_unknown_keywords_naming_the_valid_ones(tiny_pipe):
    valid = ("batch_size, bucket_width, guidance_scale, height, hook_point, min_specificity, notes, peak_specificity, "
             "progress, quantile, scheduler, seeds, selection, steps, top_n, width")
    sae = fresh_sae()
    with pytest.raises(ConfigError, match=f"learn_concept: unknown option stepz; the options are {valid}$"):
        learn_concept(tiny_pipe, sae, "cat", ["a cat"], ["a dog"], stepz=3, progress=False)
    with pytest.raises(ConfigError, match="unknown options n, top_k; the options are batch_size,"):
        learn_concepts(tiny_pipe, sae, {"cat": (["a cat"], ["a dog"])}, top_k=3, n=1, progress=False)
    with pytest.raises(ConfigError, match="top_n must be between 1 and 64, got 0"):
        learn_concept(tiny_pipe, sae, "cat", ["a cat"], ["a dog"], selection=Selection(quantile=0.5), quantile=None,
                      top_n=0, progress=False)
    assert not sae.concepts  # nothing was learned


def test_a_selection_object_learns_as_its_fields_do(tiny_pipe):
    spec = {"cat": (["a cat", "a small cat"], ["a dog", "a house"])}
    by_name, by_object, changed = fresh_sae(), fresh_sae(), fresh_sae()
    common = dict(steps=2, guidance_scale=5.0, seeds=[0], progress=False)
    learn_concepts(tiny_pipe, by_name, spec, top_n=2, min_specificity=0.0, bucket_width=50.0, **common)
    learn_concepts(tiny_pipe, by_object, spec, Selection(top_n=2, min_specificity=0.0, bucket_width=50.0), **common)
    learn_concept(tiny_pipe, changed, "cat", *spec["cat"], selection=Selection(top_n=2, bucket_width=50.0),
                  min_specificity=0.0, **common)
    a, b, c = (get_concept(s, "cat") for s in (by_name, by_object, changed))
    assert a.bucket_width == 50.0 and a.info == b.info == c.info
    for field in ("feature_ids", "scores", "mu", "threshold", "n_selected", "observed"):
        assert torch.equal(getattr(a, field), getattr(b, field)) and torch.equal(getattr(a, field), getattr(c, field))


def test_concept_learner_groups_distinct_prompts():
    learner = ConceptLearner(fresh_sae(), {"cat": (["a cat", " ", "a cat", "a small cat"], ["a dog", "a cat?"]),
                                           "dog": (["a dog"], ["a cat", "a house"])}, Selection(bucket_width=100.0))
    assert learner.prompts == ["a cat", "a small cat", "a dog", "a cat?", "a house"]
    assert learner.concepts["cat"] == (["a cat", "a cat", "a small cat"], ["a dog", "a cat?"])  # blanks dropped
    assert learner.stats.sums.shape == (5, 10, 128)
    learner.feed("a dog")
    assert learner.recorder.groups == 2
    learner.feed(["a house", "a cat"])
    assert torch.equal(learner.recorder.groups, torch.tensor([4, 0]))
    with pytest.raises(ConfigError, match="'a cow' is not one of the prompts being learned"):
        learner.feed(["a cat", "a cow"])
    with pytest.raises(ConfigError, match="no concepts given"):
        ConceptLearner(fresh_sae(), {})
    with pytest.raises(ConfigError, match="concept 'x': needs at least one positive and one negative prompt"):
        ConceptLearner(fresh_sae(), {"x": (["a cat"], ["  "])})
    with pytest.raises(ConfigError, match="non-empty name"):
        ConceptLearner(fresh_sae(), {" ": (["a cat"], ["a dog"])})
