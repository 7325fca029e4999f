"""The evaluation's 95% intervals: Wilson's for proportions, a percentile bootstrap for means."""

import math

import pytest
import torch

from saeuron_demo.evaluation.intervals import bootstrap_mean, wilson


def test_wilson_matches_the_formula_on_known_values():
    # 8 of 10: the textbook Wilson interval (0.490, 0.943)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # every image erased still leaves room below 1; none leaves room above 0
    assert wilson(64, 64)[1] == 1.0 and wilson(64, 64)[0] == pytest.approx(0.9434, abs=1e-4)
    assert wilson(0, 64)[0] == 0.0 and 0 < wilson(0, 64)[1] < 0.06
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError, match="between 0 and n=4"):
        wilson(5, 4)


def test_wilson_narrows_with_more_images():
    widths = [wilson(round(0.95 * n), n)[1] - wilson(round(0.95 * n), n)[0] for n in (128, 512, 2048)]
    assert widths[0] > widths[1] > widths[2]
    lo, hi = wilson(486, 512)  # a kind's UA near 95% over 8 concepts x 64 images
    assert (hi - lo) / 2 < 0.02


def test_bootstrap_is_reproducible_and_covers_the_mean():
    values = torch.rand(64, generator=torch.Generator().manual_seed(3))
    first, again = bootstrap_mean(values), bootstrap_mean(values.tolist())
    assert first == again
    assert first[0] < float(values.mean()) < first[1]
    assert bootstrap_mean(values, seed=1) != first
    assert bootstrap_mean([0.7] * 10) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in bootstrap_mean([]))


def test_bootstrap_interval_holds_the_true_mean_about_as_often_as_it_says():
    generator = torch.Generator().manual_seed(0)
    hits = 0
    for trial in range(200):
        sample = torch.rand(64, generator=generator)  # true mean 0.5
        lo, hi = bootstrap_mean(sample, resamples=500, seed=trial)
        hits += lo <= 0.5 <= hi
    assert 0.88 <= hits / 200 <= 0.99
