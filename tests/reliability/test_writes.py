"""Every file attnkit writes goes through attnkit.files: never through a link, atomic, with the umask's
permissions; and every OS error on the way is one line naming the path and what to do, with nothing half-made
left behind."""
from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit import files
from attnkit.train import TrainConfig, compare, load_checkpoint, save_checkpoint, train

from .conftest import one_line_error, unwritable

TINY = ["--model", "lenet", "--image-size", "28", "--epochs", "1", "--threads", "1", "--no-tensorboard", "--no-progress"]


def _victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_train_refuses_a_lock_file_that_is_a_link(tmp_path, capsys, link):
    victim, run = _victim(tmp_path), tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim) if link == "symbolic" else os.link(victim, run / ".lock")
    err = one_line_error(capsys, "train", *TINY, "--run-dir", str(run))
    said = {"symbolic": f"{run / '.lock'} is a symbolic link", "hard": f"{run / '.lock'} is a hard link to another file"}
    assert said[link] in err
    assert victim.read_text() == "precious\n" and not (run / "last.pt").exists()


def test_compare_refuses_a_lock_file_that_is_a_link(tmp_path, capsys):
    victim, out = _victim(tmp_path), tmp_path / "cmp"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    err = one_line_error(capsys, "compare", *TINY, "--attn", "se", "--seeds", "1", "--out", str(out), "--no-progress")
    assert f"{out / '.lock'} is a symbolic link" in err and victim.read_text() == "precious\n"
    with pytest.raises(FileExistsError, match="symbolic link"):  # and in Python
        compare(TrainConfig(model="lenet", image_size=28, epochs=1), ["se"], [0], out_dir=out, progress=False)
    assert victim.read_text() == "precious\n"


def test_train_refuses_a_tensorboard_folder_that_is_a_link(tiny, tmp_path):
    elsewhere, run = tmp_path / "elsewhere", tmp_path / "run"
    elsewhere.mkdir()
    run.mkdir()
    (run / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError, match=f"{run / 'tensorboard'} is a symbolic link"):
        train(tiny(epochs=1, tensorboard=True))
    assert list(elsewhere.iterdir()) == []


def test_export_refuses_an_output_path_that_is_a_link(se_copy, tmp_path, capsys):
    victim, out = _victim(tmp_path), tmp_path / "model.onnx"
    out.symlink_to(victim)
    err = one_line_error(capsys, "export", str(se_copy), "--out", str(out))
    assert f"{out} is a symbolic link" in err and victim.read_text() == "precious\n"


@pytest.mark.parametrize("writer", ["write_bytes", "save_checkpoint", "replacing"])
def test_no_writer_goes_through_a_link_or_leaves_litter(tmp_path, writer):
    victim, path = _victim(tmp_path), tmp_path / "out.pt"
    path.symlink_to(victim)
    with pytest.raises(FileExistsError, match=f"{path} is a symbolic link"):
        if writer == "write_bytes":
            files.write_bytes(path, b"x")
        elif writer == "save_checkpoint":
            save_checkpoint(path, {"epoch": 1})
        else:
            with files.replacing(path) as tmp:
                tmp.write_bytes(b"x")
    assert victim.read_text() == "precious\n" and path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "victim.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_new_files_get_the_permissions_the_umask_allows(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.write_text(tmp_path / "a.txt", "x")
        save_checkpoint(tmp_path / "b.pt", {"epoch": 1})
        with files.replacing(tmp_path / "c.onnx") as tmp:
            tmp.write_bytes(b"x")
        lock = files.open_lock_file(tmp_path / ".lock")
        os.close(lock)
    finally:
        os.umask(old)
    for name in ("a.txt", "b.pt", "c.onnx", ".lock"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_run_writes_its_files_with_the_umask(tiny, tmp_path):
    old = os.umask(0o027)
    try:
        train(tiny(epochs=1, tensorboard=True))
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"last.pt", "best.pt", "metrics.csv", "result.json", ".lock"}
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in written), [(p.name, oct(p.stat().st_mode)) for p in written]


