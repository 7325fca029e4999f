"""Learning a concept from one word: prompts built from templates (library, CLI)."""

import argparse
import json

import pytest
import torch
from cli_helpers import assert_user_error, run_cli, tiny_model
from conftest import HOOK

from saeuron_cli.learn_concept import word_vocabulary
from saeuron_core.concepts.learning import learn_concept, learn_concepts
from saeuron_core.concepts.prompts import GENERIC, KINDS, Vocabulary, prompts_from_word
from saeuron_core.errors import ConfigError
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import get_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE
from saeuron_demo.dataset import DEMO_VOCABULARY, OBJECTS, STYLES, all_prompts, make_prompt

SMALL = Vocabulary(subjects=("circle", "square", "star"), styles=("solid", "stripes"))


def fresh_sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(d_in=32, n_latents=128, k=8, hook_point=HOOK))


def test_a_style_goes_across_the_subjects_and_is_swapped_for_the_other_styles():
    assert prompts_from_word("stripes", "style", SMALL) == (
        ["a circle in stripes style", "a square in stripes style", "a star in stripes style"],
        ["a circle in solid style", "a square in solid style", "a star in solid style",
         "a circle", "a square", "a star"])


def test_an_object_goes_across_the_styles_and_is_swapped_for_the_other_subjects():
    assert prompts_from_word("star", "object", SMALL) == (
        ["a star in solid style", "a star in stripes style"],
        ["a circle in solid style", "a square in stripes style", "a circle", "a square"])


def test_other_is_both_a_subject_and_a_style():
    assert prompts_from_word("heart", "other", SMALL) == (
        ["a circle in heart style", "a square in heart style", "a star in heart style",
         "a heart in solid style", "a heart in stripes style"],
        ["a circle in solid style", "a square in stripes style", "a star in solid style"])


