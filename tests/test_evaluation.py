"""UnlearnCanvas metrics of the evaluation on hand-made classifier readings, and the CLI's checks."""

from __future__ import annotations

import json

import pytest
import torch

from saeuron_core.erasure.options import EraseOptions
from saeuron_core.errors import ConfigError
from saeuron_core.sae.model import SAEConfig, TopKSAE
from saeuron_demo.evaluation import (EvalSettings, Evaluator, RunOutput, best_strengths, concept_owners, demo_grid,
                                     format_report, mean_metrics, summary_by_kind)
from saeuron_demo.evaluation.intervals import wilson


def _evaluator(seeds: int = 2) -> Evaluator:
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="up_blocks.1.attentions.1"))
    return Evaluator(pipe=None, sae=sae, classifier=None, settings=EvalSettings(seeds=list(range(seeds))))


def _run(ev: Evaluator, objects: torch.Tensor, styles: torch.Tensor, act_mean=None, act_sq=None) -> RunOutput:
    n = len(objects)
    po = torch.nn.functional.one_hot(objects, 8).float() * 0.9 + 0.0125
    ps = torch.nn.functional.one_hot(styles, 8).float() * 0.9 + 0.0125
    p = len(ev.grid.prompts)
    mean = act_mean if act_mean is not None else torch.zeros(p, 4, dtype=torch.float64)
    sq = act_sq if act_sq is not None else torch.ones(p, 4, dtype=torch.float64)
    hp = ev.hook_points[0]
    return RunOutput(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), objects, styles, po, ps, {hp: mean}, {hp: sq}, 0.0)


def test_ua_ira_cra_from_classifier_readings() -> None:
    ev = _evaluator(seeds=2)
    lo, ls = ev._labels()
    assert len(lo) == 128
    star = ev.grid.object_names.index("star")
    # Perfect clean run.
    clean = _run(ev, lo.clone(), ls.clone())
    m = ev.concept_metrics(clean, "star", clean)
    assert (m["UA"], m["IRA"], m["CRA"]) == (0.0, 1.0, 1.0)
    assert m["activation_shift"] == pytest.approx(0.0)
    # Erasing "star": star images read as circle; one other object image is wrong; 4 style readings are wrong.
    objs, stys = lo.clone(), ls.clone()
    objs[lo == star] = 0
    other = (lo != star).nonzero()[0, 0]
    objs[other] = (objs[other] + 1) % 8
    stys[:4] = (stys[:4] + 1) % 8
    m = ev.concept_metrics(_run(ev, objs, stys), "star", clean)
    assert m["UA"] == 1.0
    assert m["IRA"] == pytest.approx(1 - 1 / 112)
    assert m["CRA"] == pytest.approx(1 - 4 / 128)
    assert m["retained_confidence"] == pytest.approx(0.9125)
    # What the intervals are made of: hits and images of each share, the confidence of each erased image.
    assert m["counts"] == {"UA": [16, 16], "IRA": [111, 112], "CRA": [124, 128]}
    assert len(m["confidences"]) == 16 and sum(m["confidences"]) / 16 == pytest.approx(0.9125)
    assert m["interval"]["UA"] == list(wilson(16, 16)) and m["interval"]["CRA"] == list(wilson(124, 128))
    lo_conf, hi_conf = m["interval"]["retained_confidence"]
    assert lo_conf - 1e-5 <= m["retained_confidence"] <= hi_conf + 1e-5  # (confidences kept to 5 decimals)
    # A kind pools its concepts' images.
    ring = ev.concept_metrics(_run(ev, objs, stys), "ring", clean)
    both = summary_by_kind([{"concept": "star", "kind": "object", **m}, {"concept": "ring", "kind": "object", **ring}])
    assert both["object"]["interval"]["UA"] == list(wilson(16 + ring["counts"]["UA"][0], 32))
    assert both["object"]["UA"] == pytest.approx((m["UA"] + ring["UA"]) / 2)
    assert "interval" not in summary_by_kind([{"kind": "style", "UA": 1.0}])["style"]  # a row from an older report
    names = ev.grid.object_names
    assert m["misread"] == {f"{names[lo[other]]} as {names[objs[other]]}": 1}  # the one IRA lost
    assert ev.clean_misreads(_run(ev, objs, stys))["object"] == {"star as circle": 16, **m["misread"]}
    # A style concept uses the style head for UA/IRA and the object head for CRA.
    m = ev.concept_metrics(_run(ev, objs, stys), "stripes", clean)
    assert m["CRA"] == pytest.approx(1 - 17 / 128)


