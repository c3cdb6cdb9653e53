"""torchrun with two CPU processes (gloo) ends with the weights one process reaches with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from attnkit.train import load_checkpoint


def test_torchrun_two_processes_match_one_process(tmp_path):
    options = ["--model", "lenet", "--attn", "se", "--image-size", "28", "--epochs", "2", "--batch-size", "32",
               "--lr", "0.05", "--no-tensorboard", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "attnkit", "train", *options, "--run-dir", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "attnkit", "train", *options, "--run-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("test accuracy") == 1  # rank 0 alone reports
    one, both = (load_checkpoint(tmp_path / name / "last.pt") for name in ("one", "two"))
    assert one["model"].keys() == both["model"].keys()
    # 88 SGD steps apart from summation order: differences of float rounding, ~1e-4 of the weights' scale
    for key in one["model"]:
        torch.testing.assert_close(both["model"][key], one["model"][key], rtol=1e-3, atol=2e-4, msg=key)
    # and the tolerance notices a real difference: one process with the per-rank batch (16) is far off
    subprocess.run([sys.executable, "-m", "attnkit", "train", *options, "--batch-size", "16",  # the later value wins
                    "--run-dir", str(tmp_path / "half")], check=True, env=env, capture_output=True)
    half = load_checkpoint(tmp_path / "half" / "last.pt")["model"]
    assert (half["conv2.weight"] - one["model"]["conv2.weight"]).abs().max() > 1e-2
    assert [round(r["train_loss"], 4) for r in both["history"]] == [round(r["train_loss"], 4) for r in one["history"]]
    assert not list((tmp_path / "two").glob("*.tmp"))
