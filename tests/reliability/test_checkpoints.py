"""One check of a checkpoint's structure and values for every reader: a checkpoint of a run that diverged (NaN or
infinite weights or statistics), one that lacks a field or holds an absurd one, and a pickle that would run code
are refused by each reader, in one line that names the file; the file is left as it was and the code never runs."""
from __future__ import annotations

import builtins
import math
import os
import pathlib
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.cli import main
from attnkit.data import load_dataset
from attnkit.train import TrainConfig, load_checkpoint, model_from_checkpoint, train
from attnkit.compare import run_configs

from .conftest import one_line_error

DAMAGE = {  # what is done to a good checkpoint, and what every reader says about it
    "nan-weight": (lambda s: s["model"]["conv1.weight"].view(-1)[0].fill_(math.nan),
                   r"holds NaN or infinite values in 1 of its tensors \(the first: conv1.weight\)"),
    "inf-running-var": (lambda s: s["model"]["layer1.0.bn1.running_var"].fill_(math.inf),
                        r"holds NaN or infinite values in 1 of its tensors \(the first: layer1.0.bn1.running_var\)"),
    "no-model": (lambda s: s.pop("model"), "lacks 'model'"),
    "no-config": (lambda s: s.pop("config"), "lacks 'config'"),
    "input-size-2**20": (lambda s: s["arch"].update(input_size=2**20),
                         "gives input_size=1048576; a network takes an integer from 1 to 8,192"),
    "num-classes--5": (lambda s: s["arch"].update(num_classes=-5), "gives num_classes=-5"),
    "config-not-options": (lambda s: s["config"].update(epochs="many"), "its 'config' is not a valid training configuration"),
}


def _damaged(se_copy: Path, kind: str) -> Path:
    state = torch.load(se_copy, weights_only=True)
    DAMAGE[kind][0](state)
    torch.save(state, se_copy)
    return se_copy


def _resume_options(se_run: Path, run_dir: Path) -> TrainConfig:
    config = torch.load(se_run / "last.pt", weights_only=True)["config"]
    return TrainConfig.from_dict({**config, "run_dir": str(run_dir), "resume": True})


@pytest.mark.parametrize("kind", DAMAGE)
def test_python_readers_refuse_a_damaged_checkpoint(se_copy, tmp_path, kind):
    path, message = _damaged(se_copy, kind), DAMAGE[kind][1]
    for read in (load_checkpoint, model_from_checkpoint, lambda p: attnkit.export(p, tmp_path / "out.onnx")):
        with pytest.raises(ValueError, match=f"{path}.*{message}"):
            read(path)
    with pytest.raises(ValueError, match=f"the checkpoint.*{message}"):  # a checkpoint already read, as a dict
        model_from_checkpoint(torch.load(path, weights_only=True))
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("command", ["export", "stats", "explain", "prune"])
@pytest.mark.parametrize("kind", DAMAGE)
def test_commands_refuse_a_damaged_checkpoint_in_one_line(se_copy, capsys, command, kind):
    path = _damaged(se_copy, kind)
    before = path.read_bytes()
    err = one_line_error(capsys, command, str(path))
    assert re.search(f"{re.escape(str(path))}.*{DAMAGE[kind][1]}", err), err
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_refuses_a_damaged_checkpoint(se_run, se_copy, kind):
    config = _resume_options(se_run, se_copy.parent)
    path = _damaged(se_copy, kind)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{path}.*{DAMAGE[kind][1]}"):
        train(config)
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["nan-weight", "inf-running-var"])
def test_pretrained_and_baseline_refuse_a_diverged_checkpoint(se_run, se_copy, tmp_path, capsys, kind):
    path = _damaged(se_copy, kind)
    err = one_line_error(capsys, "train", "--model", "resnet20", "--attn", "se", "--image-size", "16", "--epochs", "1",
                         "--pretrained", str(path), "--run-dir", str(tmp_path / "new"), "--no-progress")
    assert f"--pretrained {path} holds NaN or infinite values in 1 of the tensors loaded" in err
    assert "Lower --lr" not in err and not (tmp_path / "new" / "last.pt").exists()
    err = one_line_error(capsys, "explain", str(se_run / "last.pt"), "--baseline", str(path), "--count", "2",
                         "--out", str(tmp_path / "explain"))
    assert f"{path} holds NaN or infinite values" in err


