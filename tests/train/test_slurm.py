"""compare() through submitit: runs as jobs of submitit's local executor (real processes) give the local launcher's
numbers; a killed job is reported with its log and a re-run resumes it from its checkpoint; a preempted job is
requeued and resumes; a failing job does not stop the others. On Slurm (faked: sbatch, srun and sacct are small
scripts), the generated sbatch script, Ctrl-C, and a re-run that reattaches to queued jobs and resubmits only the
others."""
from __future__ import annotations

import _thread
import ctypes
import json
import os
import signal
import stat
import threading
import time

import pytest
import torch

pytest.importorskip("submitit")

from submitit import SlurmJob  # noqa: E402

from attnkit import cli  # noqa: E402
from attnkit.train import compare, load_checkpoint, train  # noqa: E402
from attnkit.train.slurm import Interrupted, RunsFailed, SlurmOptions, SubmititLauncher, parse_time  # noqa: E402


def local(**options):
    return SubmititLauncher(SlurmOptions(cluster="local", gpus_per_run=0, **options))


def in_background(function, *args, **kwargs):
    """Run function in a thread; the returned dict gets its "result" or its "error"."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def training_pid_after_first_epoch(run_dir, thread, timeout=300.0):
    """The pid of the process training run_dir, once it has checkpointed its first epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "last.pt").exists():
            return int((run_dir / ".lock").read_text())
        assert thread.is_alive(), "the comparison ended before its run checkpointed an epoch"
        time.sleep(0.02)
    raise AssertionError(f"{run_dir} never checkpointed an epoch")


def test_local_jobs_give_the_local_launchers_numbers(tiny, tmp_path):
    """The same seeds give the same numbers (same threads: the thread count changes CPU results)."""
    by_jobs = compare(tiny(epochs=1), modules=["se"], seeds=[0], out_dir=tmp_path / "jobs", progress=False,
                      launcher=local(array_parallelism=2))
    here = compare(tiny(epochs=1), modules=["se"], seeds=[0], out_dir=tmp_path / "here", progress=False)
    assert by_jobs.trained == 2 and [r["variant"] for r in by_jobs.runs] == ["plain", "se"]
    assert [r["test_acc"] for r in by_jobs.runs] == [r["test_acc"] for r in here.runs]
    assert [[e["train_loss"] for e in r["history"]] for r in by_jobs.runs] == \
        [[e["train_loss"] for e in r["history"]] for r in here.runs]
    assert by_jobs.rows[1]["diff"] == here.rows[1]["diff"]
    index = json.loads((tmp_path / "jobs" / "jobs" / "index.json").read_text())
    assert index["cluster"] == "local"
    assert sorted(index["runs"]) == [str(tmp_path / "jobs" / v / "seed0") for v in ("plain", "se")]
    again = compare(tiny(epochs=1), modules=["se"], seeds=[0], out_dir=tmp_path / "jobs", progress=False,
                    launcher=local(array_parallelism=2))
    assert again.trained == 0 and json.dumps(again.rows) == json.dumps(by_jobs.rows)  # NaN statistics of one seed


