"""UnlearnCanvas metrics of the evaluation on hand-made classifier readings, and the CLI's checks."""

from __future__ import annotations

import pytest
import torch

from saeuron_core.errors import ConfigError
from saeuron_core.evaluation import EvalSettings, Evaluator, RunOutput, demo_grid, format_report, mean_metrics
from saeuron_core.sae import SAEConfig, TopKSAE


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
    return RunOutput(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), objects, styles, po, ps, mean, sq, 0.0)


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
    # A style concept uses the style head for UA/IRA and the object head for CRA.
    m = ev.concept_metrics(_run(ev, objs, stys), "stripes", clean)
    assert m["CRA"] == pytest.approx(1 - 17 / 128)


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
    ev = _evaluator(seeds=1)
    lo, ls = ev._labels()
    objs, stys = lo.clone(), ls.clone()
    star, stripes = ev.grid.object_names.index("star"), ev.grid.style_names.index("stripes")
    objs[lo == star] = 0
    stys[ls == stripes] = 0
    m = ev.multi_metrics(_run(ev, objs, stys), ["star", "stripes"])
    assert m == {"UA": 1.0, "RA_object": 1.0, "RA_style": 1.0}
    rows = [{"kind": "style", "UA": 1.0}, {"kind": "style", "UA": 0.5}]
    assert mean_metrics(rows, ["UA"]) == {"UA": 0.75}
    report = {"settings": vars(ev.settings), "clean_accuracy": {"object": 1.0, "style": 0.5},
              "summary": {"ablate": {"style": {"UA": 0.9, "IRA": 0.8, "CRA": 0.7, "retained_confidence": 0.6,
                                               "activation_shift": 0.5}}}, "seconds": 3.0}
    text = format_report(report)
    assert "| ablate | style | 90.0 | 80.0 | 70.0 | 60.0 | 0.50 |" in text


def test_unknown_concepts_and_methods_are_refused() -> None:
    ev = _evaluator()
    with pytest.raises(ConfigError, match="neither an object"):
        ev.grid.kind_of("banana")
    with pytest.raises(ConfigError, match="unknown method"):
        ev._eraser("melt", ["star"])
    assert demo_grid().prompts[0] == "a circle in solid style"
    with pytest.raises(ConfigError, match="at least one seed"):
        Evaluator(None, ev.sae, None, EvalSettings(seeds=[]))
