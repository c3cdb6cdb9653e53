"""What the reliability tests share: a trained checkpoint to damage, a folder this process cannot write, and the
command line's one-line error."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from attnkit import cli
from tests.analysis.test_gate_stats import trained_checkpoint


@pytest.fixture(scope="session")
def se_run(tmp_path_factory) -> Path:
    """The run folder of ResNet-20 + SE trained 1 epoch on the digits at 16 px (shared with tests/analysis)."""
    return Path(trained_checkpoint(tmp_path_factory, "se")).parent


@pytest.fixture
def se_copy(se_run, tmp_path) -> Path:
    """A copy of the SE run's last.pt in a folder of its own, to damage or lock."""
    folder = tmp_path / "run"
    folder.mkdir()
    return Path(shutil.copy(se_run / "last.pt", folder / "last.pt"))


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` made unwritable to this process: mode 0o555, and, for root, whom modes do not stop, the immutable
    attribute (chattr +i). Skips where neither holds (root without the CAP_LINUX_IMMUTABLE capability)."""
    folder.chmod(0o555)
    root = getattr(os, "geteuid", lambda: -1)() == 0
    immutable = root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
        except OSError:
            yield folder
        else:
            probe.unlink()
            pytest.skip("cannot make a folder unwritable here (root without the immutable attribute)")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def one_line_error(capsys, *argv: str) -> str:
    """Run `attnkit argv`; it must fail with exit code 2 and one line on stderr, which is returned."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnkit {argv[0]}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err
