"""`attnkit export` on a checkpoint from `attnkit train`: the README's path from training to onnxruntime."""
from __future__ import annotations

import re

import torch

from attnkit.cli import main
from attnkit.train import model_from_checkpoint, train
from tests.deploy.common import rel_error
from tests.deploy.test_export import onnx_run


def test_train_export_and_run_in_onnxruntime(tiny, tmp_path, capsys):
    result = train(tiny(attn="cbam", epochs=1))
    checkpoint = f"{result.run_dir}/last.pt"
    assert main(["export", checkpoint, "--dynamic-batch"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {result.run_dir}/last.onnx (onnx; example input 2×1×28×28, batch dynamic, size fixed" in out
    errors = [float(e) for e in re.findall(r"max rel error ([0-9.e+-]+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-4
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = model_from_checkpoint(checkpoint)(x)
    assert rel_error(onnx_run(f"{result.run_dir}/last.onnx", x), expected) < 1e-4


def test_export_formats_and_options(tiny, tmp_path, capsys):
    result = train(tiny(model="resnet20", attn="srm", image_size=16, epochs=1, batch_size=32))
    checkpoint = f"{result.run_dir}/last.pt"
    out_file = tmp_path / "deploy" / "model.pt2"
    assert main(["export", checkpoint, "--format", "exported-program", "--out", str(out_file), "--dynamic-size",
                 "--input-size", "24", "--no-fold"]) == 0
    out = capsys.readouterr().out
    assert out_file.is_file() and "example input 1×1×24×24" in out and "0 BatchNorms folded" in out
    assert "torch.export traced the dynamic axes as valid for height" in out
    assert main(["export", checkpoint, "--format", "torchscript"]) == 0
    assert "checked with torch.jit.load" in capsys.readouterr().out


def test_missing_or_wrong_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"attnkit export: error: no checkpoint at {tmp_path / 'nothing.pt'}"
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["export", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attnkit export: error: {tmp_path / 'notes.txt'} is not a readable attnkit checkpoint")
    assert "\n" not in err
