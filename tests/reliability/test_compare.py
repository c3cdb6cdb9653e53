"""attnkit compare: a damaged result.json in its folder is one line naming it, and the processes that train its
runs end with it, even when it is killed, releasing their run folders."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnkit.train import TrainConfig, compare
from attnkit.compare import run_configs
from attnkit.train.runlock import RunFolderLock

from .conftest import one_line_error

OPTIONS = ["--model", "lenet", "--image-size", "28", "--threads", "1", "--no-tensorboard", "--no-progress"]
BASE = TrainConfig(model="lenet", dataset="cluttered-digits", image_size=28, epochs=1, threads=1, tensorboard=False)


def _result_json(out, contents: str | bytes) -> Path:
    """A result.json with `contents` in the folder of the comparison's SE run."""
    path = Path(run_configs(BASE, ["se"], [0], ["auto"], out)[1].run_dir) / "result.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(contents.encode() if isinstance(contents, str) else contents)
    return path


DAMAGE = {
    "truncated": ('{"config": {"model": "lenet", "da', "is not readable JSON (JSONDecodeError: Unterminated string"),
    "no-config": (json.dumps({"variant": "se", "seed": 0}), "is not a finished run's result: it lacks config, run_dir"),
    "not-utf8": (b"{\"config\": \"caf\xe9\"}", "is not readable JSON (UnicodeDecodeError"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_result_json_is_one_line_naming_it(tmp_path, capsys, kind):
    text, message = DAMAGE[kind]
    path = _result_json(tmp_path / "cmp", text)
    err = one_line_error(capsys, "compare", *OPTIONS, "--epochs", "1", "--attn", "se", "--seeds", "1", "--out",
                         str(tmp_path / "cmp"))
    assert f"{path} {message}" in err or f"{path}: {message}" in err, err
    assert "Delete it to have the run read back from its last checkpoint, or use another folder." in err


def test_a_result_json_whose_config_is_not_options_is_named(tmp_path):
    from attnkit.train.trainer import TrainResult

    result = {name: 0 for name in TrainResult.__dataclass_fields__} | {"config": {"epochs": "many"}}
    path = _result_json(tmp_path / "cmp", json.dumps(result))
    with pytest.raises(ValueError, match=f"{path}: its 'config' is not a valid training configuration"):
        compare(BASE, ["se"], [0], out_dir=tmp_path / "cmp", progress=False)


def _worker_pids(out, parent: int) -> set[int]:
    """The processes holding the run folders' locks under `out`, other than `parent`."""
    pids = set()
    for lock in out.glob("*/seed*/.lock"):
        text = lock.read_text().strip()
        if text.isdigit() and int(text) != parent:
            pids.add(int(text))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, waiting for its parent to read its status
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_killing_the_compare_process_ends_its_workers(tmp_path):
    out = tmp_path / "cmp"
    process = subprocess.Popen([sys.executable, "-m", "attnkit", "compare", *OPTIONS, "--epochs", "50", "--attn", "se",
                                "--seeds", "1", "--jobs", "2", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_worker_pids(out, process.pid)) < 2:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the workers never took their run folders"
        time.sleep(0.2)
    workers, folders = _worker_pids(out, process.pid), list(out.glob("*/seed*"))
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30  # a generous bound on "at once": they check every half second
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "the workers outlived the compare process"
    for folder in folders:  # and their run folders are free
        with RunFolderLock(folder):
            pass