def test_misread_sheets_show_what_the_metrics_counted_wrong(tmp_path) -> None:
    from PIL import Image

    ev = _evaluator(seeds=2)
    lo, ls = ev._labels()
    star = ev.grid.object_names.index("star")
    objs, stys = lo.clone(), ls.clone()
    kept = (lo == star).nonzero()[:3, 0]           # 3 star images still read as star
    objs[lo == star] = 0
    objs[kept] = star
    other = (lo != star).nonzero()[5, 0]           # one other object misread
    objs[other] = (objs[other] + 1) % 8
    stys[7] = (stys[7] + 1) % 8                    # a style misread: not the erased concept's kind
    out = _run(ev, objs, stys)
    tiles = ev.misread_tiles(out, "star")
    assert [t["why"] for t in tiles] == ["still"] * 3 + ["lost"]
    assert [t["index"] for t in tiles] == kept.tolist() + [int(other)]
    t = tiles[-1]
    assert (t["prompt"], t["seed"], t["head"]) == (ev.grid.prompts[int(other) // 2], int(other) % 2, "object")
    assert (t["true"], t["read"]) == (ev.grid.object_names[lo[other]], ev.grid.object_names[objs[other]])
    clean_tiles = ev.misread_tiles(out)                    # every misread of both heads, in image order
    assert [(t["index"], t["head"]) for t in clean_tiles] == sorted(
        [(i, "object") for i in (objs != lo).nonzero()[:, 0].tolist()] + [(7, "style")])
    written = ev.save_misread_sheet(out, str(tmp_path / "sheets" / "ablate-star.png"), "star")
    assert written == tiles
    sheet = Image.open(tmp_path / "sheets" / "ablate-star.png")
    assert sheet.size == (4 * 32 * 6, 32 * 6 + 14)        # 4 tiles in one row, each with its label band
    assert json.loads((tmp_path / "sheets" / "ablate-star.png.json").read_text()) == tiles
    # Nothing wrong: only the (empty) list is written.
    assert ev.save_misread_sheet(_run(ev, lo.clone(), ls.clone()), str(tmp_path / "clean.png")) == []
    assert not (tmp_path / "clean.png").exists() and (tmp_path / "clean.png.json").read_text().strip() == "[]"


def test_activation_shift_measures_distance_from_concept_free_statistics() -> None:
    ev = _evaluator(seeds=1)
    grid = ev.grid
    lo, ls = ev._labels()
    clean = _run(ev, lo, ls)
    star = grid.object_names.index("star")
    mean = torch.zeros(64, 4, dtype=torch.float64)
    mean[grid.objects == star] = 2.0  # mean moved by two standard deviations on the star prompts
    sq = torch.ones(64, 4, dtype=torch.float64) + mean * mean  # std stays 1
    shifted = _run(ev, lo, ls, mean, sq)
    assert ev.activation_shift(shifted, clean, "star") == pytest.approx(2.0)
    assert ev.activation_shift(shifted, clean, "ring") == pytest.approx(0.0)  # ring prompts did not move


def test_multi_concept_metrics_and_report_text() -> None:
    from saeuron_demo.evaluation import settings_json

    ev = _evaluator(seeds=1)
    lo, ls = ev._labels()
    objs, stys = lo.clone(), ls.clone()
    star, stripes = ev.grid.object_names.index("star"), ev.grid.style_names.index("stripes")
    objs[lo == star] = 0
    stys[ls == stripes] = 0
    m = ev.multi_metrics(_run(ev, objs, stys), ["star", "stripes"])
    counts = {"UA": [16, 16], "RA_object": [56, 56], "RA_style": [56, 56]}  # 8 star + 8 stripes images erased
    assert m == {"UA": 1.0, "RA_object": 1.0, "RA_style": 1.0, "counts": counts,
                 "interval": {k: list(wilson(*v)) for k, v in counts.items()}}
    rows = [{"kind": "style", "UA": 1.0}, {"kind": "style", "UA": 0.5}]
    assert mean_metrics(rows, ["UA"]) == {"UA": 0.75}
    report = {"settings": settings_json(ev.settings), "clean_accuracy": {"object": 1.0, "style": 0.5},
              "summary": {"ablate": {"style": {"UA": 0.9, "IRA": 0.8, "CRA": 0.7, "retained_confidence": 0.6,
                                               "activation_shift": 0.5}}}, "seconds": 3.0}
    text = format_report(report)
    assert "| ablate | style | 90.0 | 80.0 | 70.0 | 60.0 | 0.50 |" in text
    assert "ablate strength 10.0, replace strength" in text  # one SAE, no block strengths: the common one is used
    per_block = {**report, "settings": {**settings_json(ev.settings),
                                        "ablate_strength_at": {"up_blocks.1.attentions.1": 3.0}},
                 "saes": [{"hook_point": "up_blocks.1.attentions.1", "concepts": ["stripes"], "ablate_strength": 3.0}]}
    text = format_report(per_block)
    assert "ablate strength 10.0" not in text  # not used: the SAEs line says what is
    assert "SAEs: up_blocks.1.attentions.1 for stripes (ablate strength 3)." in text
    assert "Misread" not in text  # no per-concept rows, no misread counts
    misread = {"gradient as noise": 11, "stripes as solid": 2, "stripes as outline": 1, "gradient as outline": 1}
    rows = [{"concept": "solid", "kind": "style", "UA": 1.0, "IRA": 0.87, "CRA": 0.96, "misread": misread}]
    text = format_report({**report, "per_concept": {"ablate": rows},
                          "clean_misread": {"object": {}, "style": {"gradient as noise": 1}}})
    assert "- clean run, whole grid: objects none; styles gradient as noise 1" in text
    assert "- ablate: solid: gradient as noise 11, stripes as solid 2, stripes as outline 1, 1 other" in text


def test_strength_for_prefers_the_concept_then_the_block() -> None:
    s = EvalSettings(ablate_strength=10.0, ablate_strength_at={"mid_block.attentions.0": 4.0},
                     ablate_strength_of={"star": 2.0})
    assert s.strength_for("star", "mid_block.attentions.0") == 2.0
    assert s.strength_for("heart", "mid_block.attentions.0") == 4.0
    assert s.strength_for("heart", "up_blocks.1.attentions.2") == 10.0
    assert s.block_strength("mid_block.attentions.0") == 4.0 and s.block_strength("up_blocks.1.attentions.2") == 10.0


def test_unknown_concepts_and_methods_are_refused() -> None:
    ev = _evaluator()
    with pytest.raises(ConfigError, match="neither an object"):
        ev.grid.kind_of("banana")
    with pytest.raises(ConfigError, match="unknown method"):
        ev._erasers("melt", ["star"])
    assert demo_grid().prompts[0] == "a circle in solid style"
    with pytest.raises(ConfigError, match="at least one seed"):
        Evaluator(None, ev.saes, None, EvalSettings(seeds=[]))
    with pytest.raises(ConfigError, match="0 <= start <= end <= 1"):
        Evaluator(None, ev.saes, None, EvalSettings(start=0.8, end=0.2))
    with pytest.raises(ConfigError, match="at least one SAE"):
        Evaluator(None, [], None, EvalSettings())


def _with_concepts(sae: TopKSAE, names: list[str]) -> TopKSAE:
    from saeuron_core.sae.library import ConceptData, add_concept

    for i, name in enumerate(names):
        add_concept(sae, ConceptData(name=name, bucket_width=1000.0, max_timestep=1000,
                                     feature_ids=torch.tensor([[i]]), scores=torch.ones(1, 1), mu=torch.ones(1, 1),
                                     threshold=torch.zeros(1, 1), n_selected=torch.tensor([1]),
                                     observed=torch.tensor([True])))
    return sae


def test_two_saes_on_two_blocks_split_the_concepts() -> None:
    objects = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="down_blocks.2.attentions.1")),
                             ["star", "stripes"])
    styles = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="up_blocks.1.attentions.2")),
                            ["stripes", "noise"])
    ev = Evaluator(None, [objects, styles], None, EvalSettings())
    # Every SAE that has a concept erases it; its activation shift is read at the first one's block.
    assert ev.hook_point_of("star") == ev.hook_point_of("stripes") == "down_blocks.2.attentions.1"
    assert ev.hook_point_of("noise") == "up_blocks.1.attentions.2"
    assert "circle" in ev.missing and "noise" not in ev.missing
    erasers = ev._erasers("ablate", ["star", "noise"])
    assert {hp: [c.name for c in e.concepts] for hp, e in erasers.items()} == {
        "down_blocks.2.attentions.1": ["star"], "up_blocks.1.attentions.2": ["noise"]}
    erasers = ev._erasers("ablate", ["stripes"])
    assert {hp: [c.name for c in e.concepts] for hp, e in erasers.items()} == {
        "down_blocks.2.attentions.1": ["stripes"], "up_blocks.1.attentions.2": ["stripes"]}
    assert ev._erasers("negative_prompt", ["star"]) == {}
    with pytest.raises(ConfigError, match="no SAE's concept library has 'circle'"):
        ev._erasers("replace", ["circle"])
    with pytest.raises(ConfigError, match="two SAEs hook up_blocks.1.attentions.2"):
        Evaluator(None, [styles, styles], None, EvalSettings())
    # The activation shift of a concept is read at its own SAE's block.
    lo, ls = ev._labels()
    p = len(ev.grid.prompts)
    zeros, ones = torch.zeros(p, 4, dtype=torch.float64), torch.ones(p, 4, dtype=torch.float64)
    moved = zeros.clone()
    moved[ev.grid.styles == ev.grid.style_names.index("noise")] = 3.0
    acts = {"down_blocks.2.attentions.1": (zeros, ones), "up_blocks.1.attentions.2": (moved, ones + moved * moved)}
    po = torch.nn.functional.one_hot(lo, 8).float()
    ps = torch.nn.functional.one_hot(ls, 8).float()
    out = RunOutput(torch.zeros(len(lo), 3, 32, 32, dtype=torch.uint8), lo, ls, po, ps,
                    {hp: a[0] for hp, a in acts.items()}, {hp: a[1] for hp, a in acts.items()}, 0.0)
    clean = RunOutput(out.images, lo, ls, po, ps, {hp: zeros for hp in acts}, {hp: ones for hp in acts}, 0.0)
    assert ev.activation_shift(out, clean, "noise") == pytest.approx(3.0)
    assert ev.activation_shift(out, clean, "star") == pytest.approx(0.0)