def test_a_killed_job_is_reported_with_its_log_and_the_rerun_resumes_it(tiny, tmp_path):
    out, config = tmp_path / "cmp", tiny(epochs=4)
    thread, outcome = in_background(compare, config, modules=[], seeds=[0], out_dir=out, progress=False,
                                    launcher=local())
    run_dir = out / "plain" / "seed0"
    os.kill(training_pid_after_first_epoch(run_dir, thread), signal.SIGKILL)
    thread.join()
    error = outcome.get("error")
    assert isinstance(error, RunsFailed), outcome
    assert "1 of 1 runs failed" in str(error) and "plain seed 0: the job's process ended without a result" in str(error)
    log = str(error).split("log: ")[1].split()[0]
    assert os.path.isfile(log) and log.startswith(str(out / "jobs"))
    killed = load_checkpoint(run_dir / "last.pt")
    assert 1 <= killed["epoch"] < 4 and not (run_dir / "result.json").exists()

    resumed = compare(config, modules=[], seeds=[0], out_dir=out, progress=False, launcher=local())
    assert resumed.trained == 1
    history = resumed.runs[0]["history"]
    # the epochs before the kill were read back, not trained again: their measured durations are the killed job's
    assert [e["epoch_seconds"] for e in history[: killed["epoch"]]] == [e["epoch_seconds"] for e in killed["history"]]
    whole = train(tiny(epochs=4, run_dir=str(tmp_path / "whole")))
    assert [e["test_acc"] for e in history] == [e["test_acc"] for e in whole.history]
    final = load_checkpoint(run_dir / "last.pt")["model"]
    assert all(torch.equal(final[k], v) for k, v in load_checkpoint(tmp_path / "whole" / "last.pt")["model"].items())


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tiny, tmp_path):
    """Slurm signals a job (USR2) before preempting it or at its time limit; submitit's checkpoint hook requeues it."""
    out, config = tmp_path / "cmp", tiny(epochs=4)
    thread, outcome = in_background(compare, config, modules=[], seeds=[0], out_dir=out, progress=False,
                                    launcher=local())
    run_dir = out / "plain" / "seed0"
    os.kill(training_pid_after_first_epoch(run_dir, thread), signal.SIGUSR2)
    first = load_checkpoint(run_dir / "last.pt")["history"][0]
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.trained == 1 and result.runs[0]["history"][0] == first
    log = "".join(p.read_text() for p in sorted((out / "jobs").glob("*_0_log.*")))
    assert "this job is preempted" in log and "Requeued job" in log and log.count("Loading pickle") == 2
    whole = train(tiny(epochs=4, run_dir=str(tmp_path / "whole")))
    assert [e["test_acc"] for e in result.runs[0]["history"]] == [e["test_acc"] for e in whole.history]


@pytest.mark.slow
def test_a_job_that_raises_is_reported_with_its_log_and_the_others_complete(tiny, tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(RunsFailed) as failed:
        compare(tiny(epochs=1), modules=["se(reduction=0)"], seeds=[0], out_dir=out, progress=False,
                launcher=local(array_parallelism=2))
    message = str(failed.value)
    assert "1 of 2 runs failed" in message
    assert "se(reduction=0) seed 0: ValueError: SqueezeExcite: `reduction` is the divisor r of C/r" in message
    log = message.split("log: ")[1].split()[0]
    assert "Traceback" in open(log).read()
    assert (out / "plain" / "seed0" / "result.json").is_file()
    assert not (out / "results.csv").exists()  # no summary of half a comparison


def test_the_command_reports_a_failed_run_with_its_traceback_and_the_others_complete(tmp_path, capsys):
    """In this process (--cluster debug): the quick way to try a configuration."""
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--model", "lenet", "--dataset", "digits", "--image-size", "28", "--epochs", "1",
                     "--attn", "se,se(reduction=0)", "--seeds", "1", "--threads", "1", "--no-tensorboard",
                     "--no-progress", "--out", str(out), "--launcher", "submitit", "--cluster", "debug"])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith("attnkit compare: 1 of 3 runs failed; the others finished")
    assert "se(reduction=0) seed 0: ValueError: SqueezeExcite: `reduction` is the divisor" in error
    log = error.split("log: ")[1].split()[0]
    assert "Traceback" in open(log).read() and "reduction" in open(log).read()
    assert all((out / v / "seed0" / "result.json").is_file() for v in ("plain", "se"))


@pytest.mark.slow
def test_a_run_with_two_gpus_is_one_job_of_two_processes(tiny, tmp_path):
    """One process per GPU, a DDP world as under torchrun; on a machine without GPUs they are CPU processes (gloo)."""
    config = tiny(epochs=2, batch_size=32, device="cpu")
    result = compare(config, modules=[], seeds=[0], out_dir=tmp_path / "cmp", progress=False,
                     launcher=SubmititLauncher(SlurmOptions(cluster="local", gpus_per_run=2)))
    assert sorted(p.name.split("_", 1)[1] for p in (tmp_path / "cmp" / "jobs").glob("*_result.pkl")) == \
        ["0_result.pkl", "1_result.pkl"]
    one = train(tiny(epochs=2, batch_size=32, device="cpu", run_dir=str(tmp_path / "one")))
    losses = [[round(e["train_loss"], 4) for e in history] for history in (result.runs[0]["history"], one.history)]
    assert losses[0] == losses[1]


# --- Slurm, faked --------------------------------------------------------------------------------------------------

