"""Runs that are killed, run twice at once, or blow up numerically: nothing is lost or half-written, and a resumed
run ends with the weights of an uninterrupted one, bit for bit (CPU, fixed seed)."""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from attnkit.train import load_checkpoint, train
from attnkit.train.runlock import RunFolderBusy

OPTIONS = ["--model", "lenet", "--attn", "se", "--image-size", "28", "--epochs", "6", "--batch-size", "32",
           "--lr", "0.05", "--no-tensorboard", "--no-progress", "--threads", "1"]


def start(run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attnkit", "train", *OPTIONS, "--run-dir", str(run_dir), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_lock(run_dir, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run_dir / ".lock"
        if lock.exists() and lock.read_text().strip() == str(process.pid):
            return
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    raise AssertionError("the training process never took its run folder")


def checkpoint_is_whole(path):
    if path.exists():
        state = load_checkpoint(path)  # raises on a half-written file
        assert state["epoch"] >= 1


def kill_and_resume(tmp_path, kills, seed):
    """Kill a run with SIGKILL at random moments `kills` times, resuming after each; return the final state."""
    rng = random.Random(seed)
    run_dir = tmp_path / "killed"
    for attempt in range(kills + 1):
        process = start(run_dir, *(["--resume"] if attempt else []))
        if attempt < kills:
            wait_for_lock(run_dir, process)
            time.sleep(rng.uniform(0.2, 2.5))  # the 6 epochs take ~3 s: steps, evaluations and checkpoint writes
            process.send_signal(signal.SIGKILL)
            process.wait()
            checkpoint_is_whole(run_dir / "last.pt")
            checkpoint_is_whole(run_dir / "best.pt")
        else:
            assert process.wait() == 0, process.stderr.read().decode()[-2000:]
    assert not list(run_dir.glob(".*.tmp"))
    return load_checkpoint(run_dir / "last.pt")


def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tmp_path):
    uninterrupted = start(tmp_path / "whole")
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read().decode()[-2000:]
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    killed = kill_and_resume(tmp_path, kills=3, seed=0)
    assert killed["epoch"] == whole["epoch"] == 6
    assert all(torch.equal(killed["model"][k], whole["model"][k]) for k in whole["model"])
    assert [r["test_acc"] for r in killed["history"]] == [r["test_acc"] for r in whole["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_many_sigkills_then_resume_ends_bit_identical(tmp_path, seed):
    uninterrupted = start(tmp_path / "whole")
    assert uninterrupted.wait() == 0
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    killed = kill_and_resume(tmp_path, kills=8, seed=seed + 1)["model"]
    assert all(torch.equal(killed[k], whole[k]) for k in whole)


def test_a_second_run_on_the_same_folder_refuses_and_a_killed_run_does_not_block(tiny, tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, "--epochs", "40")
    try:
        wait_for_lock(run_dir, first)
        with pytest.raises(RunFolderBusy, match=f"in use by another attnkit train \\(pid {first.pid}\\).*another --run-dir"):
            train(tiny(run_dir=str(run_dir), resume=True))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the lock died with its process: resuming (with the killed run's own options) works at once
    result = train(tiny(run_dir=str(run_dir), resume=True, attn="se", epochs=40, batch_size=32, lr=0.05))
    assert len(result.history) == 40


def test_a_non_finite_loss_names_the_step_and_keeps_the_last_good_epoch(tiny, tmp_path, monkeypatch):
    _nan_at({22 + 5}, monkeypatch)  # step 5 of epoch 2: 22 steps per epoch
    with pytest.raises(FloatingPointError, match=r"became nan at step 5 of epoch 2 \(step 27 of the run\)"):
        train(tiny(epochs=3))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def _nan_at(calls_to_poison: set[int], monkeypatch) -> None:
    """The training loss becomes NaN at these training steps of the process (1-based, counted across epochs)."""
    cross_entropy = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training steps, not the evaluation
            calls["n"] += 1
            if calls["n"] in calls_to_poison:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


def test_skip_nonfinite_skips_those_batches_and_counts_them(tiny, tmp_path, monkeypatch):
    """With --skip-nonfinite 2, two NaN batches are skipped (no update from them: the weights stay finite), the
    epoch's metrics leave them out and record them; a third stops the run as without the option."""
    _nan_at({3, 22 + 7}, monkeypatch)  # 22 steps per epoch
    result = train(tiny(epochs=3, skip_nonfinite=2))
    assert [row["skipped"] for row in result.history] == [1, 1, 0]
    assert all(math.isfinite(row["train_loss"]) for row in result.history) and result.test_acc > 0.5
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert "skipped" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]

    _nan_at({1, 2, 3}, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"step 3 of epoch 1: 3 non-finite losses in the run, more than --skip-nonfinite 2"):
        train(tiny(epochs=1, skip_nonfinite=2, run_dir=str(tmp_path / "other")))


def test_a_stopped_run_resumes_with_a_larger_skip_budget(tiny, tmp_path, monkeypatch):
    _nan_at({22 + 5}, monkeypatch)
    with pytest.raises(FloatingPointError):
        train(tiny(epochs=2))
    _nan_at({5}, monkeypatch)  # the same batch again, now the first training step after the resume
    result = train(tiny(epochs=2, resume=True, skip_nonfinite=1))
    assert len(result.history) == 2 and result.history[-1]["skipped"] == 1
