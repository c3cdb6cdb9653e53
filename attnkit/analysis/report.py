"""The comparison's summary: per-variant statistics against the plain network, the terminal table, the markdown
report, CSV/JSON files and the plots (matplotlib, written without a display)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..registry import BASELINE
from .stats import final_rise, holm, min_detectable_effect, paired_comparison, seeds_needed, verdict

__all__ = ["csv_text", "environment_text", "format_guardrails", "format_table", "guardrail_notes", "markdown_report",
           "plot_all", "summarize", "text_table"]

ALPHA = 0.05
#: a variant whose mean test accuracy rose by this much or more over the last fifth of the epochs had not converged
RISE_LIMIT_PP = 1.0
TAIL = 0.2  # the last fifth
SEEDS_LIMIT = 10_000  # seeds_for_1pp beyond this is given as None


def _tail_rise_pp(runs: Sequence[dict[str, Any]]) -> float | None:
    """final_rise of the runs' mean test-accuracy curve, in percentage points; None below two epochs."""
    curves = [[h["test_acc"] for h in r.get("history", ())] for r in runs]
    length = min(map(len, curves))
    return 100 * final_rise(np.mean([c[:length] for c in curves], axis=0), TAIL) if length >= 2 else None


def _gap_pp(runs: Sequence[dict[str, Any]]) -> float | None:
    """Training accuracy in the last epoch minus test accuracy, in percentage points, mean over the runs."""
    gaps = [r["history"][-1]["train_acc"] - r["test_acc"] for r in runs if r.get("history")]
    return 100 * float(np.mean(gaps)) if gaps else None