FAKE_SBATCH = """#!/bin/sh
if [ -f {d}/sbatch_error ]; then cat {d}/sbatch_error >&2; exit 1; fi
n=$(cat {d}/sbatch_calls 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {d}/sbatch_calls
echo "Submitted batch job $((4241 + n))"
"""
FAKE_SACCT = """#!/bin/sh
n=$(cat {d}/sacct_calls 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {d}/sacct_calls
cat {d}/sacct_out 2>/dev/null || echo "JobID|State|NodeList"
if [ -f {d}/interrupt_at ] && [ "$n" -ge "$(cat {d}/interrupt_at)" ]; then kill -INT $PPID; fi
"""


class FakeSlurm:
    """sbatch numbers the jobs from 4242 and runs nothing; sacct prints the states it is given and, at its n-th
    call, presses Ctrl-C (SIGINT to the command that called it)."""

    def __init__(self, folder):
        self.folder = folder
        folder.mkdir()
        for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\n")):
            path = folder / name
            path.write_text(text.format(d=folder))
            path.chmod(path.stat().st_mode | stat.S_IEXEC)

    def calls(self, command):
        path = self.folder / f"{command}_calls"
        return int(path.read_text()) if path.exists() else 0

    def states(self, states):
        lines = [f"{job}|{state}|node1\n" for job, state in states.items()]
        (self.folder / "sacct_out").write_text("JobID|State|NodeList\n" + "".join(lines))

    def interrupt_at_sacct_call(self, n):
        (self.folder / "interrupt_at").write_text(str(n))

    def refuse(self, message):
        (self.folder / "sbatch_error").write_text(message)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    slurm = FakeSlurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{slurm.folder}{os.pathsep}{os.environ['PATH']}")
    SlurmJob.watcher.clear()  # submitit caches job states across executors
    # Ctrl-C as in a fresh Python process: code run earlier in this test process may have left SIGINT ignored (a
    # fresh clone's `make test` hung here once, its worker's Python handler SIG_IGN) or taken it below Python
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield slurm
    signal.signal(signal.SIGINT, previous)
    SlurmJob.watcher.clear()


def test_the_sbatch_script_ctrl_c_and_a_rerun_that_reattaches(tiny, tmp_path, fake_slurm):
    options = SlurmOptions(partition="gpu", account="lab", gpus_per_run=2, cpus_per_run=16, mem_gb=64, time="2:00:00",
                           array_parallelism=3, sbatch={"qos": "high"}, setup=("module load cuda",), poll_seconds=0.01)
    out = tmp_path / "cmp"
    fake_slurm.interrupt_at_sacct_call(1)
    with pytest.raises(Interrupted, match=r"6 runs are still queued or running as Slurm jobs.*scancel 4242$"):
        compare(tiny(epochs=1), modules=["se", "eca"], seeds=[0, 1], out_dir=out, progress=False,
                launcher=SubmititLauncher(options))
    assert fake_slurm.calls("sbatch") == 1
    script = (out / "jobs" / "4242_submission.sh").read_text().splitlines()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --time=120", "#SBATCH --array=0-5%3", "#SBATCH --qos=high", "#SBATCH --job-name=attnkit-cmp",
                 "module load cuda"):
        assert line in script, f"{line!r} not in the sbatch script:\n" + "\n".join(script)
    assert script[-1].startswith("srun ") and "submitit.core._submit" in script[-1]
    index = json.loads((out / "jobs" / "index.json").read_text())["runs"]
    runs = [str(out / v / f"seed{s}") for s in (0, 1) for v in ("plain", "se", "eca")]
    assert [index[r]["job_id"] for r in runs] == [f"4242_{k}" for k in range(6)]

    # again: the queued and the running job are waited for, the failed, cancelled, timed-out and ended ones submitted
    fake_slurm.states({"4242_0": "RUNNING", "4242_1": "PENDING", "4242_2": "FAILED", "4242_3": "CANCELLED by 1000",
                       "4242_4": "TIMEOUT", "4242_5": "COMPLETED"})
    fake_slurm.interrupt_at_sacct_call(fake_slurm.calls("sacct") + 2)  # the states' call, then the next one
    with pytest.raises(Interrupted, match=r"6 runs are still queued or running.*scancel 4242 4243$"):
        compare(tiny(epochs=1), modules=["se", "eca"], seeds=[0, 1], out_dir=out, progress=False,
                launcher=SubmititLauncher(options))
    assert fake_slurm.calls("sbatch") == 2
    assert "#SBATCH --array=0-3%3" in (out / "jobs" / "4243_submission.sh").read_text().splitlines()
    index = json.loads((out / "jobs" / "index.json").read_text())["runs"]
    assert [index[r]["job_id"] for r in runs] == ["4242_0", "4242_1", "4243_0", "4243_1", "4243_2", "4243_3"]


