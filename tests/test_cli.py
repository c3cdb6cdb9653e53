"""The command line: `attnkit list`, the `attnkit smoke` run, and errors as one clear line (train and compare
have their own tests in tests/train)."""
from __future__ import annotations

import subprocess
import sys

import attnkit
from attnkit import cli


def test_smoke_runs_every_module_forward_and_backward(capsys):
    assert cli.main(["smoke"]) == 0  # 64 channels: every module's defaults (SGE's 64 groups) take them
    out = capsys.readouterr().out
    for name in attnkit.list_modules():
        assert f"\n{name} " in out
    assert f"{len(attnkit.list_modules())} modules built and ran forward and backward." in out


def test_smoke_rows_report_real_parameter_counts():
    rows = {row["module"]: row for row in cli.smoke(channels=64)}
    assert rows["se"]["params"] == sum(p.numel() for p in attnkit.create("se", 64).parameters())
    assert rows["ge"]["params"] == 0 and rows["triplet"]["params"] == 300
    assert all(row["finite"] and row["output"] == "4×64×9×7" for row in rows.values())


def test_python_dash_m_list():
    result = subprocess.run([sys.executable, "-m", "attnkit", "list"], capture_output=True, text=True, check=True)
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["modules"].strip().split(", ") == attnkit.list_modules()
    assert lines["models"].strip().split(", ") == attnkit.list_models()
    assert "digits" in lines["datasets"] and "cifar10" in lines["datasets"]


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["train", "--attn", "sq", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit train: error: Unknown attention module 'sq'") and "Traceback" not in err
    assert cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert f"found in {tmp_path}" in capsys.readouterr().err
