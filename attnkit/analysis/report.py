"""The comparison's summary: per-variant statistics against the plain network, the terminal table, the markdown
report, CSV/JSON files and the plots (matplotlib, written without a display)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..files import write_file
from .stats import holm, paired_comparison, verdict

__all__ = ["format_table", "plot_all", "summarize", "text_table", "csv_text", "markdown_report"]

BASELINE = "plain"


def summarize(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per variant (the plain network first): accuracy over seeds, and the paired comparison with the
    plain network on the seeds both have, with Holm-adjusted p-values across the variants."""
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
        }
        if variant != BASELINE and baseline:
            paired = [s for s in seeds if s in baseline]
            cmp = paired_comparison([by_variant[variant][s]["test_acc"] for s in paired],
                                    [baseline[s]["test_acc"] for s in paired], confidence)
            row.update(diff=cmp.mean_diff, ci_low=cmp.ci_low, ci_high=cmp.ci_high, p_value=cmp.p_value, pairs=cmp.n,
                       params_added=first["params"] - next(iter(baseline.values()))["params"])
        rows.append(row)
    compared = [r for r in rows if "p_value" in r]
    for row, p in zip(compared, holm([r["p_value"] for r in compared])):
        row["p_holm"] = p
        row["verdict"] = verdict(row["diff"], p, row["pairs"])
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
    cells = [_cells(r) for r in rows]
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


def markdown_report(rows: Sequence[dict[str, Any]], setup: dict[str, Any], command: str) -> str:
    """The comparison as a Markdown page: command, setup, table, and how to read it."""
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [r["variant"] for r in rows]
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    paths = []

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
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
    paths.append(_save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in variants:
        curves = [[h["test_acc"] for h in r["history"]] for r in runs if r["variant"] == variant]
        length = min(len(c) for c in curves)
        mean = 100 * np.mean([c[:length] for c in curves], axis=0)
        ax.plot(range(1, length + 1), mean, label=variant, color=colors[variant])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.legend()
    paths.append(_save(fig, out_dir / "curves.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.errorbar(row["params"], 100 * row["acc_mean"], yerr=0 if math.isnan(row["acc_std"]) else 100 * row["acc_std"],
                    fmt="o", color=colors[row["variant"]], capsize=3, label=row["variant"])
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    paths.append(_save(fig, out_dir / "acc_vs_params.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
