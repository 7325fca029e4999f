"""The shipped demo model, classifier and SAE still load, generate, classify and erase (``saeuron eval --quick``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error, run_cli

from saeuron_demo.classifier import load_classifier, predict
from saeuron_demo.dataset import OBJECTS, STYLES, generate
from saeuron_core.sae.files import load_sae
from saeuron_core.sae.library import concept_names

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
    from saeuron_demo.assets import shipped_gates
    from saeuron_demo.pipeline import load_demo_pipeline
    from saeuron_core.hosts.hooks import check_sae_fits

    sae = load_sae(ASSETS / name)
    coverage, detectors = shipped_gates()
    # besides its concepts, a library holds the detector entries of the gated concepts it erases
    wanted = sorted([*names, *(detectors[c] for c in names if c in detectors)])
    assert sae.config.hook_point == hook_point and sorted(concept_names(sae)) == wanted
    check_sae_fits(load_demo_pipeline(str(ASSETS / "model")).unet, hook_point, sae)


def test_shipped_gates_name_detectors_learned_with_peak_specificity():
    from saeuron_demo.assets import shipped_gates
    from saeuron_demo.evaluation import EvalSettings
    from saeuron_core.sae.library import get_concept

    coverage, detectors = shipped_gates()
    shipped = EvalSettings(min_coverage_of=coverage, detect_with=detectors)  # as the eval CLI and erase demo build it
    assert set(detectors) <= set(coverage) <= set(OBJECTS + STYLES)
    assert all(0 < v <= 1 for v in coverage.values())
    for concept, entry in detectors.items():
        assert shipped.gate_options([concept]) == {"min_coverage": {concept: coverage[concept]},
                                                   "detect_with": {concept: entry}}
        for name in ("sae-styles.safetensors", "sae-styles-extra.safetensors", "sae-objects.safetensors",
                     "sae-objects-mid.safetensors"):
            sae = load_sae(ASSETS / name)
            if concept in concept_names(sae):
                info = get_concept(sae, entry).info["selection"]
                assert info["peak_specificity"] == pytest.approx(0.2)
                assert info["top_n"] == get_concept(sae, concept).info["selection"]["top_n"]
    assert shipped.gate_options(["stripes"]) == {"min_coverage": {"stripes": 0.0}, "detect_with": {}}  # not gated


def test_shipped_outline_uses_more_features_than_the_other_styles():
    # outline is relearned with top_n 64 (build_demo_sae.py --relearn outline --top-n 64); the rest keep 3.
    from saeuron_core.sae.library import get_concept

    for name in ("sae-styles.safetensors", "sae-styles-extra.safetensors"):
        sae = load_sae(ASSETS / name)
        outline, gradient = get_concept(sae, "outline"), get_concept(sae, "gradient")
        assert outline.info["selection"]["top_n"] == 64 and int(outline.n_selected.min()) > 3
        assert gradient.info["selection"]["top_n"] == 3 and int(gradient.n_selected.max()) == 3


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
    from saeuron_demo.assets import ABLATE_STRENGTH

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
    # Every figure with its interval; the same methods with the node's defaults (what a user gets) beside them.
    row = report["per_concept"]["ablate"][0]
    assert row["counts"]["UA"] == [round(row["UA"] * 8), 8] and len(row["confidences"]) == 8
    assert row["interval"]["UA"][0] <= row["UA"] <= row["interval"]["UA"][1]
    defaults = report["defaults"]
    assert defaults["settings"]["ablate_strength"] == 1.0 and defaults["settings"]["ablate_strength_of"] == {}
    assert defaults["settings"]["min_coverage_of"] == {} and defaults["settings"]["replace_also_at"] == {}
    assert defaults["settings"]["seeds"] == [1000] and set(defaults["per_concept"]) == {"ablate", "replace"}
    assert "With the Concept Eraser node's defaults" in out and "In brackets: 95% intervals" in out

    # Re-measuring one concept into the report (--update) reproduces its rows: generation is deterministic.
    code, out, err = run_cli(capsys, "eval", "--quick", "--concepts", "stripes", "--update", tmp_path / "report.json",
                             "--json", tmp_path / "updated.json", "--misread-dir", tmp_path / "misread")
    assert code == 0, err
    updated = json.loads((tmp_path / "updated.json").read_text())
    # The misread sheets list exactly the images the metrics counted wrong.
    clean_tiles = json.loads((tmp_path / "misread" / "none.png.json").read_text())
    assert len(clean_tiles) == sum(sum(c.values()) for c in report["clean_misread"].values())
    for method in ("negative_prompt", "ablate", "replace"):
        row = next(r for r in report["per_concept"][method] if r["concept"] == "stripes")
        tiles = json.loads((tmp_path / "misread" / f"{method}-stripes.png.json").read_text())
        assert sum(t["why"] == "still" for t in tiles) == round((1 - row["UA"]) * 8)  # 8 stripes prompts, 1 seed
        assert sum(t["why"] == "lost" for t in tiles) == round((1 - row["IRA"]) * 56) == sum(row["misread"].values())
        assert all(t["head"] == "style" for t in tiles)
        assert (tmp_path / "misread" / f"{method}-stripes.png").exists() == bool(tiles)
    for method, rows in report["per_concept"].items():
        assert [r["concept"] for r in updated["per_concept"][method]] == [r["concept"] for r in rows]
        for new_row, row in zip(updated["per_concept"][method], rows):
            assert {k: new_row[k] for k in ("UA", "IRA", "CRA")} == {k: row[k] for k in ("UA", "IRA", "CRA")}
            assert new_row["activation_shift"] == pytest.approx(row["activation_shift"], rel=1e-5)
    assert updated["updates"][0]["concepts"] == ["stripes"] and "Re-measured by an update" in out
    for method, rows in report["defaults"]["per_concept"].items():  # the node-default rows are re-measured too
        assert [(r["concept"], r["UA"], r["IRA"]) for r in updated["defaults"]["per_concept"][method]] == \
            [(r["concept"], r["UA"], r["IRA"]) for r in rows]
    code, _, err = run_cli(capsys, "eval", "--quick", "--concepts", "stripes", "--no-defaults", "--update",
                           tmp_path / "report.json")
    assert_user_error(code, err, "rows with the node's defaults (ablate, replace) would go stale")


def test_eval_refuses_block_strengths_it_cannot_use(capsys):
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strength-at", "up_blocks.1.attentions.2")
    assert code == 2 and "--ablate-strength-at takes HOOK_POINT=STRENGTH, got 'up_blocks.1.attentions.2'" in err
    code, _, err = run_cli(capsys, "eval", "--quick", "--ablate-strength-at", "up_blocks.1.attentions.0=3")
    assert code == 2 and "an ablate strength is set for up_blocks.1.attentions.0 but no SAE hooks it" in err
    code, _, err = run_cli(capsys, "eval", "--quick", "--min-coverage-of", "stripes=most")
    assert code == 2 and "--min-coverage-of takes CONCEPT=SHARE, got 'stripes=most'" in err
    code, _, err = run_cli(capsys, "eval", "--quick", "--detect-with", "stripes=stripes (detector)")
    assert code == 2 and "lacks the detector 'stripes (detector)'" in err
    code, _, err = run_cli(capsys, "eval", "--quick", "--gates", str(Path(__file__)))
    assert code == 2 and "--gates: " in err and "is not JSON" in err


def test_eval_update_refuses_missing_foreign_and_mismatched_reports_before_generating(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--quick", "--update", str(tmp_path / "missing.json"))
    assert code == 2 and "no evaluation report at" in err
    (tmp_path / "other.json").write_text('{"seeds": [1]}')
    code, _, err = run_cli(capsys, "eval", "--quick", "--update", str(tmp_path / "other.json"))
    assert code == 2 and "is not an evaluation report" in err
    shipped = Path(__file__).resolve().parents[1] / "docs" / "eval-report.json"  # two seeds and 20 steps, not --quick's
    code, _, err = run_cli(capsys, "eval", "--quick", "--update", str(shipped))
    assert code == 2 and "cannot update the report: its settings differ" in err
    code, _, err = run_cli(capsys, "eval", "--seeds", "1000,1001", "--update", str(shipped))
    assert code == 2 and "add --multi '' --generalization ''" in err


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


@pytest.mark.parametrize("name", ["eval-report.json", "eval-generalization.json"])
def test_shipped_reports_were_measured_with_the_shipped_strengths_and_gates(name):
    from saeuron_demo.assets import shipped_gates, shipped_strengths

    settings = json.loads((Path(__file__).resolve().parents[1] / "docs" / name).read_text())["settings"]
    (at, of), (coverage, detectors) = shipped_strengths(), shipped_gates()
    assert settings["ablate_strength_at"] == at and settings["ablate_strength_of"] == of
    assert settings["min_coverage_of"] == coverage and settings["detect_with"] == detectors


def test_shipped_concept_strengths_cover_every_concept():
    from saeuron_demo.assets import concept_strengths

    chosen = concept_strengths()
    assert sorted(chosen) == sorted(OBJECTS + STYLES) and all(0 < v <= 100 for v in chosen.values())
