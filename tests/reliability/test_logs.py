"""The logs of a resumed run are the logs of an uninterrupted one: TensorBoard shows every epoch once (the last
epoch saved before the interruption included), and metrics.csv holds every epoch, never one more than last.pt."""
from __future__ import annotations

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attnkit.train import load_checkpoint, train
from attnkit.train import logger as logger_module
from attnkit.train import trainer as trainer_module


class _Killed(BaseException):
    """Stands in for SIGKILL."""


def _die_when_logging(monkeypatch, epoch: int) -> None:
    """The process is killed after last.pt of `epoch` is written, before its metrics are logged."""
    log = logger_module.MetricsLogger.log

    def dies(self, history):
        if history[-1]["epoch"] == epoch:
            raise _Killed
        return log(self, history)

    monkeypatch.setattr(logger_module.MetricsLogger, "log", dies)


def _scalars(run_dir, tag: str = "test/acc") -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("killed", ["at the start of epoch 3", "after last.pt of epoch 2, before its logs"])
def test_a_resumed_run_logs_every_epoch_once(tiny, tmp_path, monkeypatch, killed):
    if killed.startswith("at"):
        train_epoch = trainer_module._Run.train_epoch

        def dies(self, training, epoch):
            if epoch == 2:
                raise _Killed
            return train_epoch(self, training, epoch)

        monkeypatch.setattr(trainer_module._Run, "train_epoch", dies)
    else:
        _die_when_logging(monkeypatch, 2)
    with pytest.raises(_Killed):
        train(tiny(epochs=4, tensorboard=True))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == (2 if killed.startswith("at") else 1)

    result = train(tiny(epochs=4, tensorboard=True, resume=True))
    expected = [(row["epoch"], row["test_acc"]) for row in result.history]
    assert [step for step, _ in _scalars(run)] == [1, 2, 3, 4]
    assert [(step, round(value, 6)) for step, value in _scalars(run)] == [(e, round(a, 6)) for e, a in expected]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_a_finished_run_killed_before_its_logs_gets_them_on_resume(tiny, tmp_path, monkeypatch):
    _die_when_logging(monkeypatch, 2)
    with pytest.raises(_Killed):
        train(tiny(epochs=2, tensorboard=True))
    monkeypatch.undo()
    result = train(tiny(epochs=2, tensorboard=True, resume=True))  # nothing left to train
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))] == [1, 2]
    assert [step for step, _ in _scalars(tmp_path / "run")] == [1, 2] and result.best_epoch >= 1
