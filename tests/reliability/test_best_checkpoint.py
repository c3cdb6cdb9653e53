"""best.pt always holds the best epoch that last.pt records: it is written first, so a kill between the two
writes leaves last.pt behind (the epoch is trained again), never ahead; and a folder where last.pt did get ahead
(a kill between them, as they were once written) has best.pt made again from last.pt on --resume."""
from __future__ import annotations

import random
import shutil
import signal
import time

import pytest
import torch

from attnkit.train import load_checkpoint, train
from attnkit.train import trainer as trainer_module
from tests.train.test_crashes import start, wait_for_lock


def _improved_epochs(history) -> list[int]:
    best, improved = -1.0, []
    for row in history:
        if row["test_acc"] > best:
            best, improved = row["test_acc"], improved + [row["epoch"]]
    return improved


def _same_weights(a, b) -> bool:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs in the epoch."""


def test_a_kill_between_best_and_last_is_repaired_by_the_resume(tiny, tmp_path, monkeypatch):
    whole = train(tiny(epochs=3, run_dir=str(tmp_path / "whole")))
    epoch = _improved_epochs(whole.history)[-1]
    assert epoch >= 2, "the options must improve after the first epoch"
    save, written = trainer_module.save_checkpoint, []

    def killed_before_last(path, state):
        if path.name == "last.pt" and state["epoch"] == epoch:
            raise _Killed
        written.append((path.name, state["epoch"]))
        save(path, state)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_before_last)
    with pytest.raises(_Killed):
        train(tiny(epochs=3))
    assert written[-1] == ("best.pt", epoch) and load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == epoch - 1
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    result = train(tiny(epochs=3, resume=True))
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == result.best_epoch == whole.best_epoch == epoch
    assert _same_weights(tmp_path / "run" / "best.pt", tmp_path / "whole" / "best.pt")


def test_a_stale_best_checkpoint_is_made_again_on_resume(tiny, tmp_path):
    """The folder a kill between last.pt and best.pt left when last.pt was written first: result.json (and last.pt)
    say the best epoch is 2, best.pt holds epoch 1."""
    run = tmp_path / "run"
    train(tiny(epochs=1, run_dir=str(tmp_path / "one")))
    result = train(tiny(epochs=2))
    assert result.best_epoch == 2, "the options must improve in the second epoch"
    shutil.copy(tmp_path / "one" / "best.pt", run / "best.pt")
    assert load_checkpoint(run / "best.pt")["epoch"] == 1
    resumed = train(tiny(epochs=2, resume=True))
    assert resumed.best_epoch == load_checkpoint(run / "best.pt")["epoch"] == 2
    assert (run / "best.pt").read_bytes() == (run / "last.pt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_sigkills_at_random_moments_never_leave_best_behind_last(tmp_path, seed):
    """After every SIGKILL, best.pt holds last.pt's best epoch or the epoch after last.pt's (written, last.pt not
    yet); the finished run's best.pt is the uninterrupted run's, bit for bit."""
    uninterrupted = start(tmp_path / "whole")
    assert uninterrupted.wait() == 0
    rng, run = random.Random(seed), tmp_path / "killed"
    for attempt in range(7):
        process = start(run, *(["--resume"] if attempt else []))
        if attempt == 6:
            assert process.wait() == 0, process.stderr.read().decode()[-2000:]
            break
        wait_for_lock(run, process)
        time.sleep(rng.uniform(0.2, 2.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (run / "last.pt").exists():
            last = load_checkpoint(run / "last.pt")
            assert load_checkpoint(run / "best.pt")["epoch"] in (last["best_epoch"], last["epoch"] + 1)
    last = load_checkpoint(run / "last.pt")
    assert load_checkpoint(run / "best.pt")["epoch"] == last["best_epoch"]
    assert _same_weights(run / "best.pt", tmp_path / "whole" / "best.pt")