def test_demo_vocabulary_uses_the_demos_prompts():
    assert DEMO_VOCABULARY.subjects == tuple(OBJECTS) and DEMO_VOCABULARY.styles == tuple(STYLES)
    pos, neg = prompts_from_word("Polka  Dots", "style", DEMO_VOCABULARY)  # the word is matched case-blind
    assert pos == [make_prompt(o, "Polka Dots") for o in OBJECTS]
    others = [s for s in STYLES if s != "polka dots"]
    assert neg[:len(OBJECTS)] == [make_prompt(o, others[i % len(others)]) for i, o in enumerate(OBJECTS)]
    assert neg[len(OBJECTS):] == [f"a {o}" for o in OBJECTS]
    pos, neg = prompts_from_word("ring", "object", DEMO_VOCABULARY)
    assert pos == [make_prompt("ring", s) for s in STYLES]
    assert not any("ring" in p for p in neg) and len(neg) == len(STYLES) + len(OBJECTS) - 1  # 7 plain subjects
    assert set(pos) <= {p for _, _, p in all_prompts()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_deterministic_and_keeps_the_word_out_of_the_negatives(kind):
    pos, neg = prompts_from_word("ukiyo-e", kind)
    assert (pos, neg) == prompts_from_word("ukiyo-e", kind, GENERIC)
    assert pos and neg and all("ukiyo-e" in p for p in pos) and not any("ukiyo-e" in p for p in neg)
    assert len(set(pos)) == len(pos) and len(set(neg)) == len(neg)


def test_word_and_vocabulary_errors():
    with pytest.raises(ConfigError, match="non-empty word"):
        prompts_from_word("  ", "style")
    with pytest.raises(ConfigError, match="unknown concept kind 'colour'; the kinds are style, object, other"):
        prompts_from_word("red", "colour")
    with pytest.raises(ConfigError, match="no alternatives to 'solid'"):
        prompts_from_word("solid", "style", Vocabulary(subjects=("circle",), styles=("solid",)))
    with pytest.raises(ConfigError, match="non-empty list of subjects"):
        Vocabulary(subjects=(), styles=("solid",))
    with pytest.raises(ConfigError, match="non-empty list of styles"):
        Vocabulary(subjects=("a",), styles=("",))
    with pytest.raises(ConfigError, match="must name {subject} and {style}"):
        Vocabulary(subjects=("a",), styles=("b",), template="a {subject}")
    with pytest.raises(ConfigError, match="plain prompt must name {subject} only"):
        Vocabulary(subjects=("a",), styles=("b",), plain="a {subject} in {style}")


def test_learn_concept_from_a_word_records_word_kind_and_prompts(tiny_pipe):
    sae = fresh_sae()
    data = learn_concept(tiny_pipe, sae, "stripes", word=" stripes ", kind="style", vocabulary=SMALL, steps=2,
                         min_specificity=0.0, progress=False)
    pos, neg = prompts_from_word("stripes", "style", SMALL)
    assert list(data.info)[:4] == ["positive", "negative", "word", "kind"]
    assert (data.info["positive"], data.info["negative"]) == (pos, neg)
    assert (data.info["word"], data.info["kind"]) == ("stripes", "style")
    assert get_concept(sae, "stripes").info["word"] == "stripes"
    # The same prompts as lists learn the same features, with no word in the info.
    listed = learn_concept(tiny_pipe, fresh_sae(), "stripes", pos, neg, steps=2, min_specificity=0.0, progress=False)
    assert "word" not in listed.info and "kind" not in listed.info
    for field in ("feature_ids", "scores", "mu", "threshold", "n_selected"):
        assert torch.equal(getattr(listed, field), getattr(data, field)), field


def test_prompt_lists_learn_as_before(tiny_pipe):
    options = dict(steps=2, min_specificity=0.0, progress=False)
    one = learn_concept(tiny_pipe, fresh_sae(), "cat", ["a cat", "a small cat"], ["a dog", "a house"], **options)
    (many,) = learn_concepts(tiny_pipe, fresh_sae(), {"cat": (["a cat", "a small cat"], ["a dog", "a house"])},
                             **options)
    assert one.info == many.info and list(one.info)[:3] == ["positive", "negative", "hook_point"]
    for field in ("feature_ids", "scores", "mu", "threshold", "n_selected"):
        assert torch.equal(getattr(one, field), getattr(many, field)), field


def test_learn_concept_takes_prompts_or_a_word():
    sae = fresh_sae()
    with pytest.raises(ConfigError, match="not both"):
        learn_concept(None, sae, "x", ["a x"], ["a y"], word="x", kind="style")
    with pytest.raises(ConfigError, match="a word needs its kind"):
        learn_concept(None, sae, "x", word="x")
    with pytest.raises(ConfigError, match="give positive and negative prompts, or a word and its kind"):
        learn_concept(None, sae, "x", ["a x"])
    with pytest.raises(ConfigError, match="the kinds are style, object, other"):
        learn_concept(None, sae, "x", word="x", kind="thing")


@pytest.fixture()
def sae_file(tmp_path):
    save_sae(fresh_sae(), tmp_path / "s.safetensors")
    (tmp_path / "pos.txt").write_text("a cat\n")
    return tmp_path


def test_cli_learns_a_word(capsys, sae_file):
    code, out, err = run_cli(capsys, "learn-concept", sae_file / "s.safetensors", "--word", "stripes", "--kind", "style",
                             "--vocabulary", "demo", "--model", tiny_model(), "--steps", "2", "--min-specificity", "0")
    assert code == 0, err
    assert "learned concept 'stripes'" in out
    info = get_concept(load_sae(sae_file / "s.safetensors"), "stripes").info
    assert (info["word"], info["kind"]) == ("stripes", "style")
    assert (info["positive"], info["negative"]) == prompts_from_word("stripes", "style", DEMO_VOCABULARY)
    code, out, err = run_cli(capsys, "learn-concept", sae_file / "s.safetensors", "--word", "ring", "--kind", "object",
                             "--concept", "round", "--vocabulary", "demo", "--model", tiny_model(), "--steps", "1",
                             "--min-specificity", "0")
    assert code == 0, err
    info = get_concept(load_sae(sae_file / "s.safetensors"), "round").info
    assert (info["word"], info["kind"]) == ("ring", "object")
    assert info["positive"] == prompts_from_word("ring", "object", DEMO_VOCABULARY)[0]


@pytest.mark.parametrize("extra, message", [
    (["--word", "cat", "--kind", "object", "--positive", "pos.txt"], "--word replaces --positive/--negative"),
    (["--word", "cat", "--kind", "object", "--library", "pos.txt"], "--word replaces"),
    (["--word", "cat"], "--word needs --kind"),
    (["--concept", "cat", "--kind", "object", "--positive", "pos.txt", "--negative", "pos.txt"],
     "--kind and --vocabulary go with --word"),
    (["--word", " ", "--kind", "style"], "a concept needs a non-empty name"),
])
def test_cli_word_errors(capsys, sae_file, extra, message):
    extra = [str(sae_file / e) if e == "pos.txt" else e for e in extra]
    code, _, err = run_cli(capsys, "learn-concept", sae_file / "s.safetensors", *extra, "--model", tiny_model())
    assert_user_error(code, err, message)


def test_cli_picks_the_demo_vocabulary_for_the_demo_model(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixelDiffusionPipeline"}))
    demo = argparse.Namespace(model=str(tmp_path), vocabulary=None)
    assert word_vocabulary(demo) is DEMO_VOCABULARY
    assert word_vocabulary(argparse.Namespace(model=str(tmp_path), vocabulary="generic")) is GENERIC
    assert word_vocabulary(argparse.Namespace(model=tiny_model(), vocabulary=None)) is GENERIC
    assert word_vocabulary(argparse.Namespace(model=str(tmp_path / "x.safetensors"), vocabulary=None)) is GENERIC
