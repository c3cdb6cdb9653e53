"""One training process per run folder, and one comparison per comparison folder. `run_dir/.lock` is held with
an exclusive advisory lock (flock) for the whole run, so a second `attnkit train` on the same folder refuses at
once instead of interleaving checkpoints (a second `attnkit compare`, instead of interleaving its summary);
the operating system drops the lock when its process ends, even by SIGKILL, so no stale lock ever blocks a
resume. Temporary files that a killed writer left behind are removed when the lock is taken."""
from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from ..files import open_lock_file, remove_temporaries

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None

__all__ = ["RunFolderBusy", "RunFolderLock"]


class RunFolderBusy(FileExistsError):
    """Another process is training in this run folder."""


class RunFolderLock:
    """Held by one `owner` (the command, for the message) at a time; `option` is the flag that picks another folder."""

    def __init__(self, run_dir: Path, owner: str = "attnkit train", option: str = "--run-dir") -> None:
        self.run_dir = run_dir
        self.owner, self.option = owner, option
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunFolderLock":
        self.fd = open_lock_file(self.path)  # never a link: the process id written into it would land elsewhere
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(self.fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(self.fd)
                self.fd = None
                raise RunFolderBusy(
                    f"{self.run_dir} is in use by another {self.owner} (pid {owner}). Wait for it to finish, "
                    f"or give this one another {self.option}."
                ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        remove_temporaries(self.run_dir)  # half-written by a process that was killed
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
