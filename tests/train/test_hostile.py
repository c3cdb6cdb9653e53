"""A checkpoint from a stranger that would run code when unpickled: every reader refuses it, names the file, and
the code never runs (the marker file it would create does not appear)."""
from __future__ import annotations

import pathlib

import pytest
import torch

import attnkit
from attnkit.train import load_checkpoint, train


class _RunsCode:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"format": "attnkit-train-1", "model": {"fc.weight": torch.ones(1)}, "payload": _RunsCode(marker)}, path)
    yield path
    assert not marker.exists(), "unpickling ran code"


def test_load_pretrained_refuses_code(hostile):
    with pytest.raises(ValueError, match=f"cannot read '{hostile}' as a weights-only"):
        attnkit.load_pretrained(attnkit.create_model("resnet20"), hostile)


def test_load_checkpoint_refuses_code(hostile):
    with pytest.raises(ValueError, match=f"{hostile} is not a readable attnkit checkpoint"):
        load_checkpoint(hostile)


def test_resume_refuses_code(hostile, tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hostile.rename(run_dir / "last.pt")
    with pytest.raises(ValueError, match="last.pt is not a readable attnkit checkpoint"):
        train(tiny(run_dir=str(run_dir), resume=True))


def test_subpackages_are_reachable_from_the_top_level():
    assert attnkit.train.train is train and attnkit.data.load_dataset and attnkit.analysis.paired_comparison
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        attnkit.trian  # noqa: B018
