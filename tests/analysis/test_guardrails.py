"""The comparison's guardrails on constructed runs: a curve still rising is flagged and a flat one is not, the smallest
detectable difference and the seeds a difference needs against hand-computed values, the train–test gap, and what the
report and results say about them."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnkit.analysis.report import format_guardrails, markdown_report, summarize
from attnkit.analysis.stats import final_rise, min_detectable_effect, seeds_needed


def run(variant: str, seed: int, curve: list[float], train_acc: float | None = None) -> dict:
    """A finished run as compare() keeps it: the test accuracy per epoch, the last epoch's training accuracy."""
    history = [{"epoch": i + 1, "test_acc": acc, "train_acc": acc if train_acc is None else train_acc}
               for i, acc in enumerate(curve)]
    return {"variant": variant, "seed": seed, "test_acc": curve[-1], "params": 100, "macs": 1000, "train_seconds": 1.0,
            "history": history}


FLAT = [0.30, 0.55, 0.70, 0.78, 0.80, 0.805, 0.81, 0.806, 0.809, 0.81]  # last fifth: 0.81, 0.806, 0.809, 0.81
RISING = [0.10, 0.20, 0.30, 0.40, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75]  # five points an epoch to the end


def test_final_rise_of_a_straight_line_is_its_slope_times_the_span():
    assert final_rise(np.arange(10) * 0.05) == pytest.approx(0.10)  # last fifth of 10 epochs: 2 epochs of 0.05
    assert final_rise([0.3] * 20) == pytest.approx(0.0, abs=1e-12)
    assert final_rise(RISING) == pytest.approx(0.10)
    assert abs(final_rise(FLAT)) < 0.01
    assert final_rise(np.arange(7) * 0.01) == pytest.approx(0.02)  # ceil(0.2 · 7) = 2 epochs
    assert math.isnan(final_rise([0.5]))


def test_a_rising_variant_is_flagged_and_a_flat_one_is_not():
    runs = [run("plain", s, [a + 0.002 * s for a in FLAT]) for s in range(3)]
    runs += [run("cbam", s, [a + 0.001 * s for a in RISING]) for s in range(3)]
    rows = {r["variant"]: r for r in summarize(runs)}
    assert rows["plain"]["converged"] is True and abs(rows["plain"]["final_rise_pp"]) < 1
    assert rows["cbam"]["converged"] is False and rows["cbam"]["final_rise_pp"] == pytest.approx(10.0)
    text = format_guardrails(list(rows.values()))
    assert "NOT CONVERGED: cbam (+10.00 pp)" in text and "measures how fast each network learns" in text
    assert "plain (" not in text.split("NOT CONVERGED")[1].split(".")[0]


def test_no_warning_when_every_variant_is_flat():
    runs = [run(v, s, [a + 0.003 * s * (v == "se") for a in FLAT]) for v in ("plain", "se") for s in range(3)]
    rows = summarize(runs)
    assert all(r["converged"] for r in rows)
    assert "NOT CONVERGED" not in format_guardrails(rows)


def test_detectable_effect_and_seeds_needed_against_hand_computed_values():
    # t(0.975, 2) = 4.302653, t(0.8, 2) = 1.060660: (4.302653 + 1.060660) · 0.01 / √3 = 0.030965
    assert min_detectable_effect(0.01, 3) == pytest.approx(0.030965, rel=1e-5)
    # sd 1 point, α = 0.05, 80% power: n = 9 gives (2.306 + 0.889) / 3 = 1.065 > 1, n = 10 gives (2.262 + 0.883) / 3.162
    # = 0.995 ≤ 1
    assert seeds_needed(0.01, 0.01) == 10
    assert seeds_needed(0.01, 0.0) == 2 and seeds_needed(0.01, math.nan) is None
    assert seeds_needed(0.001, 1.0, limit=100) is None
    assert math.isnan(min_detectable_effect(0.01, 1))


def test_summary_carries_the_detectable_effect_at_holms_first_level():
    plain = [0.80, 0.82, 0.81]
    diffs = {"se": [-0.02, -0.04, -0.03], "eca": [0.01, 0.02, 0.03]}  # sd of the differences: 0.01 each
    runs = [run("plain", s, [0.5, a, a, a, a, a]) for s, a in enumerate(plain)]
    runs += [run(v, s, [0.5] + [a + d[s]] * 5) for v, d in diffs.items() for s, a in enumerate(plain)]
    rows = {r["variant"]: r for r in summarize(runs)}
    # two variants: Holm tests the smallest p-value at 0.05 / 2; t(0.9875, 2) = 6.205347, t(0.8, 2) = 1.060660:
    # (6.205347 + 1.060660) · 1 point / √3 = 4.195 points
    for variant in diffs:
        assert rows[variant]["min_detectable_effect_pp"] == pytest.approx(4.1950, rel=1e-4)
        assert rows[variant]["seeds_for_1pp"] == seeds_needed(0.01, 0.01, alpha=0.025)
    assert rows["plain"].get("min_detectable_effect_pp") is None


def test_train_test_gap_is_the_last_epochs_training_minus_test_accuracy():
    runs = [run("plain", s, FLAT, train_acc=0.95) for s in range(2)]
    runs += [run("se", s, FLAT, train_acc=0.85 + 0.01 * s) for s in range(2)]
    rows = {r["variant"]: r for r in summarize(runs)}
    assert rows["plain"]["train_test_gap_pp"] == pytest.approx(14.0)
    assert rows["se"]["train_test_gap_pp"] == pytest.approx(4.5)


def test_the_report_says_whether_to_trust_the_comparison_and_where_it_reproduces():
    runs = [run("plain", s, FLAT) for s in range(3)] + [run("se", s, RISING) for s in range(3)]
    environment = {"cpu": "Some CPU", "cpu_kernels": "AVX2", "threads": 1, "torch": "2.14.1"}
    report = markdown_report(summarize(runs), {"epochs": 10}, "attnkit compare", [environment])
    assert "## Can the comparison be trusted?" in report and "NOT CONVERGED: se" in report
    assert "| se | +10.00 | NO |" in report
    assert "cpu_kernels AVX2" in report and "bit for bit" in report
    mixed = markdown_report(summarize(runs), {}, "attnkit compare", [environment, {**environment, "threads": 2}])
    assert "2 different environments" in mixed and "not reproducible bit for bit" in mixed
