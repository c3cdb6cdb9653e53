"""Checkpoints are replaced atomically: a write that dies half-way leaves the previous file whole and no litter."""
from __future__ import annotations

import pytest
import torch

from attnkit.train import TrainConfig, load_checkpoint, save_checkpoint
from attnkit.runs import checkpoint as checkpoint_module


def _state(epoch, weight):
    config = TrainConfig(model="lenet")
    return {"config": config.to_dict(), "arch": {"model": "lenet", "attn": None, "where": "auto", "identity_init": False,
                                                 "num_classes": 10, "in_chans": 1, "input_size": 28},
            "epoch": epoch, "model": {"w": weight}}


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1, torch.ones(3)))

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2, torch.zeros(3)))
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_loading_something_else_is_a_clear_error(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not an attnkit training checkpoint: expected format 'attnkit-train-1', found None"):
        load_checkpoint(tmp_path / "weights.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.pt is not a readable attnkit checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
