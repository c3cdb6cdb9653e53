"""Every reader of checkpoint files against every kind of bad file: empty, truncated, random bytes, a plain
state dict, another architecture's checkpoint, a folder. Each gives one clear error that names the file (or,
for load_pretrained and another architecture, a report of what did not load); none crashes deep in torch."""
from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.cli import main
from attnkit.train import TrainConfig, load_checkpoint, model_from_checkpoint, train
from tests.train.test_hostile import _RunsCode

COMMON = dict(dataset="digits", image_size=28, epochs=1, batch_size=64, progress=False, tensorboard=False, threads=1)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint of LeNet + SE on the digits, and one of ResNet-20 (another architecture)."""
    root = tmp_path_factory.mktemp("good")
    train(TrainConfig(model="lenet", attn="se", run_dir=str(root / "lenet"), **COMMON))
    train(TrainConfig(model="resnet20", run_dir=str(root / "resnet"), **{**COMMON, "image_size": 16}))
    return root / "lenet" / "last.pt", root / "resnet" / "last.pt"


def _bad_file(kind: str, good, tmp_path):
    lenet, resnet = good
    path = tmp_path / "bad.pt"
    data = lenet.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "state-dict":
        torch.save(attnkit.create_model("lenet", num_classes=10).state_dict(), path)
    elif kind == "weights-of-another-arch":  # an attnkit checkpoint whose weights are not its architecture's
        state = torch.load(lenet, weights_only=True)
        state["model"] = torch.load(resnet, weights_only=True)["model"]
        torch.save(state, path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "runs-code":
        torch.save({"format": "attnkit-train-1", "payload": _RunsCode(tmp_path / "MARKER")}, path)
    return path


UNREADABLE = ["empty", "truncated", "random"]
KINDS = [*UNREADABLE, "state-dict", "weights-of-another-arch", "folder"]
# what each strict reader says about each kind
STRICT = {
    "empty": (ValueError, "is not a readable attnkit checkpoint"),
    "truncated": (ValueError, "is not a readable attnkit checkpoint"),
    "random": (ValueError, "is not a readable attnkit checkpoint"),
    "state-dict": (ValueError, "is not an attnkit training checkpoint: expected format 'attnkit-train-1'"),
    "weights-of-another-arch": (ValueError, "its weights do not fit the architecture it records"),
    "folder": (FileNotFoundError, "no checkpoint at"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_load_checkpoint_and_model_from_checkpoint(kind, good, tmp_path):
    path = _bad_file(kind, good, tmp_path)
    error, message = STRICT[kind]
    if kind != "weights-of-another-arch":  # load_checkpoint reads the file; the mismatch shows when building
        with pytest.raises(error, match=message):
            load_checkpoint(path)
    with pytest.raises(error, match=message):
        model_from_checkpoint(path)


@pytest.mark.parametrize("kind", KINDS)
def test_export(kind, good, tmp_path):
    path = _bad_file(kind, good, tmp_path)
    error, message = STRICT[kind]
    with pytest.raises(error, match=message):
        attnkit.export(path, tmp_path / "out.onnx")


@pytest.mark.parametrize("command", ["export", "explain", "stats", "prune"])
@pytest.mark.parametrize("kind", [*KINDS, "runs-code"])
def test_every_command_that_reads_a_checkpoint_says_so_in_one_line(command, kind, good, tmp_path, capsys):
    """Including a pickle that would run code when unpickled: refused (weights-only loading), and it never runs."""
    path = _bad_file(kind, good, tmp_path)
    before = path.read_bytes() if path.is_file() else None
    assert main([command, str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnkit {command}: error: ") and str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "MARKER").exists(), "unpickling ran code"
    assert before is None or path.read_bytes() == before, "the file was changed"


@pytest.mark.parametrize("kind", [*UNREADABLE, "state-dict", "weights-of-another-arch"])
def test_resume(kind, good, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bad = _bad_file(kind, good, tmp_path).read_bytes()
    (run_dir / "last.pt").write_bytes(bad)
    error, message = STRICT[kind]
    with pytest.raises(error, match=message if kind != "weights-of-another-arch" else "do not fit"):
        train(TrainConfig(model="lenet", attn="se", run_dir=str(run_dir), resume=True, **COMMON))
    assert (run_dir / "last.pt").read_bytes() == bad, "a failed resume changed the checkpoint"


@pytest.mark.parametrize("kind", [*UNREADABLE, "folder"])
def test_load_pretrained_unreadable(kind, good, tmp_path):
    path = _bad_file(kind, good, tmp_path)
    error = FileNotFoundError if kind == "folder" else ValueError
    with pytest.raises(error, match=f"load_pretrained: .*{path.name}"):
        attnkit.load_pretrained(attnkit.create_model("lenet", num_classes=10), path)


def test_load_pretrained_from_another_architecture_reports_it(good):
    lenet, resnet = good
    with pytest.raises(ValueError, match="no weight of .* matches LeNet by name and shape; it is from another architecture"):
        attnkit.load_pretrained(attnkit.create_model("lenet", num_classes=10), resnet)
    # a related architecture: what fits loads, the rest is listed
    model = attnkit.create_model("lenet", attn="cbam", num_classes=10)
    report = attnkit.load_pretrained(model, lenet)
    assert report.loaded and report.missing and any("attn" in k for k in report.unexpected)
    assert torch.equal(model.state_dict()["conv1.weight"], torch.load(lenet, weights_only=True)["model"]["conv1.weight"])