def test_concept_strengths_win_over_block_strengths() -> None:
    objects = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="down_blocks.2.attentions.1")),
                             ["star", "heart"])
    styles = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="up_blocks.1.attentions.2")),
                            ["stripes"])
    settings = EvalSettings(ablate_strength=10.0, ablate_strength_at={"up_blocks.1.attentions.2": 2.0},
                            ablate_strength_of={"star": 5.0})
    ev = Evaluator(None, [objects, styles], None, settings)
    assert concept_owners([objects, styles, objects]) == {"star": [0, 2], "heart": [0, 2], "stripes": [1]}
    erasers = ev._erasers("ablate", ["star", "heart", "stripes"])
    assert erasers["down_blocks.2.attentions.1"].strengths == {"star": 5.0, "heart": 10.0}
    assert erasers["up_blocks.1.attentions.2"].strengths == {"stripes": 2.0}
    with pytest.raises(ConfigError, match="an ablate strength is set for 'circle' but no SAE's concept library has it"):
        Evaluator(None, [objects, styles], None, EvalSettings(ablate_strength_of={"circle": 3.0}))
    with pytest.raises(ConfigError, match="strength for 'star'"):
        Evaluator(None, [objects], None, EvalSettings(ablate_strength_of={"star": -1.0}))._erasers("ablate", ["star"])


