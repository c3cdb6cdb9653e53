"""Paired comparisons over seeds: the difference from the plain network per seed, its mean, a t-based 95%
confidence interval and the two-sided p-value of the paired t-test (scipy.stats.ttest_rel), Holm's correction
for comparing several modules against one baseline, and a verdict in plain words."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["PairedComparison", "holm", "paired_comparison", "verdict"]


@dataclass
class PairedComparison:
    n: int  # paired seeds
    mean_diff: float  # variant minus baseline
    std_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_comparison(variant: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Compare per-seed results of a variant with the baseline's for the same seeds.

    With fewer than two pairs there is no interval (NaN). When every difference is the same, the interval
    is that difference and the p-value is 1 if it is zero and 0 otherwise (the t statistic is 0/0 or ±inf).
    """
    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired comparison needs one result per seed on both sides, got {a.shape} and {b.shape}.")
    d = a - b
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return PairedComparison(n, mean, math.nan, math.nan, math.nan, math.nan, confidence)
    std = float(d.std(ddof=1))
    if std == 0.0:
        return PairedComparison(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0, confidence)
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(confidence)
    return PairedComparison(n, mean, std, float(ci.low), float(ci.high), float(test.pvalue), confidence)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaNs stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), np.nan)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (len(valid) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def verdict(mean_diff: float, p_value: float, n: int, alpha: float = 0.05) -> str:
    """'better', 'worse', 'no detectable difference', or 'too few seeds', judged on the (adjusted) p-value."""
    if n < 2 or math.isnan(p_value):
        return "too few seeds"
    if p_value < alpha:
        return "better" if mean_diff > 0 else "worse"
    return "no detectable difference"