def test_a_write_that_fails_names_the_file_and_keeps_the_old_one(tmp_path):
    """The file-size limit stands in for a full disk: torch.save's own error would be about zip positions."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError) as info:
            save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(100_000)}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG and info.value.filename == str(path)
    assert files.os_error_message(info.value) == (f"{path}: File too large. The file is larger than the file-size "
                                                  f"limit allows (ulimit -f): raise the limit or choose another path.")
    assert torch.load(path, weights_only=True)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with unwritable(run):
        err = one_line_error(capsys, "train", *TINY, "--run-dir", str(run))
    assert str(run / ".lock") in err and "Check its permissions and its folder's, or choose another path." in err


def test_a_run_folder_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = one_line_error(capsys, "train", *TINY, "--run-dir", str(tmp_path / "afile" / "run"))
    assert "Not a directory. A part of the path is a file, not a folder" in err and str(tmp_path / "afile") in err


def test_names_over_the_file_systems_limit(tmp_path, capsys):
    too_long = tmp_path / ("r" * 300)
    err = one_line_error(capsys, "train", *TINY, "--run-dir", str(too_long))
    assert f"{too_long}: File name too long. A name in it is longer than the file system allows" in err
    assert list(tmp_path.iterdir()) == []
    # a name that just fits still gets its temporary file beside it
    fits = tmp_path / ("c" * 255)
    files.write_bytes(fits, b"x")
    assert fits.read_bytes() == b"x" and list(tmp_path.iterdir()) == [fits]


def test_a_path_that_is_not_utf8_is_refused_before_anything_is_made(tmp_path, capsys):
    run = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9/run")  # latin-1 é
    err = one_line_error(capsys, "train", *TINY, "--run-dir", run)
    assert f"{tmp_path}/caf\\xe9/run/.lock: the name is not valid UTF-8 (byte 0xe9)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["export", "stats", "explain", "prune"])
def test_a_checkpoint_folder_that_cannot_be_written_is_one_line(se_copy, capsys, command):
    extra = {"prune": ["--fractions", "0", "--max-samples", "64"], "explain": ["--count", "2"]}.get(command, [])
    with unwritable(se_copy.parent):
        err = one_line_error(capsys, command, str(se_copy), *extra)
    target = {"export": "last.onnx"}.get(command, command)
    assert f"{se_copy.parent / target}: " in err and "Check its permissions and its folder's, or choose another path." in err


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_exactly(tmp_path):
    """`attnkit train` under a file-size limit its checkpoint exceeds: one line naming the file, no temporary file
    left, metrics.csv never ahead of last.pt; without the limit, --resume ends with the weights of a run never
    stopped."""
    options = [*TINY, "--model", "resnet20", "--image-size", "16", "--epochs", "2"]
    whole = subprocess.run([sys.executable, "-m", "attnkit", "train", *options, "--run-dir", str(tmp_path / "whole")],
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    size = (tmp_path / "whole" / "last.pt").stat().st_size
    run = tmp_path / "full"

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))

    full = subprocess.run([sys.executable, "-m", "attnkit", "train", *options, "--run-dir", str(run)],
                          capture_output=True, text=True, preexec_fn=limited)
    assert full.returncode == 2 and full.stderr.count("\n") == 1, full.stderr
    assert full.stderr.startswith(f"attnkit train: error: {run / 'best.pt'}: File too large.")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    resumed = subprocess.run([sys.executable, "-m", "attnkit", "train", *options, "--run-dir", str(run), "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(run / "last.pt")["model"], load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "metrics.csv").read_text().count("\n") == 3  # the header and two epochs


def test_the_command_line_turns_any_os_error_into_one_line(monkeypatch, capsys, tmp_path):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(attnkit.train, "train", no_space)
    err = one_line_error(capsys, "train", *TINY)
    assert err == (f"attnkit train: error: {tmp_path / 'x'}: No space left on device. Free some space on that disk, "
                   f"or choose a path on another one.\n")
