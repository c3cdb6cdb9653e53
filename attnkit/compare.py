"""compare(): the plain network and each attention variant, trained over paired seeds, summarised with paired
statistics. Every run is an ordinary train() run in its own folder, so an interrupted comparison resumes:
finished runs are read back, a run cut off mid-way continues from its last checkpoint."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from .analysis.report import csv_text, format_guardrails, format_table, markdown_report, plot_all, summarize
from .files import write_bytes, write_json
from .runs import TrainConfig
from .train.runlock import RunFolderLock
from .train.study import study_toml
from .train.trainer import read_result, train
from .train.workers import exit_with_parent

__all__ = ["CompareResult", "DEFAULT_MODULES", "DEFAULT_STUDY", "compare", "run_configs"]

DEFAULT_MODULES = ("se", "cbam", "eca", "srm", "coord")
#: `attnkit compare` without options: training options over TrainConfig's, chosen so that every variant's test accuracy
#: has stopped rising by the last epoch and the comparison runs in about 15-20 minutes on 2 cores (docs/cluttered-digits.md)
DEFAULT_STUDY = {"dataset": "cluttered-digits", "epochs": 25}


@dataclass
class CompareResult:
    out_dir: Path
    rows: list[dict[str, Any]]  # one per variant, the plain network first
    runs: list[dict[str, Any]]  # one per (variant, seed)
    trained: int  # runs trained now (the others were found finished)

    def table(self) -> str:
        return format_table(self.rows)

    def guardrails(self) -> str:
        """Whether the comparison can be trusted: convergence, train–test gap, the smallest detectable difference."""
        return format_guardrails(self.rows)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=@" else "_" for c in text)


def run_configs(base: TrainConfig, modules: Sequence[str], seeds: Sequence[int], placements: Sequence[str],
                out_dir: Path) -> list[TrainConfig]:
    """The runs of a comparison: the plain network, then each module at each placement, for every seed."""
    if not seeds:
        raise ValueError("compare needs at least one seed (three or more to say anything with confidence).")
    variants: list[tuple[str | None, str]] = [(None, "auto")]
    variants += [(m, p) for m in modules for p in placements]
    configs = []
    for seed in seeds:
        for attn, where in variants:
            config = replace(base, attn=attn, where=where, seed=seed, resume=True, progress=False, run_dir=None)
            configs.append(replace(config, run_dir=str(out_dir / _slug(config.variant) / f"seed{seed}")))
    names = [c.variant for c in configs[: len(variants)]]
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise ValueError(f"compare: {', '.join(repeated)} listed more than once.")
    return configs


def _finished(config: TrainConfig) -> dict[str, Any] | None:
    path = Path(config.run_dir) / "result.json"
    if not path.exists():
        return None
    result = read_result(path)
    differences = config.differences(TrainConfig.from_dict(result["config"]))
    if differences:
        listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (new, old) in differences.items())
        raise ValueError(f"{path.parent} holds a finished run with other options ({listed}). Use another --out.")
    return {**result, "run_dir": config.run_dir}  # where it is now, should the folder have been moved


def _train_one(config: TrainConfig) -> dict[str, Any]:
    return train(config).to_dict()


def compare(base: TrainConfig, modules: Sequence[str] = DEFAULT_MODULES, seeds: Sequence[int] = (0, 1, 2),
            placements: Sequence[str] = ("auto",), out_dir: str | os.PathLike | None = None, jobs: int = 1,
            progress: bool = True, command: str = "", launcher: Callable[..., None] | None = None,
            study: dict[str, Any] | None = None) -> CompareResult:
    """Train the plain `base.model` and each module × placement for every seed; write results.csv, runs.csv,
    results.json, report.md and plots into `out_dir`; return the summary.

    `jobs` > 1 trains that many runs at once in separate processes: on small CPU models this uses the cores better
    than threads inside one run. Each run has `base.threads` threads (one when that is None) whatever `jobs` is, since
    the thread count changes float results: the numbers do not depend on `jobs`. A `launcher` trains the runs
    instead, e.g. attnkit.train.slurm.SubmititLauncher (a Slurm job per run); it is called with the runs to
    train, the comparison's folder, a function to call with each run's result, and the progress bar.
    `study`, the comparison's options as `attnkit compare --config` reads them, is written to study.toml.
    """
    out = Path(out_dir or f"runs/compare-{_slug(base.model)}-{_slug(base.dataset)}")
    with RunFolderLock(out, owner="attnkit compare", option="--out"):  # one comparison writes a folder's summary
        return _compare_in(out, base, modules, seeds, placements, jobs, progress, command, launcher, study)


def _compare_in(out: Path, base: TrainConfig, modules: Sequence[str], seeds: Sequence[int], placements: Sequence[str],
                jobs: int, progress: bool, command: str, launcher: Callable[..., None] | None,
                study: dict[str, Any] | None) -> CompareResult:
    if launcher is None:  # one thread per run unless told: the thread count changes float results, --jobs must not
        base = replace(base, threads=base.threads or 1)
    configs = run_configs(base, modules, seeds, placements, out)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for config in configs:
        finished = _finished(config)
        if finished is None:
            todo.append(config)
        else:
            results[config.run_dir] = finished
    bar = tqdm(total=len(configs), initial=len(results), disable=not progress, desc="compare", unit="run",
               dynamic_ncols=True, file=sys.stderr)

    def done(result: dict[str, Any]) -> None:
        results[result["run_dir"]] = result
        bar.set_postfix_str(f"{result['variant']} seed {result['seed']}: {100 * result['test_acc']:.2f}%")
        bar.update()

    try:
        if launcher is not None:
            launcher(todo, out, done, bar)
        elif jobs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=get_context("spawn"), initializer=exit_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                for future in as_completed([pool.submit(_train_one, c) for c in todo]):
                    done(future.result())
        else:
            for config in todo:
                bar.set_description(f"compare: {config.variant} seed {config.seed}")
                done(_train_one(config))
    finally:
        bar.close()

    runs = [results[c.run_dir] for c in configs]
    rows = summarize(runs)
    setup = {"model": base.model, "dataset": base.dataset, "epochs": base.epochs, "batch size": base.batch_size,
             "optimizer": base.optimizer, "lr": base.lr, "schedule": base.schedule, "init": base.init,
             "threads per run": base.threads or "the launcher's", "seeds": ", ".join(map(str, seeds))}
    write_bytes(out / "results.csv", csv_text(rows).encode())
    write_bytes(out / "runs.csv", csv_text(runs).encode())
    environments = [dict(e) for e in sorted({tuple(sorted(r["environment"].items())) for r in runs if r.get("environment")})]
    write_json(out / "results.json", {"command": command, "setup": setup, "base_config": base.to_dict(),
                                             **({"study": study} if study is not None else {}),
                                             "environments": environments, "summary": rows, "runs": runs})
    report = markdown_report(rows, setup, command, environments)
    if study is not None:
        write_bytes(out / "study.toml", study_toml(study).encode())
        report += (f"\nThe comparison's options, resolved (`attnkit compare --config {out / 'study.toml'}` runs it "
                   f"again):\n\n```toml\n{study_toml(study)}```\n")
    write_bytes(out / "report.md", report.encode())
    plot_all(out, rows, runs)
    return CompareResult(out, rows, runs, len(todo))
