"""Paired statistics against scipy's paired t-test and against the formulas written out; Holm; the verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from attnkit.analysis.stats import holm, paired_comparison, verdict

VARIANT = [0.912, 0.905, 0.931, 0.920, 0.917]
BASELINE = [0.901, 0.899, 0.915, 0.918, 0.903]


def test_interval_and_p_value_against_the_formulas_and_scipy():
    result = paired_comparison(VARIANT, BASELINE)
    d = np.subtract(VARIANT, BASELINE)
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert result.n == 5 and result.mean_diff == pytest.approx(mean, abs=1e-15)
    assert (result.ci_low, result.ci_high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    t = mean / (sd / math.sqrt(n))
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-12)
    assert result.p_value == pytest.approx(stats.ttest_rel(VARIANT, BASELINE).pvalue, rel=1e-12)
    # fixed numbers: d = [.011, .006, .016, .002, .014], mean .0098, sd .005762, t = 3.803 on 4 degrees of freedom
    assert result.mean_diff == pytest.approx(0.0098) and result.p_value == pytest.approx(0.01905, abs=5e-5)


def test_a_wider_confidence_gives_a_wider_interval():
    narrow, wide = paired_comparison(VARIANT, BASELINE, 0.90), paired_comparison(VARIANT, BASELINE, 0.99)
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high


def test_degenerate_cases():
    same = paired_comparison([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert (same.mean_diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    shifted = paired_comparison([0.91, 0.81, 0.71], [0.9, 0.8, 0.7])
    assert shifted.p_value == 0.0 and shifted.ci_low == pytest.approx(0.01)
    one = paired_comparison([0.9], [0.8])
    assert one.n == 1 and math.isnan(one.p_value) and math.isnan(one.ci_low)
    with pytest.raises(ValueError, match="one result per seed on both sides"):
        paired_comparison([0.9, 0.8], [0.9])


def test_holm_adjustment():
    # sorted p: .01 (×4), .02 (×3), .03 (×2), .04 (×1), made monotone
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.01, float("nan"), 0.02])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


@pytest.mark.parametrize(
    "diff, p, n, expected",
    [
        (0.01, 0.01, 5, "better"),
        (-0.01, 0.049, 5, "worse"),
        (0.01, 0.05, 5, "no detectable difference"),
        (0.0, 1.0, 3, "no detectable difference"),
        (0.02, float("nan"), 1, "too few seeds"),
    ],
)
def test_verdict_wording(diff, p, n, expected):
    assert verdict(diff, p, n) == expected
