"""The divergence guard: an epoch is saved as good only when the network's whole state (weights and BatchNorm
statistics) and its losses are finite, so a run that diverges stops with an error, and the checkpoint its message
names exists and holds the last good epoch."""
from __future__ import annotations

import math

import pytest
import torch

from attnkit.train import load_checkpoint, train
from attnkit.train import trainer as trainer_module

from .conftest import one_line_error

NO_CHECKPOINT = "nothing of this epoch was saved and no epoch has ended with a finite network, so there is no checkpoint"


def _resnet(tiny, **options):
    return tiny(model="resnet20", image_size=16, **options)


def test_lr_20_no_longer_ends_in_success_with_infinite_running_variances(tmp_path, capsys):
    """It used to exit 0 at 10% accuracy with infinite BatchNorm running variances in last.pt: the training loss
    stays finite because training normalises with the batch's own statistics."""
    run = tmp_path / "run"
    err = one_line_error(capsys, "train", "--lr", "20", "--epochs", "2", "--run-dir", str(run), "--threads", "1",
                         "--no-tensorboard", "--no-progress")
    assert "after epoch 1 the network holds NaN or infinite values in" in err and ".running_var)" in err
    assert "though the training loss was" in err and NO_CHECKPOINT in err
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_lr_100_without_warmup_saves_no_nan_checkpoint(tiny, tmp_path):
    with pytest.raises(FloatingPointError, match=f"after epoch 1 the network holds NaN or infinite values.*{NO_CHECKPOINT}"):
        train(_resnet(tiny, lr=100, warmup_epochs=0))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_lr_1e6_does_not_name_a_checkpoint_that_does_not_exist(tiny, tmp_path):
    with pytest.raises(FloatingPointError, match=f"the training loss became nan at step .*; {NO_CHECKPOINT}") as info:
        train(_resnet(tiny, lr=1e6))
    assert "last.pt" not in str(info.value) and not (tmp_path / "run" / "last.pt").exists()


def test_a_network_that_turns_non_finite_after_a_good_epoch_keeps_that_epoch(tiny, tmp_path, monkeypatch):
    evaluate, calls = trainer_module._Run.evaluate, {"n": 0}

    def poisoned(self, training):
        calls["n"] += 1
        if calls["n"] == 2:  # end of epoch 2: a running variance overflows, the training loss never notices
            training.model.layer2[0].bn2.running_var[3] = math.inf
        return evaluate(self, training)

    monkeypatch.setattr(trainer_module._Run, "evaluate", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=(r"after epoch 2 the network holds NaN or infinite values in 1 of its tensors "
                                                  r"\(the first: layer2.0.bn2.running_var\).*nothing of this epoch was "
                                                  f"saved and {run / 'last.pt'} keeps epoch 1, the last good one")):
        train(_resnet(tiny, epochs=3))
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(run / name)["epoch"] == 1  # and every tensor finite: load_checkpoint checks it
    assert (run / "metrics.csv").read_text().count("\n") == 2


def test_a_test_loss_that_is_not_finite_stops_the_run(tiny, tmp_path, monkeypatch):
    evaluate = trainer_module._Run.evaluate
    monkeypatch.setattr(trainer_module._Run, "evaluate", lambda self, training: {**evaluate(self, training), "test_loss": math.inf})
    with pytest.raises(FloatingPointError, match=f"after epoch 1 the test loss is inf; {NO_CHECKPOINT}"):
        train(tiny(epochs=1))


def test_a_stopped_run_resumes_from_its_last_good_epoch(tiny, tmp_path, monkeypatch):
    evaluate, calls = trainer_module._Run.evaluate, {"n": 0}

    def poisoned(self, training):
        calls["n"] += 1
        if calls["n"] == 2:
            next(training.model.parameters()).data[0] = math.nan
        return evaluate(self, training)

    monkeypatch.setattr(trainer_module._Run, "evaluate", poisoned)
    with pytest.raises(FloatingPointError, match="keeps epoch 1"):
        train(tiny(epochs=2))
    monkeypatch.setattr(trainer_module._Run, "evaluate", evaluate)
    resumed = train(tiny(epochs=2, resume=True))
    whole = train(tiny(epochs=2, run_dir=str(tmp_path / "whole")))
    assert [r["test_acc"] for r in resumed.history] == [r["test_acc"] for r in whole.history]
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("run", "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)
