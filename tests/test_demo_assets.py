"""The shipped demo model, classifier and SAE still load, generate, classify and erase (``saeuron eval --quick``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from saeuron_core.demo.classifier import load_classifier, predict
from saeuron_core.demo.dataset import OBJECTS, STYLES, generate
from saeuron_core.formats import load_sae
from saeuron_core.scoring import concept_names

ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"


def test_shipped_sae_has_every_object_and_style_and_fits_the_model():
    sae = load_sae(ASSETS / "sae.safetensors")
    assert sorted(concept_names(sae)) == sorted(OBJECTS + STYLES)
    unet_cfg = json.loads((ASSETS / "model" / "unet" / "config.json").read_text())
    assert sae.config.hook_point == "up_blocks.1.attentions.1"
    assert sae.config.d_in == unet_cfg["block_out_channels"][-2]  # up_blocks.1 runs at the second-deepest width


@pytest.mark.parametrize("name, hook_point, names", [
    ("sae-objects.safetensors", "down_blocks.2.attentions.1", OBJECTS),
    ("sae-objects-mid.safetensors", "mid_block.attentions.0", OBJECTS),
    ("sae-styles.safetensors", "up_blocks.1.attentions.2", STYLES),
    ("sae-styles-extra.safetensors", "up_blocks.1.attentions.1", ["gradient", "outline"]),
])
def test_shipped_per_kind_saes_hook_where_their_kind_enters(name, hook_point, names):
    from saeuron_core.hooks import check_sae_fits
    from saeuron_core.pipelines import load_pipeline

    sae = load_sae(ASSETS / name)
    assert sae.config.hook_point == hook_point and sorted(concept_names(sae)) == sorted(names)
    check_sae_fits(load_pipeline(str(ASSETS / "model")).unet, hook_point, sae)


def test_shipped_classifier_reads_generator_images():
    clf = load_classifier(str(ASSETS / "classifier"))
    imgs, objs, stys, _ = generate(256, seed=12345)
    po, ps = predict(clf, imgs)
    assert (po == objs).float().mean() >= 0.97 and (ps == stys).float().mean() >= 0.95


@pytest.mark.slow
def test_eval_quick_loads_everything_and_erases(capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--quick", "--json", tmp_path / "report.json")
    assert code == 0, err
    assert "| ablate | style |" in out and "| replace | object |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["seeds"] == [1000] and report["settings"]["steps"] == 8
    concepts = [r["concept"] for r in report["per_concept"]["none"]]
    assert concepts == ["star", "stripes"]
    # Each concept is erased by the shipped SAE of its kind, at the strength chosen for that block.
    from saeuron_core.demo.assets import ABLATE_STRENGTH

    assert [(e["hook_point"], e["concepts"], e["ablate_strength"]) for e in report["saes"]] == [
        (hp, c, ABLATE_STRENGTH[hp]) for hp, c in (("down_blocks.2.attentions.1", ["star"]),
                                                   ("mid_block.attentions.0", ["star"]),
                                                   ("up_blocks.1.attentions.2", ["stripes"]),
                                                   ("up_blocks.1.attentions.1", []))]  # the extra style SAE

    def ua(method: str) -> float:
        return sum(r["UA"] for r in report["per_concept"][method]) / 2

    # Erasure does something: the better SAE method removes the concepts far more often than doing nothing.
    assert max(ua("ablate"), ua("replace")) >= ua("none") + 0.25
    for method in ("ablate", "replace"):
        for row in report["per_concept"][method]:
            assert 0.0 <= row["IRA"] <= 1.0 and 0.0 <= row["CRA"] <= 1.0 and row["activation_shift"] >= 0
    assert torch.isfinite(torch.tensor([r["retained_confidence"] for r in report["per_concept"]["ablate"]])).all()


def test_eval_refuses_block_strengths_it_cannot_use(capsys):
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strength-at", "up_blocks.1.attentions.2")
    assert code == 2 and "--ablate-strength-at takes HOOK_POINT=STRENGTH, got 'up_blocks.1.attentions.2'" in err
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strength-at", "up_blocks.1.attentions.0=3")
    assert code == 2 and "an ablate strength is set for up_blocks.1.attentions.0 but no SAE hooks it" in err


def test_eval_refuses_bad_concept_strength_files(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"star": "strong"}')
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strengths", str(bad))
    assert code == 2 and "must hold an object {concept: strength} with numbers" in err
    bad.write_text("{star: 3")
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strengths", str(bad))
    assert code == 2 and "is not JSON" in err
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strengths", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


def test_shipped_concept_strengths_cover_every_concept():
    from saeuron_core.demo.assets import concept_strengths

    chosen = concept_strengths()
    assert sorted(chosen) == sorted(OBJECTS + STYLES) and all(0 < v <= 100 for v in chosen.values())