def test_export_of_a_model_with_infinite_statistics_is_refused(tmp_path):
    """Its own check cannot see it: a BatchNorm with infinite running variances outputs zeros, as the export does."""
    model = attnkit.create_model("resnet20", attn="se", num_classes=10).eval()
    model.layer1[0].bn1.running_var.fill_(math.inf)
    with pytest.raises(ValueError, match=r"in 1 of its tensors \(the first: layer1.0.bn1.running_var\); it comes from a "
                                         r"run that diverged"):
        attnkit.export(model, tmp_path / "m.onnx", input_shape=(3, 16, 16))
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------ pickles that would run code
class _Payload:
    """Unpickling it calls `call(*args)`, each of which creates the marker file."""

    def __init__(self, call, args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "path-touch": _Payload(pathlib.Path.touch, (marker,)),
        "exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "eval": _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "os-system": _Payload(os.system, (f"touch '{marker}'",)),
    }


def _hostile_checkpoint(good: Path, path: Path, payload: _Payload, where: str) -> Path:
    state = torch.load(good, weights_only=True)
    if where == "top":
        state["payload"] = payload
    elif where == "weights":
        state["model"]["conv1.weight"] = payload
    else:  # the whole file
        state = payload
    torch.save(state, path)
    return path


def _cifar_batch(path: Path, payload: _Payload) -> None:
    path.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}))


class _CommandFailed(Exception):
    """`attnkit ...` exited with code 2; what it said is on stderr."""


def _command(argv):
    def read(path: Path) -> None:
        if main(argv(str(path))) == 2:
            raise _CommandFailed
    return read


def _readers(se_run: Path, tmp_path: Path):
    """Every reader of checkpoints, as a function of the file."""
    def resume(path: Path) -> None:
        (tmp_path / "run").mkdir()
        shutil.move(path, tmp_path / "run" / "last.pt")
        train(_resume_options(se_run, tmp_path / "run"))

    def compare_resuming(path: Path) -> None:
        base = TrainConfig(model="resnet20", dataset="digits", image_size=16, epochs=1, threads=1, tensorboard=False)
        run_dir = Path(run_configs(base, [], [0], ["auto"], tmp_path / "cmp")[0].run_dir)
        run_dir.mkdir(parents=True)
        shutil.move(path, run_dir / "last.pt")
        attnkit.train.compare(base, [], [0], out_dir=tmp_path / "cmp", progress=False)

    good = str(se_run / "last.pt")
    return {
        "load_checkpoint": load_checkpoint,
        "model_from_checkpoint": model_from_checkpoint,
        "export()": lambda path: attnkit.export(path, tmp_path / "out.onnx"),
        "load_pretrained()": lambda path: attnkit.load_pretrained(attnkit.create_model("resnet20", attn="se"), path),
        "train --resume": resume,
        "train --pretrained": lambda path: train(TrainConfig(model="resnet20", attn="se", image_size=16, epochs=1,
                                                             pretrained=str(path), run_dir=str(tmp_path / "new"))),
        "compare (resuming a run)": compare_resuming,
        "attnkit export": _command(lambda path: ["export", path]),
        "attnkit stats": _command(lambda path: ["stats", path]),
        "attnkit explain": _command(lambda path: ["explain", path]),
        "attnkit explain --baseline": _command(lambda path: ["explain", good, "--baseline", path, "--out", str(tmp_path / "x")]),
        "attnkit prune": _command(lambda path: ["prune", path]),
    }


READERS = ["load_checkpoint", "model_from_checkpoint", "export()", "load_pretrained()", "train --resume", "train --pretrained",
           "compare (resuming a run)", "attnkit export", "attnkit stats", "attnkit explain", "attnkit explain --baseline",
           "attnkit prune"]


@pytest.mark.parametrize("where", ["top", "weights", "whole"])
@pytest.mark.parametrize("payload", ["path-touch", "exec", "eval", "os-system"])
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_every_pickle_that_would_run_code(se_run, tmp_path, capsys, reader, payload, where):
    marker = tmp_path / "MARKER"
    path = _hostile_checkpoint(se_run / "last.pt", tmp_path / "last.pt", _payloads(marker)[payload], where)
    with pytest.raises((ValueError, _CommandFailed)) as info:
        _readers(se_run, tmp_path)[reader](path)
    said = capsys.readouterr().err if info.type is _CommandFailed else str(info.value)
    assert "last.pt" in said and ("weights-only" in said or "not a readable attnkit checkpoint" in said), said
    assert not marker.exists(), "unpickling ran code"


@pytest.mark.parametrize("payload", ["path-touch", "exec", "eval", "os-system"])
def test_the_cifar_reader_refuses_every_pickle_that_would_run_code(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _cifar_batch(folder / name, _payloads(marker)[payload])
    with pytest.raises(ValueError, match="data_batch_1 is not a readable CIFAR batch .*a CIFAR batch holds only arrays"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists(), "unpickling ran code"
