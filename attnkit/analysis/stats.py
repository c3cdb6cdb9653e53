"""Paired comparisons over seeds: the difference from the plain network per seed, its mean, a t-based 95%
confidence interval and the two-sided p-value of the paired t-test (scipy.stats.ttest_rel), Holm's correction
for comparing several modules against one baseline, and a verdict in plain words; and what says whether such a
comparison can be trusted: the smallest difference it could have detected, the seeds a difference needs, and
whether the learning curves had stopped rising."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["PairedComparison", "final_rise", "holm", "min_detectable_effect", "paired_comparison", "seeds_needed",
           "verdict"]


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


def min_detectable_effect(std_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test on `n` pairs, at level `alpha`, detects with
    probability `power` when the paired differences have standard deviation `std_diff`:

        (t_{1−α/2, n−1} + t_{power, n−1}) · std_diff / √n

    (the usual normal-shift approximation to the noncentral t). NaN with fewer than two pairs."""
    if n < 2 or math.isnan(std_diff):
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * std_diff / math.sqrt(n))


def seeds_needed(effect: float, std_diff: float, alpha: float = 0.05, power: float = 0.8, limit: int = 10_000) -> int | None:
    """The fewest paired seeds at which min_detectable_effect(std_diff, n) is at most `effect`, taking the observed
    `std_diff` as the true one; None when the standard deviation is unknown (NaN) or more than `limit` would be needed."""
    if math.isnan(std_diff) or effect <= 0:
        return None
    detects = lambda n: min_detectable_effect(std_diff, n, alpha, power) <= effect  # noqa: E731 (falls as n grows)
    if not detects(limit):
        return None
    low, high = 1, limit  # detects(high) holds, detects(low) does not (one pair detects nothing)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if detects(middle) else (middle, high)
    return high


def final_rise(curve: Sequence[float], fraction: float = 0.2) -> float:
    """How much `curve` (a value per epoch) rose over its last `fraction` of the epochs: the least-squares slope
    through the value at the start of that part (the end of the epoch before it) and every value after it, times the
    epochs the part spans, ceil(fraction · epochs). NaN for a curve of fewer than two epochs."""
    values = np.asarray(curve, dtype=float)
    if len(values) < 2:
        return math.nan
    span = min(len(values) - 1, math.ceil(fraction * len(values)))
    tail = values[-(span + 1):]
    return float(np.polyfit(np.arange(span + 1), tail, 1)[0] * span)