def test_gates_and_detectors_reach_the_erasers() -> None:
    objects = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="down_blocks.2.attentions.1")),
                             ["star", "heart"])
    styles = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="up_blocks.1.attentions.2")),
                            ["solid", "noise", "solid (detector)"])
    settings = EvalSettings(min_coverage=0.1, min_coverage_of={"solid": 0.05, "star": 0.0},
                            detect_with={"solid": "solid (detector)"})
    ev = Evaluator(None, [objects, styles], None, settings)
    erasers = ev._erasers("ablate", ["star", "heart", "solid", "noise"])
    assert erasers["down_blocks.2.attentions.1"].min_coverage.tolist() == pytest.approx([0.0, 0.1])
    style = erasers["up_blocks.1.attentions.2"]
    assert style.min_coverage.tolist() == pytest.approx([0.05, 0.1])
    assert style.detect_with == {"solid": "solid (detector)"} and style.detectors[0].name == "solid (detector)"
    assert ev._erasers("replace", ["solid"])["up_blocks.1.attentions.2"].detect_with == {"solid": "solid (detector)"}
    with pytest.raises(ConfigError, match="a min_coverage is set for 'circle' but no SAE's concept library has it"):
        Evaluator(None, [objects, styles], None, EvalSettings(min_coverage_of={"circle": 0.1}))
    with pytest.raises(ConfigError, match="the SAE at down_blocks.2.attentions.1 erases 'star' but its library lacks "
                                          "the detector 'star \\(detector\\)'"):
        Evaluator(None, [objects, styles], None, EvalSettings(detect_with={"star": "star (detector)"}))
    with pytest.raises(ConfigError, match="min_coverage must be between 0 and 1"):
        Evaluator(None, [objects], None, EvalSettings(min_coverage=2.0))


