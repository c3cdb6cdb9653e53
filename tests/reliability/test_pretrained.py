"""--pretrained: a checkpoint of which no weight fits is refused, even when BatchNorm counters (which every
BatchNorm has, with the same names in related architectures) do; the load report is always printed."""
from __future__ import annotations

import re

import pytest
import torch

import attnkit
from attnkit.cli import main

from .conftest import one_line_error

OPTIONS = ["--image-size", "16", "--epochs", "1", "--threads", "1", "--no-tensorboard", "--no-progress"]


def test_a_checkpoint_that_matches_only_batchnorm_counters_is_refused(se_run, tmp_path, capsys):
    """ResNet-20's weights into a ResNet-18: only BatchNorm counters (and the classifier's bias) share a name and a
    shape."""
    path = se_run / "last.pt"
    err = one_line_error(capsys, "train", "--model", "resnet18", "--pretrained", str(path), *OPTIONS,
                         "--run-dir", str(tmp_path / "run"))
    assert re.search(f"no weight of {re.escape(str(path))} matches ResNet by name and shape \\(only 1[0-9] biases, norms "
                     f"and buffers do, such as bn1.num_batches_tracked\\)", err), err
    assert "it is from another architecture" in err and not (tmp_path / "run" / "last.pt").exists()
    model = attnkit.create_model("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="only 1[0-9] biases, norms and buffers do"):
        attnkit.load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused load changed the model"


def test_the_load_report_is_printed_even_without_progress(tmp_path, capsys):
    plain = attnkit.create_model("resnet20", num_classes=10, in_chans=1)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    assert main(["train", "--model", "resnet20", "--attn", "se", "--pretrained", str(tmp_path / "plain.pth"),
                             *OPTIONS, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    tensors = len(plain.state_dict())
    assert f"--pretrained {tmp_path / 'plain.pth'}: loaded {tensors} tensors\n" in out
    assert "missing from the checkpoint (36, left as initialised): layer1.0.attn.fc1.weight" in out
