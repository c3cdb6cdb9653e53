"""Checkpoints that a crash cannot corrupt: written to a temporary file in the same folder, flushed to disk,
then renamed over the old one (an atomic replace on POSIX and Windows), so a reader sees the old file or the
new one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_bytes", "load_checkpoint", "save_checkpoint", "write_json_atomic"]

FORMAT = "attnkit-train-1"


def _replace_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _replace_atomically(Path(path), lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, default=str) + "\n").encode())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    _replace_atomically(Path(path), lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (tensors and plain values only: weights_only loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = next(iter(str(error).strip().splitlines()), "")  # torch's own message runs over many lines
        raise ValueError(f"{path} is not a readable attnkit checkpoint ({type(error).__name__}: {reason}).") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not an attnkit training checkpoint: expected format {FORMAT!r}, found {found!r}.")
    return state