def test_erase_options_give_each_method_its_own_settings() -> None:
    from saeuron_core.erasure.options import EraseOptions

    s = EvalSettings(replace=EraseOptions(method="replace", strength=0.5, threshold_scale=0.8, dilation=2,
                                          source="nearest", neighbors=3),
                     start=0.1, end=0.9, min_coverage=0.2, min_coverage_of={"solid": 0.05},
                     detect_with={"solid": "solid (detector)"})
    gates = {"min_coverage": {"solid": 0.05, "noise": 0.2}, "detect_with": {"solid": "solid (detector)"}}
    # ablation: the window and the gates; its strengths are per concept, the replace settings stay the eraser's own
    assert s.erase_options("ablate", ["solid", "noise"]) == EraseOptions(method="ablate", start=0.1, end=0.9, **gates)
    assert s.erase_options("replace", ["solid", "noise"]) == EraseOptions(
        method="replace", strength=0.5, threshold_scale=0.8, dilation=2, source="nearest", neighbors=3, start=0.1,
        end=0.9, **gates)
    assert s.erase_options("ablate") == EraseOptions(start=0.1, end=0.9, min_coverage=0.2)  # no concepts: the common gate
    # the settings the eraser reads default to the eraser's own defaults
    d, e = EvalSettings(), EraseOptions()
    r = d.replace
    assert (r.strength, r.threshold_scale, r.dilation, r.source, r.neighbors, d.start, d.end) == \
        (e.strength, e.threshold_scale, e.dilation, e.source, e.neighbors, e.start, e.end)
    with pytest.raises(ConfigError, match="neighbors must be a whole number"):
        EvalSettings(replace=EraseOptions(method="replace", neighbors=0)).erase_options("replace", ["solid"])
    with pytest.raises(ConfigError, match="min_coverage for 'solid'"):
        EvalSettings(min_coverage_of={"solid": 2.0}).erase_options("ablate", ["solid"])


def test_the_replace_settings_are_only_the_replace_methods_own_options() -> None:
    from saeuron_core.erasure.options import EraseOptions

    for stray in (EraseOptions(method="replace", end=0.5), EraseOptions(method="replace", min_coverage=0.1),
                  EraseOptions(strength=0.5)):
        with pytest.raises(ConfigError, match="the window and the gates are the evaluation's own"):
            EvalSettings(replace=stray)


def test_a_report_holds_the_settings_flat_as_the_shipped_reports_do() -> None:
    """The report's settings are a file format: the shipped report's keys in its order, the replace options among
    them by their report names; read back, they give the same settings."""
    from pathlib import Path

    from saeuron_core.erasure.options import EraseOptions
    from saeuron_demo.evaluation import REPLACE_SETTINGS, settings_from_json, settings_json

    shipped = json.loads((Path(__file__).resolve().parents[1] / "docs" / "eval-report.json").read_text())["settings"]
    assert list(settings_json(EvalSettings())) == list(shipped)
    assert json.dumps(settings_json(settings_from_json(shipped))) == json.dumps(shipped)
    assert REPLACE_SETTINGS == ("replace_strength", "threshold_scale", "dilation", "replace_source", "neighbors",
                                "replace_also_at")
    s = EvalSettings(seeds=[3, 4], replace=EraseOptions(method="replace", strength=0.5, source="nearest", neighbors=2),
                     start=0.2, replace_also_at={"a": ["b"]}, min_coverage_of={"solid": 0.1})
    flat = settings_json(s)
    assert (flat["replace_strength"], flat["replace_source"], flat["neighbors"], flat["start"]) == (0.5, "nearest", 2, 0.2)
    assert settings_from_json(flat) == s
    assert settings_from_json({"seeds": [1]}) == EvalSettings(seeds=[1])  # an older report's missing settings