def test_ctrl_c_raises_again_where_a_library_took_sigint_below_python(tiny, tmp_path, fake_slurm):
    """A process-level SIGINT handler set under Python's (polars sets one once its query engine runs, and the pytest
    worker that ran the Ultralytics tests before this one hung here): the launcher makes Ctrl-C raise again."""
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signal.SIGINT, 1)  # SIG_IGN, below Python: signal.getsignal still says default_int_handler
    fired = threading.Event()  # where Ctrl-C cannot reach Python, the comparison would wait forever: a watchdog
    watchdog = threading.Timer(10, lambda: (fired.set(), _thread.interrupt_main()))
    try:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        fake_slurm.interrupt_at_sacct_call(1)
        watchdog.start()
        with pytest.raises(Interrupted, match="scancel 4242$"):
            compare(tiny(epochs=1), modules=[], seeds=[0], out_dir=tmp_path / "cmp", progress=False,
                    launcher=SubmititLauncher(SlurmOptions(poll_seconds=0.01)))
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert not fired.is_set(), "Ctrl-C did not reach Python: the watchdog stopped the comparison after 10 s"


def test_sbatch_refusing_the_array_is_an_error_that_quotes_it(tiny, tmp_path, fake_slurm):
    fake_slurm.refuse("sbatch: error: invalid partition specified: gpus\n")
    with pytest.raises(ValueError, match=r"sbatch refused the job array: sbatch: error: invalid partition specified: "
                                         r"gpus \(its script is the latest \.submission_file_\*\.sh in .*jobs\)"):
        compare(tiny(epochs=1), modules=[], seeds=[0, 1], out_dir=tmp_path / "cmp", progress=False,
                launcher=SubmititLauncher(SlurmOptions(partition="gpus")))
    assert "#SBATCH --partition=gpus" in next((tmp_path / "cmp" / "jobs").glob(".submission_file_*.sh")).read_text()


def test_a_finished_comparison_needs_no_cluster_to_write_its_report_again(tiny, tmp_path, monkeypatch):
    compare(tiny(epochs=1), modules=[], seeds=[0], out_dir=tmp_path / "cmp", progress=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    result = compare(tiny(epochs=1), modules=[], seeds=[0], out_dir=tmp_path / "cmp", progress=False,
                     launcher=SubmititLauncher(SlurmOptions()))
    assert result.trained == 0 and (tmp_path / "cmp" / "report.md").is_file()


def test_without_srun_the_slurm_cluster_points_to_local_and_debug(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="--cluster slurm: .*srun.*use --cluster local"):
        compare(tiny(epochs=1), modules=[], seeds=[0], out_dir=tmp_path / "cmp", progress=False,
                launcher=SubmititLauncher(SlurmOptions()))


def test_without_submitit_the_error_says_what_to_install(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)
    with pytest.raises(ValueError, match=r"pip install 'attnkit\[slurm\]'"):
        compare(tiny(epochs=1), modules=[], seeds=[0], out_dir=tmp_path / "cmp", progress=False,
                launcher=SubmititLauncher(SlurmOptions(cluster="debug")))


@pytest.mark.parametrize("text, minutes", [("90", 90), (45, 45), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-12:30", 2190), ("0-00:00:01", 1)])
def test_time_limits_in_slurms_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("options, message", [
    ({"time": "soon"}, "a time limit is minutes"),
    ({"time": "0"}, "must be positive"),
    ({"cluster": "kubernetes"}, "--cluster must be one of slurm, local, debug"),
    ({"gpus_per_run": -1}, "--gpus-per-run must be an integer ≥ 0"),
    ({"sbatch": {"partition": "gpu"}}, "--sbatch partition: use --partition instead"),
    ({"sbatch": {"array": "0-3"}}, "--sbatch array: attnkit sets it itself"),
    ({"sbatch": {"nodes": 2}}, "--sbatch nodes: attnkit sets it itself"),
    ({"sbatch": {"Bad Key": 1}}, "--sbatch takes sbatch option names"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**options)
