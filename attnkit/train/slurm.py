"""A comparison's runs as submitit jobs (https://github.com/facebookincubator/submitit): one job per run, a Slurm
job array on a cluster; submitit's local executor (processes on this machine) or its debug executor (this
process) to try a configuration first. Every job trains an ordinary run folder, so running the comparison again
reads back the finished runs, reattaches to the Slurm jobs still queued or running, and submits only the runs
that are missing or failed. submitit is an optional dependency (`pip install 'attnkit[slurm]'`), imported here
only when a launcher runs."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..files import write_json
from ..runs.config import TrainConfig
from .jobs import TrainJob

__all__ = ["CLUSTERS", "Interrupted", "RunsFailed", "SlurmOptions", "SubmititLauncher", "parse_time"]

CLUSTERS = ("slurm", "local", "debug")
# sbatch options that have their own SlurmOptions field, or that submitit itself writes
_OWN_SBATCH = {"partition", "account", "time", "gpus-per-node", "ntasks-per-node", "cpus-per-task", "mem", "array",
               "job-name", "output", "error", "signal", "wckey", "nodes", "ntasks", "open-mode"}
# Slurm states of a job that will still run (sacct's State column); the others are final
_QUEUED_OR_RUNNING = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                      "REQUEUE_HOLD", "REQUEUE_FED"}
_MAX_ARRAY = 1000  # Slurm's default MaxArraySize is 1001: larger comparisons are submitted as several arrays


class RunsFailed(RuntimeError):
    """Some runs of a comparison failed; the others finished and are kept in their folders."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while waiting for jobs; the message says what became of them and how to go on."""