def test_the_erasers_take_the_settings_erase_options() -> None:
    styles = _with_concepts(TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_point="up_blocks.1.attentions.2")),
                            ["solid", "noise"])
    from saeuron_core.erasure.options import EraseOptions

    settings = EvalSettings(ablate_strength_of={"solid": 4.0}, replace=EraseOptions(method="replace", strength=0.5,
                                                                                   dilation=0), end=0.5)
    ev = Evaluator(None, [styles], None, settings)
    for method in ("ablate", "replace"):
        eraser = ev._erasers(method, ["solid", "noise"])["up_blocks.1.attentions.2"]
        assert eraser.options == settings.erase_options(method, ["solid", "noise"])
    assert ev._erasers("ablate", ["solid", "noise"])["up_blocks.1.attentions.2"].strengths == {"solid": 4.0, "noise": 10.0}
    assert ev._erasers("replace", ["solid", "noise"])["up_blocks.1.attentions.2"].strengths == {"solid": 0.5, "noise": 0.5}


def test_the_shipped_assets_read_their_files_without_the_evaluation() -> None:
    import subprocess
    import sys

    from saeuron_demo import asset_files, evaluation

    # one loader of each file form, which the evaluation (and the CLI through it) shares
    assert evaluation.load_gates is asset_files.load_gates
    assert evaluation.load_concept_strengths is asset_files.load_concept_strengths
    code = ("import sys; from saeuron_demo import assets; assets.shipped_gates(); assets.shipped_strengths(); "
            "print(sorted(m for m in sys.modules if 'evaluation' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gates_file_is_read_and_checked(tmp_path) -> None:
    from saeuron_demo.asset_files import load_gates

    good = tmp_path / "gates.json"
    good.write_text('{"solid": {"min_coverage": 0.05, "detect_with": "solid (detector)"}, "noise": {"min_coverage": 0.1}}')
    assert load_gates(str(good)) == ({"solid": 0.05, "noise": 0.1}, {"solid": "solid (detector)"})
    for text in ('[1]', '{"solid": 0.05}', '{"solid": {"min_coverage": 2}}', '{"solid": {"min_coverage": 0.1, "x": 1}}',
                 '{"solid": {"min_coverage": 0.1, "detect_with": 3}}'):
        good.write_text(text)
        with pytest.raises(ConfigError, match="must hold an object"):
            load_gates(str(good))


def test_best_strength_per_concept_from_a_sweep() -> None:
    def row(concept, ua, ira, cra):
        return {"concept": concept, "UA": ua, "IRA": ira, "CRA": cra}

    sweep = {10.0: [row("star", 1.0, 0.6, 0.6), row("noise", 0.5, 1.0, 1.0)],
             2.0: [row("star", 0.5, 1.0, 1.0), row("noise", 0.5, 1.0, 1.0)],
             5.0: [row("star", 1.0, 0.9, 0.9), row("noise", 0.0, 1.0, 1.0)]}
    # star: the best mean of UA, IRA and CRA (5); noise: a tie between 2 and 10 goes to the lower strength.
    assert best_strengths(sweep) == {"star": 5.0, "noise": 2.0}
    with pytest.raises(ConfigError, match="one or more strengths"):
        best_strengths({})


def test_best_strength_can_require_the_retained_label_to_survive() -> None:
    def row(ua, conf):
        return {"concept": "outline", "UA": ua, "IRA": 0.9, "CRA": 0.9, "retained_confidence": conf}

    sweep = {5.0: [row(0.1, 0.99)], 10.0: [row(0.4, 0.8)], 40.0: [row(1.0, 0.12)]}
    assert best_strengths(sweep) == {"outline": 40.0}  # the wrecked picture wins on UA alone
    assert best_strengths(sweep, min_retained=0.5) == {"outline": 10.0}
    # the lowest strength is a choice whatever its confidence: a concept always gets one
    assert best_strengths({5.0: [row(0.1, 0.2)], 10.0: [row(0.4, 0.1)]}, min_retained=0.5) == {"outline": 5.0}
    with pytest.raises(ConfigError, match=r"share in \[0, 1\]"):
        best_strengths(sweep, min_retained=50)


def _report(rows: dict[str, list[dict]], clean: float = 1.0, seconds: float = 10.0) -> dict:
    grid = demo_grid()
    from saeuron_demo.evaluation import settings_json

    return {"settings": settings_json(EvalSettings(seeds=[1000])), "grid": {"objects": grid.object_names, "styles": grid.style_names},
            "saes": [{"hook_point": "up_blocks.1.attentions.2", "concepts": [], "ablate_strength": 2.0}],
            "clean_accuracy": {"object": clean, "style": 0.9}, "per_concept": rows,
            "summary": {m: {} for m in rows}, "seconds": seconds}


def _row(concept: str, kind: str, ua: float) -> dict:
    return {"concept": concept, "kind": kind, "UA": ua, "IRA": 0.9, "CRA": 1.0, "retained_confidence": 0.8,
            "activation_shift": 0.3}


def test_update_report_replaces_rows_and_recomputes_the_summary() -> None:
    from saeuron_demo.evaluation import update_report

    old = _report({"ablate": [_row("star", "object", 1.0), _row("noise", "style", 0.5), _row("outline", "style", 0.25)]})
    new = _report({"ablate": [_row("outline", "style", 0.75)]}, seconds=3.0)
    merged = update_report(old, new)
    assert [r["concept"] for r in merged["per_concept"]["ablate"]] == ["star", "noise", "outline"]
    assert merged["per_concept"]["ablate"][2]["UA"] == 0.75 and old["per_concept"]["ablate"][2]["UA"] == 0.25
    assert merged["summary"]["ablate"]["style"]["UA"] == pytest.approx(0.625)
    assert merged["summary"]["ablate"]["object"]["UA"] == 1.0
    assert merged["updates"] == [{"concepts": ["outline"], "methods": ["ablate"], "seconds": 3.0}]
    assert "Re-measured by an update: ablate rows of outline (3 s)." in format_report(merged)


def test_update_may_change_only_the_remeasured_concepts_own_settings() -> None:
    from saeuron_demo.evaluation import check_updatable, settings_from_json, update_report

    old = _report({"ablate": [_row("noise", "style", 0.5), _row("outline", "style", 0.25)]})
    old["settings"].update(ablate_strength_of={"noise": 1.0, "outline": 5.0}, min_coverage_of={"outline": 0.2},
                           detect_with={"outline": "outline (detector)"})
    new = _report({"ablate": [_row("outline", "style", 0.75)]}, seconds=3.0)
    new["settings"].update(ablate_strength_of={"noise": 1.0, "outline": 7.0}, min_coverage_of={"outline": 0.3},
                           detect_with={"outline": "outline (detector)"})
    merged = update_report(old, new)
    assert merged["settings"]["ablate_strength_of"] == {"noise": 1.0, "outline": 7.0}
    assert merged["settings"]["min_coverage_of"] == {"outline": 0.3}
    assert merged["updates"][0]["changed"] == {"ablate_strength_of": {"outline": 7.0}, "min_coverage_of": {"outline": 0.3}}
    assert "with ablate strength of outline 7.0; min coverage of outline 0.3." in format_report(merged)
    settings = settings_from_json(new["settings"])
    check_updatable(old, settings, concepts=["outline"])
    # Another concept's own setting, or the re-measured one's when it is not re-measured, is refused.
    with pytest.raises(ConfigError, match="settings differ"):
        check_updatable(old, settings, concepts=["noise"])
    new["settings"]["ablate_strength_of"]["noise"] = 2.0
    with pytest.raises(ConfigError, match="settings differ"):
        update_report(old, new)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(clean_accuracy={"object": 0.5, "style": 0.9}), "clean accuracy differ"),
    (lambda r: r["settings"].update(steps=8), "settings differ"),
    (lambda r: r["saes"][0].update(ablate_strength=3.0), "SAE blocks"),
    (lambda r: r.update(multi={"ablate": [{"n": 2}]}), "several-at-once"),
    (lambda r: r.update(per_concept={"replace": []}), "no replace rows"),
])
def test_update_report_refuses_runs_it_cannot_merge(change, message) -> None:
    from saeuron_demo.evaluation import update_report

    old = _report({"ablate": [_row("outline", "style", 0.25)]})
    new = _report({"ablate": [_row("outline", "style", 0.75)]})
    change(new)
    with pytest.raises(ConfigError, match=message):
        update_report(old, new)


