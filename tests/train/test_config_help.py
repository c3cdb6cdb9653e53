"""Each TrainConfig option carries its own help text, and the command line shows that text."""
from __future__ import annotations

from dataclasses import fields

import pytest

from attnkit import cli
from attnkit.train import TrainConfig


def _help(capsys, monkeypatch, command: str) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: argparse would break words at hyphens
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_every_option_has_help():
    missing = [f.name for f in fields(TrainConfig) if not f.metadata.get("help", "").strip()]
    assert not missing, f"TrainConfig fields without help metadata: {missing}"


def test_train_help_shows_each_options_help_and_default(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "train")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["help"].split()) in out, f"{flag}: its help is not shown"
    assert "--epochs EPOCHS training epochs (default: 10)" in out
    assert "(default: 50% and 75% of the epochs)" in out  # a '%' in the help survives argparse's formatting
    assert "--workers WORKERS data-loading processes (image folders) (default: 0)" in out


def test_compare_help_shows_the_training_options_it_takes(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "compare")
    for name in ("model", "dataset", "lr", "epochs"):
        assert " ".join(TrainConfig.__dataclass_fields__[name].metadata["help"].split()) in out