def parse_time(value: str | int) -> int:
    """A time limit in Slurm's formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes,
    rounded up."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if isinstance(value, bool) or match is None:
        raise ValueError(f"a time limit is minutes (90) or Slurm's [D-]HH:MM:SS (1-12:00:00), got {value!r}.")
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        seconds += 60 * (minutes + 60 * (hours + 24 * int(days)))
    else:  # MM, MM:SS, HH:MM:SS
        seconds = sum(n * 60 ** e for n, e in zip(numbers, {1: [1], 2: [1, 0], 3: [2, 1, 0]}[len(numbers)]))
    if seconds < 1:
        raise ValueError(f"a time limit must be positive, got {value!r}.")
    return -(-seconds // 60)


def _sbatch_key(key: str) -> str:
    name = key.strip().replace("_", "-")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"--sbatch takes sbatch option names such as qos or constraint, got {key!r}.")
    if name in _OWN_SBATCH:
        own = {"time": "--time", "partition": "--partition", "account": "--account", "mem": "--mem-gb",
               "gpus-per-node": "--gpus-per-run", "cpus-per-task": "--cpus-per-run"}.get(name)
        hint = f"use {own} instead" if own else "attnkit sets it itself"
        raise ValueError(f"--sbatch {name}: {hint}.")
    return name


@dataclass
class SlurmOptions:
    """Where and with what each run's job runs. A run with several GPUs is one job of one process per GPU on one
    node (DistributedDataParallel, as under torchrun); `cpus_per_run` and `mem_gb` are the run's, all processes
    together."""

    cluster: str = "slurm"  # slurm, or local (processes on this machine) or debug (in this process) to try it
    partition: str | None = None
    account: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int | None = None
    mem_gb: float | None = None
    time: int | str = 24 * 60  # minutes or Slurm's [D-]HH:MM:SS; a run that needs longer is requeued and resumes
    array_parallelism: int | None = None  # runs at once; None: up to 256 on Slurm (submitit's), locally up to 4
    sbatch: dict[str, Any] = field(default_factory=dict)  # further sbatch options, e.g. {"qos": "high"}
    setup: tuple[str, ...] = ()  # shell lines the job script runs first, e.g. "module load cuda"
    poll_seconds: float | None = None  # how often to look at the jobs; None: 0.2 s here, 15 s on a cluster

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"--cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}.")
        for name, low in (("gpus_per_run", 0), ("cpus_per_run", 1), ("array_parallelism", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer ≥ {low}, got {value!r}.")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ValueError(f"--mem-gb must be positive, got {self.mem_gb!r}.")
        self.time = parse_time(self.time)
        self.sbatch = {_sbatch_key(k): v for k, v in self.sbatch.items()}
        self.setup = tuple(self.setup)

    @property
    def processes_per_run(self) -> int:
        return max(1, self.gpus_per_run)

    @property
    def parallelism(self) -> int | None:
        """Runs at once: the option, or for local jobs up to 4 on CPUs and 1 on GPUs; None leaves it to submitit."""
        if self.array_parallelism is not None or self.cluster == "slurm":
            return self.array_parallelism
        return 1 if self.cluster == "debug" or self.gpus_per_run else max(1, min(4, os.cpu_count() or 1))

    def threads(self) -> int | None:
        """torch CPU threads of each process of a run, when the run does not set them."""
        if self.cluster == "slurm":
            return max(1, self.cpus_per_run // self.processes_per_run) if self.cpus_per_run else None
        if self.cluster == "local":
            return max(1, (os.cpu_count() or 1) // self.parallelism // self.processes_per_run)
        return None

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """submitit AutoExecutor parameters; those of value None are left to the cluster's defaults."""
        tasks = self.processes_per_run
        return {"name": name, "timeout_min": self.time, "gpus_per_node": self.gpus_per_run, "tasks_per_node": tasks,
                "cpus_per_task": max(1, self.cpus_per_run // tasks) if self.cpus_per_run else None,
                "mem_gb": self.mem_gb, "slurm_partition": self.partition, "slurm_account": self.account,
                "slurm_array_parallelism": self.array_parallelism, "slurm_additional_parameters": dict(self.sbatch),
                "slurm_setup": list(self.setup)}


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher submitit needs the submitit package: pip install 'attnkit[slurm]'.") from None
    return submitit


def _summary(error: BaseException) -> str:
    """What went wrong, in a line: the last line of the job's traceback, or the start of the error's message (for a
    job that died without one, submitit's: which job, and its Slurm state)."""
    text = str(error).strip()
    if "Traceback" in text:  # submitit's FailedJobError holds the job's traceback between two lines of dashes
        return text.split("Traceback", 1)[1].split("\n---")[0].strip().splitlines()[-1]
    return f"{type(error).__name__}: {' '.join(text.splitlines()[:2])}"


@dataclass
class _Run:
    config: TrainConfig
    job: Any = None  # a submitit Job once submitted
    over: bool = False  # its job ended, with a result or not

    @property
    def name(self) -> str:
        return f"{self.config.variant} seed {self.config.seed}"


def ctrl_c_raises() -> None:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt, as Python arranges at start-up, where Python's handler is still
    the one Python believes in: a library may have put its own handler in the process below Python's (polars does once
    its query engine has run; Ultralytics reads its results with it), which leaves signal.getsignal unchanged and
    Ctrl-C without effect. Only the main thread may set handlers; elsewhere nothing changes."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class SubmititLauncher:
    """Trains the runs of a comparison as submitit jobs, reports each result as its job finishes, and raises
    RunsFailed at the end, naming each failed run and its log, when any failed. Use it as compare(launcher=...)."""

    def __init__(self, options: SlurmOptions | None = None) -> None:
        self.options = options or SlurmOptions()

    def __call__(self, configs: Sequence[TrainConfig], out: Path, done: Callable[[dict[str, Any]], None],
                 bar: Any) -> None:
        if not configs:
            return
        options = self.options
        folder = Path(out).absolute() / "jobs"
        index = _JobIndex(folder / "index.json", options.cluster)
        threads = options.threads()
        runs = [_Run(replace(c, threads=threads) if c.threads is None else c) for c in configs]
        executor = self._executor(folder, f"attnkit-{Path(out).absolute().name}")
        queue, active, failures = list(runs), [], []
        ctrl_c_raises()
        try:
            if options.cluster == "slurm":  # all at once, as job arrays; Slurm queues them
                self._reattach(runs, index, folder)
                self._submit_arrays(executor, [r for r in runs if r.job is None], index)
                queue, active = [], list(runs)
            while queue or active:
                while queue and len(active) < options.parallelism:
                    run = queue.pop(0)
                    run.job = executor.submit(TrainJob(run.config))
                    index.record(run)
                    active.append(run)
                finished = [r for r in active if options.cluster == "debug" or r.job.done()]
                for run in finished:
                    active.remove(run)
                    result, error = self._outcome(run)
                    run.over = True
                    if error is None:
                        done(result)
                    else:
                        failures.append(f"{run.name}: {error}\n    log: {run.job.paths.stderr}")
                        if not bar.disable:
                            bar.write(f"failed: {failures[-1]}", file=sys.stderr)
                self._show(bar, active, len(queue), len(failures))
                if active and not finished:
                    time.sleep(options.poll_seconds or (15.0 if options.cluster == "slurm" else 0.2))
        except KeyboardInterrupt:
            raise Interrupted(self._interrupted([r for r in runs if r.job is not None and not r.over])) from None
        if failures:
            raise RunsFailed(f"{len(failures)} of {len(runs)} runs failed; the others finished and are kept in their "
                             "folders. Run the same command again to retry the failed runs alone.\n  "
                             + "\n  ".join(failures))

    def _executor(self, folder: Path, name: str) -> Any:
        submitit = _submitit()
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=self.options.cluster)
        except RuntimeError as error:  # no srun on this machine
            raise ValueError(f"--cluster slurm: {error} To try the comparison on this machine, use --cluster local "
                             "(processes) or --cluster debug (this process).") from None
        executor.update_parameters(**self.options.executor_parameters(name))
        return executor

    def _reattach(self, runs: list[_Run], index: "_JobIndex", folder: Path) -> None:
        """Give each run whose earlier Slurm job is still queued or running that job back (one sacct call)."""
        from submitit import SlurmJob

        for run in runs:
            if (record := index.runs.get(run.config.run_dir)) is not None:
                run.job = SlurmJob(folder, record["job_id"], tasks=list(range(record["tasks"])))
        for run in runs:  # the first state asked for fetches those of all the jobs made above
            if run.job is not None and run.job.state.split()[0].upper() not in _QUEUED_OR_RUNNING:
                run.job = None

    def _submit_arrays(self, executor: Any, queue: list[_Run], index: "_JobIndex") -> None:
        from submitit.core.utils import FailedJobError

        for start in range(0, len(queue), _MAX_ARRAY):
            chunk = queue[start:start + _MAX_ARRAY]
            try:
                with executor.batch():
                    for run in chunk:
                        run.job = executor.submit(TrainJob(run.config))
            except FailedJobError as error:  # sbatch's own message: an unknown partition, account, option
                raise ValueError(f"sbatch refused the job array: {str(error).strip()} (its script is the latest "
                                 f".submission_file_*.sh in {executor.folder}).") from None
            for run in chunk:
                index.record(run)

    def _outcome(self, run: _Run) -> tuple[dict[str, Any] | None, str | None]:
        job = run.job
        if self.options.cluster == "debug":  # runs the job here, in its environment; its traceback goes to its log
            from submitit.helpers import environment_variables

            with environment_variables(SUBMITIT_DEBUG_JOB_ID=job.job_id):
                error = job.exception()
            if error is not None:
                job.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
                job.paths.stderr.write_text("".join(traceback.format_exception(error)))
        elif self.options.cluster == "local" and not all(job.task(k).paths.result_pickle.exists()
                                                         for k in range(job.num_tasks)):
            return None, "the job's process ended without a result (killed?)"
        else:
            error = job.exception()  # on a cluster, waits briefly for a result file still in transit
        if error is not None:
            return None, _summary(error)
        return job.results()[0], None

    def _show(self, bar: Any, active: list[_Run], pending: int, failed: int) -> None:
        running = len(active)
        if self.options.cluster == "slurm":  # the array's jobs are all submitted: some still wait in the queue
            queued = sum(r.job.state.split()[0].upper() not in ("RUNNING", "COMPLETING") for r in active)
            running, pending = running - queued, pending + queued
        bar.set_postfix_str(f"done {bar.n}, running {running}, pending {pending}, failed {failed}", refresh=True)

    def _interrupted(self, submitted: list[_Run]) -> str:
        again = "Run the same command again to resume the runs from their checkpoints; finished runs are not repeated."
        if self.options.cluster == "debug" or not submitted:
            return f"interrupted. {again}"
        if self.options.cluster == "local":
            for run in submitted:
                run.job.cancel(check=False)
            return f"interrupted: stopped {len(submitted)} local jobs. {again}"
        arrays = sorted({r.job.job_id.split("_")[0] for r in submitted})
        return (f"interrupted: {len(submitted)} runs are still queued or running as Slurm jobs, and finish on their "
                "own. Run the same command again to collect them (it reattaches to these jobs and submits only the "
                f"runs that are missing or failed), or cancel them with: scancel {' '.join(arrays)}")


class _JobIndex:
    """jobs/index.json: which job trains which run folder, for reattaching to it from a later command."""

    def __init__(self, path: Path, cluster: str) -> None:
        self.path, self.cluster = path, cluster
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.runs: dict[str, dict[str, Any]] = saved.get("runs", {}) if saved.get("cluster") == cluster else {}

    def record(self, run: _Run) -> None:
        self.runs[run.config.run_dir] = {"job_id": run.job.job_id, "tasks": run.job.num_tasks}
        write_json(self.path, {"cluster": self.cluster, "runs": self.runs})