def test_an_update_may_replace_every_replace_row_with_its_own_settings_and_sets() -> None:
    from saeuron_demo.evaluation import check_updatable, settings_from_json, update_report

    old = _report({"ablate": [_row("circle", "object", 0.5), _row("outline", "style", 0.25)],
                   "replace": [_row("circle", "object", 0.1), _row("outline", "style", 0.2)]})
    old["multi"] = {"ablate": [{"n": 2, "concepts": ["circle", "outline"], "UA": 0.5}],
                    "replace": [{"n": 2, "concepts": ["circle", "outline"], "UA": 0.1}]}
    old["settings"].update(replace_source="sample", dilation=0)
    new = _report({"replace": [_row("circle", "object", 0.9), _row("outline", "style", 0.8)]}, seconds=5.0)
    new["settings"].update(replace_source="uncond", dilation=1, replace_also_at={"a": ["b"]})
    new["multi"] = {"replace": [{"n": 2, "concepts": ["circle", "outline"], "UA": 0.9}]}
    settings = settings_from_json(new["settings"])
    check_updatable(old, settings, concepts=["circle", "outline"], methods=["none", "replace"], multi=True)
    merged = update_report(old, new)
    assert merged["summary"]["replace"]["object"]["UA"] == 0.9 and merged["summary"]["ablate"] == old["summary"]["ablate"]
    assert merged["multi"]["replace"][0]["UA"] == 0.9 and merged["multi"]["ablate"] == old["multi"]["ablate"]
    assert merged["settings"]["replace_source"] == "uncond"
    assert merged["updates"][0]["changed"]["replace"] == {"dilation": 1, "replace_source": "uncond",
                                                          "replace_also_at": {"a": ["b"]}}
    # Not every replace row, or the ablate rows with another replace setting: refused.
    with pytest.raises(ConfigError, match="several-at-once"):
        check_updatable(old, settings, concepts=["circle"], methods=["replace"], multi=True)
    with pytest.raises(ConfigError, match="settings differ"):
        check_updatable(old, settings, concepts=["circle", "outline"], methods=["ablate"])
    part = _report({"replace": [_row("circle", "object", 0.9)]})
    part["settings"].update(replace_source="sample", dilation=0)
    part["multi"] = new["multi"]
    with pytest.raises(ConfigError, match="several-at-once"):
        update_report(old, part)