def summarize(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per variant (the plain network first): accuracy over seeds, and the paired comparison with the
    plain network on the seeds both have, with Holm-adjusted p-values across the variants; and the guardrails:
    whether the variant's mean test accuracy had stopped rising (`converged`: it rose less than RISE_LIMIT_PP over
    the last fifth of the epochs, `final_rise_pp`), the train–test gap, and the smallest difference the comparison
    could have detected (`min_detectable_effect_pp`, at 80% power and Holm's first level α/m for m variants) with the
    seeds a 1-point difference would need (`seeds_for_1pp`), both at the observed spread of the paired differences."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], {})[run["seed"]] = run
    order = sorted(by_variant, key=lambda v: (v != BASELINE, list(by_variant).index(v)))
    baseline = by_variant.get(BASELINE, {})
    rows = []
    for variant in order:
        seeds = sorted(by_variant[variant])
        acc = np.array([by_variant[variant][s]["test_acc"] for s in seeds])
        first = by_variant[variant][seeds[0]]
        row: dict[str, Any] = {
            "variant": variant,
            "seeds": len(seeds),
            "acc_mean": float(acc.mean()),
            "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else math.nan,
            "params": first["params"],
            "macs": first["macs"],
            "train_seconds": float(np.mean([by_variant[variant][s]["train_seconds"] for s in seeds])),
            "epochs": min(len(r.get("history", ())) for r in by_variant[variant].values()),
            "final_rise_pp": _tail_rise_pp(list(by_variant[variant].values())),
            "train_test_gap_pp": _gap_pp(list(by_variant[variant].values())),
        }
        row["converged"] = row["final_rise_pp"] is not None and row["final_rise_pp"] < RISE_LIMIT_PP
        if variant != BASELINE and baseline:
            paired = [s for s in seeds if s in baseline]
            cmp = paired_comparison([by_variant[variant][s]["test_acc"] for s in paired],
                                    [baseline[s]["test_acc"] for s in paired], confidence)
            row.update(diff=cmp.mean_diff, ci_low=cmp.ci_low, ci_high=cmp.ci_high, p_value=cmp.p_value, pairs=cmp.n,
                       std_diff=cmp.std_diff, params_added=first["params"] - next(iter(baseline.values()))["params"])
        rows.append(row)
    compared = [r for r in rows if "p_value" in r]
    level = ALPHA / max(1, len(compared))  # the level Holm's procedure tests the smallest p-value at
    for row, p in zip(compared, holm([r["p_value"] for r in compared])):
        row["p_holm"] = p
        row["verdict"] = verdict(row["diff"], p, row["pairs"], ALPHA)
        effect = 100 * min_detectable_effect(row["std_diff"], row["pairs"], level)
        row["min_detectable_effect_pp"] = None if math.isnan(effect) else effect
        row["seeds_for_1pp"] = seeds_needed(0.01, row["std_diff"], level, limit=SEEDS_LIMIT)
    return rows


def _pct(x: float, signed: bool = False) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    cells = {
        "variant": row["variant"],
        "accuracy % (mean ± std)": f"{_pct(row['acc_mean'])} ± {_pct(row['acc_std'])}",
        "Δ vs plain, pp [95% CI]": "baseline" if "diff" not in row else
        f"{_pct(row['diff'], True)} [{_pct(row['ci_low'], True)}, {_pct(row['ci_high'], True)}]",
        "p (Holm)": "" if "p_value" not in row else
        ("n/a" if math.isnan(row["p_value"]) else f"{row['p_value']:.3f} ({row['p_holm']:.3f})"),
        "verdict": row.get("verdict", ""),
        "params": f"{row['params']:,}",
        "MMACs": f"{row['macs'] / 1e6:.2f}",
        "s/run": f"{row['train_seconds']:.1f}",
    }
    return cells


def _span(low: str, high: str) -> str:
    return low if low == high else f"{low} to {high}"


def _rise(row: dict[str, Any]) -> str:
    return "n/a" if row["final_rise_pp"] is None else f"{row['final_rise_pp']:+.2f}"


def _guardrail_cells(row: dict[str, Any]) -> dict[str, str]:
    baseline = "diff" not in row
    effect, seeds = row.get("min_detectable_effect_pp"), row.get("seeds_for_1pp")
    return {
        "variant": row["variant"],
        "rise, last fifth (pp)": _rise(row),
        "converged": "yes" if row["converged"] else "NO",
        "train − test (pp)": "n/a" if row["train_test_gap_pp"] is None else f"{row['train_test_gap_pp']:+.2f}",
        "detectable Δ (pp)": "" if baseline else "n/a" if effect is None else f"{effect:.2f}",
        "seeds for 1 pp": "" if baseline else "n/a" if seeds is None else str(seeds),
    }


def guardrail_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the guardrails say, in sentences: the variants that had not converged, and what the comparison could not
    have detected."""
    notes = []
    rising = [r for r in rows if not r["converged"]]
    if rising:
        epochs = max(r["epochs"] for r in rows)
        listed = ", ".join(f"{r['variant']} ({_rise(r)} pp)" for r in rising)
        notes.append(f"NOT CONVERGED: {listed}: the mean test accuracy was still rising over the last fifth of the "
                     f"{epochs} epochs (by {RISE_LIMIT_PP:g} point or more). This comparison then measures how fast "
                     f"each network learns, not what the module does once trained: train longer (--epochs) before "
                     f"reading the verdicts.")
    compared = [r for r in rows if r.get("min_detectable_effect_pp") is not None]
    if compared:
        effects = [r["min_detectable_effect_pp"] for r in compared]
        seeds = sorted((r["seeds_for_1pp"] is None, r["seeds_for_1pp"]) for r in compared)
        needed = [f"{n:,}" if n is not None else f"more than {SEEDS_LIMIT:,}" for _, n in (seeds[0], seeds[-1])]
        notes.append(f"With {max(r['pairs'] for r in compared)} seeds and the spread observed, the smallest difference "
                     f"from plain this comparison could detect (80% power, α = {ALPHA:g}/{len(compared)}) was "
                     f"{_span(f'{min(effects):.2f}', f'{max(effects):.2f}')} points: 'no detectable difference' rules "
                     f"out nothing smaller. A 1-point difference would need {_span(*needed)} seeds.")
    return notes


def format_guardrails(rows: Sequence[dict[str, Any]]) -> str:
    """Whether the comparison can be trusted, per variant, as a plain-text table and its notes."""
    return "\n\n".join([text_table([_guardrail_cells(r) for r in rows]), *guardrail_notes(rows)])


def text_table(cells: Sequence[dict[str, str]]) -> str:
    """Rows of already-formatted cells as left-aligned columns, headers first."""
    headers = list(cells[0])
    widths = [max(len(h), *(len(c[h]) for c in cells)) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c[h].ljust(w) for h, w in zip(headers, widths)) for c in cells]
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a plain-text table for the terminal."""
    return text_table([_cells(r) for r in rows])


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    return _markdown([_cells(r) for r in rows])


def _markdown(cells: Sequence[dict[str, str]]) -> str:
    headers = list(cells[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c[h] for h in headers) + " |" for c in cells]
    return "\n".join(lines)


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV, one column per scalar field (lists and dicts left out)."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields and not isinstance(row[k], (list, dict))]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def environment_text(environments: Sequence[dict[str, Any]]) -> str:
    """What the runs' numbers are reproducible on, bit for bit: the machine, PyTorch's CPU kernels, the threads and the
    versions each run recorded (attnkit.train.environment); runs made in different environments are named as such."""
    if not environments:
        return "The runs recorded no environment (they were trained by an earlier attnkit)."
    kinds = sorted({tuple(sorted(e.items())) for e in environments})
    described = ["; ".join(f"{k} {v}" for k, v in kind) for kind in kinds]
    if len(kinds) == 1:
        return (f"Trained with: {described[0]}. A fixed seed gives these numbers bit for bit with the same CPU kernels, "
                "thread count and versions; another CPU type, kernel set or thread count gives other numbers (seeds and "
                "verdicts should agree within the intervals, not to the digit).")
    return (f"The runs were trained in {len(kinds)} different environments, so the comparison as a whole is not "
            f"reproducible bit for bit: " + " | ".join(described) + ".")


def markdown_report(rows: Sequence[dict[str, Any]], setup: dict[str, Any], command: str,
                    environments: Sequence[dict[str, Any]] = ()) -> str:
    """The comparison as a Markdown page: command, setup, table, how to read it, whether it can be trusted (the
    guardrails) and what it is reproducible on."""
    seeds = max(r["seeds"] for r in rows)
    lines = [
        "# attnkit compare",
        "",
        f"Command: `{command}`",
        "",
        "Setup: " + ", ".join(f"{k} = {v}" for k, v in setup.items()),
        "",
        markdown_table(rows),
        "",
        f"Accuracy is the test accuracy after the last epoch, over {seeds} seeds. Δ is the mean over seeds of "
        "(variant − plain) in percentage points, on the same seeds: for a seed, every variant saw the same data "
        "order and started from the same backbone weights. The 95% interval and the p-value come from the "
        "paired t-test; the verdict uses the p-value after Holm's correction for the number of variants "
        "compared (α = 0.05). 'No detectable difference' is not evidence of equality: with few seeds, only "
        "large differences can be detected.",
        "",
        "## Can the comparison be trusted?",
        "",
        _markdown([_guardrail_cells(r) for r in rows]),
        "",
        *[line for note in guardrail_notes(rows) for line in (note, "")],
        f"Rise, last fifth: how much the mean test accuracy over seeds rose over the last fifth of the epochs (the "
        f"least-squares slope through those epochs, times their number); {RISE_LIMIT_PP:g} point or more counts as "
        "not converged. Train − test: the training accuracy in the last epoch minus the test accuracy, mean over seeds. "
        "Detectable Δ: the smallest true difference from plain that this many seeds detect with 80% power at the spread "
        "of the paired differences observed, at Holm's strictest level; seeds for 1 pp: how many seeds a 1-point "
        "difference would need at that spread.",
        "",
        "## Reproducibility",
        "",
        environment_text(environments),
        "",
        "![accuracy](accuracy.png)",
        "",
        "![learning curves](curves.png)",
        "",
        "![accuracy against parameters](acc_vs_params.png)",
        "",
    ]
    return "\n".join(lines)


def plot_all(out_dir: Path, rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> list[Path]:
    """accuracy.png (mean ± std with each seed as a dot), curves.png (test accuracy per epoch, mean over seeds),
    acc_vs_params.png."""
    from .plotting import colormap, figure, save_png  # matplotlib only where a report draws

    variants = [r["variant"] for r in rows]
    colors = {v: colormap("tab10")(i % 10) for i, v in enumerate(variants)}
    paths = []

    fig = figure(1.2 * len(rows) + 2, 4, dpi=110, layout="tight")
    ax = fig.subplots()
    for i, row in enumerate(rows):
        ax.bar(i, 100 * row["acc_mean"], yerr=0 if math.isnan(row["acc_std"]) else 100 * row["acc_std"],
               color=colors[row["variant"]], alpha=0.6, capsize=4)
        accs = [100 * r["test_acc"] for r in runs if r["variant"] == row["variant"]]
        ax.scatter(np.full(len(accs), i), accs, color="black", s=12, zorder=3)
    low = min(100 * r["test_acc"] for r in runs)
    ax.set_ylim(max(0, low - 3), min(100, max(100 * r["test_acc"] for r in runs) + 1.5))
    ax.set_xticks(range(len(rows)), variants, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy over seeds (bar: mean ± std; dots: seeds)")
    paths.append(save_png(fig, out_dir / "accuracy.png"))

    fig = figure(6, 4, dpi=110, layout="tight")
    ax = fig.subplots()
    for variant in variants:
        curves = [[h["test_acc"] for h in r["history"]] for r in runs if r["variant"] == variant]
        length = min(len(c) for c in curves)
        mean = 100 * np.mean([c[:length] for c in curves], axis=0)
        ax.plot(range(1, length + 1), mean, label=variant, color=colors[variant])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.legend()
    paths.append(save_png(fig, out_dir / "curves.png"))

    fig = figure(6, 4, dpi=110, layout="tight")
    ax = fig.subplots()
    for row in rows:
        ax.errorbar(row["params"], 100 * row["acc_mean"], yerr=0 if math.isnan(row["acc_std"]) else 100 * row["acc_std"],
                    fmt="o", color=colors[row["variant"]], capsize=3, label=row["variant"])
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    paths.append(save_png(fig, out_dir / "acc_vs_params.png"))
    return paths