def test_update_report_refuses_to_leave_runs_over_the_updated_concept_stale() -> None:
    from saeuron_demo.evaluation import update_report

    old = _report({"ablate": [_row("circle", "object", 0.5), _row("outline", "style", 0.25)]})
    old["multi"] = {"ablate": [{"n": 2, "concepts": ["circle", "solid"], "UA": 0.5}]}
    with pytest.raises(ConfigError, match="several-at-once runs erase circle"):
        update_report(old, _report({"ablate": [_row("circle", "object", 0.75)]}))
    assert update_report(old, _report({"ablate": [_row("outline", "style", 0.75)]}))["multi"] == old["multi"]
    old["generalization"] = {"summary": {}}
    with pytest.raises(ConfigError, match="generalisation summary covers every concept"):
        update_report(old, _report({"ablate": [_row("outline", "style", 0.75)]}))


def test_node_defaults_keep_the_generation_and_drop_every_tuned_setting() -> None:
    tuned = EvalSettings(seeds=[1000, 1001], steps=12, guidance=4.0, scheduler="euler", ablate_strength=10.0,
                         ablate_strength_at={"mid_block.attentions.0": 5.0}, ablate_strength_of={"star": 2.0},
                         replace=EraseOptions(method="replace", strength=0.5, dilation=2), min_coverage=0.1,
                         min_coverage_of={"solid": 0.05}, detect_with={"solid": "solid (detector)"},
                         replace_also_at={"down_blocks.2.attentions.1": ["up_blocks.1.attentions.0"]}, start=0.2,
                         batch_size=16)
    user = tuned.node_defaults()
    assert user == EvalSettings(seeds=[1000, 1001], steps=12, guidance=4.0, scheduler="euler", batch_size=16,
                                ablate_strength=EraseOptions().strength)
    assert user.strength_for("star", "mid_block.attentions.0") == 1.0
    assert user.erase_options("replace", ["star"]) == EraseOptions(method="replace", min_coverage={"star": 0.0},
                                                                   detect_with={})


def test_an_update_re_measures_the_node_default_rows_of_its_concepts() -> None:
    from saeuron_demo.evaluation import update_report

    rows = [_row("star", "object", 1.0), _row("outline", "style", 0.25)]
    old = {**_report({"ablate": rows}), "defaults": {"settings": {}, "per_concept": {"ablate": rows}, "summary": {}}}
    with pytest.raises(ConfigError, match="rows with the node's defaults \\(ablate\\) would go stale"):
        update_report(old, _report({"ablate": [_row("outline", "style", 0.75)]}))
    new = {**_report({"ablate": [_row("outline", "style", 0.75)]}),
           "defaults": {"settings": {}, "per_concept": {"ablate": [_row("outline", "style", 0.5)]}, "summary": {}}}
    merged = update_report(old, new)
    assert [(r["concept"], r["UA"]) for r in merged["defaults"]["per_concept"]["ablate"]] == [("star", 1.0),
                                                                                              ("outline", 0.5)]
    assert merged["defaults"]["summary"]["ablate"]["style"]["UA"] == 0.5
