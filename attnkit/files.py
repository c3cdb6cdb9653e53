"""Every file attnkit writes goes through here. A file is written whole to a temporary file beside it, flushed to
disk and renamed over the old one (an atomic replace on POSIX and Windows), so a reader or a crash sees the old
file or the new one, never half of one. New files get the permissions the umask allows, as with open(). A path
that is a symbolic link is refused rather than written through or replaced, and so is a name that is not valid
UTF-8 (attnkit records paths in its checkpoints and logs, as UTF-8). Every OS error on the way is raised with the
path it is about, and `os_error_message` turns it into the one line the command line prints."""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

__all__ = ["check_path", "make_folder", "open_lock_file", "os_error_message", "printable", "remove_temporaries",
           "replacing", "write_bytes", "write_csv", "write_file", "write_json", "write_text"]

_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOSE_ON_EXEC = getattr(os, "O_CLOEXEC", 0)
_NAME_BYTES = 255  # the longest name most file systems take (ext4, XFS, APFS, NTFS in UTF-16 units)
_TEMPORARY = re.compile(r"\..*\.[0-9a-f]{12}\.tmp(\.[^.]*)?", re.DOTALL)


def printable(path: str | os.PathLike) -> str:
    """`path` as text that can be printed: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, if every name in it is valid UTF-8 (else a ValueError naming it)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{printable(path)}: the name is not valid UTF-8 (byte {os.fsencode(path)[error.start]:#04x}); "
                         f"attnkit records paths as UTF-8 text. Rename it or choose another path.") from None
    return Path(path)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link: attnkit does not write through links (that would change "
                              f"what it points to). Remove the link or choose another path.")


def _with_path(error: OSError, path: Path) -> OSError:
    """The same OS error, about `path` (a temporary file's name, or none, says nothing to the user)."""
    if error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


def make_folder(path: str | os.PathLike, own: bool = False) -> Path:
    """Create the folder `path` (and its parents) unless it exists; OS errors name the path. With `own`, the folder
    is one a run owns and fills with files it names itself: a symbolic link there is refused."""
    path = check_path(path)
    if own:
        _refuse_link(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # a file where the folder should be
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", error.filename or str(path)) from None
    return path


class _Sink:
    """A file object that remembers the OS error of a failed write: torch.save reports a full disk as a RuntimeError
    about zip positions, with the OSError only in its context."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _temporary(path: Path, suffix: str = "") -> tuple[int, Path]:
    """A new file beside `path`, '.<name>.<random>.tmp<suffix>', its name cut to fit the file system's limit."""
    room = _NAME_BYTES - len(".") - len(".0123456789ab.tmp") - len(os.fsencode(suffix))
    stem = os.fsencode(path.name)[:room].decode("utf-8", "ignore")
    while True:
        tmp = path.with_name(f".{stem}.{secrets.token_hex(6)}.tmp{suffix}")
        try:  # mode 0o666 less the umask, as open() would create it; O_EXCL: never an existing file or link
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _CLOSE_ON_EXEC, 0o666), tmp
        except FileExistsError:
            continue


def remove_temporaries(folder: Path) -> None:
    """Remove the temporary files that writers killed half-way left in `folder`."""
    for leftover in folder.iterdir():
        if _TEMPORARY.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def _start(path: str | os.PathLike, suffix: str = "") -> tuple[Path, int, Path]:
    """Checks `path`, creates its folder and a temporary file beside it."""
    path = check_path(path)
    make_folder(path.parent)
    _refuse_link(path)
    try:
        return (path, *_temporary(path, suffix))
    except OSError as error:
        raise _with_path(error, path) from None


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that take a file name, not a file: a temporary file beside `path` to write (its name ends as
    `path`'s does), which replaces `path` when the block ends without an error, and is removed when it raises. As
    write_file otherwise."""
    path, fd, tmp = _start(path, Path(path).suffix)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | _CLOSE_ON_EXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _with_path(error, path) from error
        raise
    _sync_folder(path.parent)


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write `path` atomically: `write(f)` fills a temporary file beside it, which then replaces `path`. The folder
    is created if needed. A symbolic link at `path` is refused; OS errors name `path`."""
    path, fd, tmp = _start(path)
    sink = None
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = error if isinstance(error, OSError) else sink.error if sink is not None else None
        if cause is not None:
            raise _with_path(cause, path) from error
        raise
    _sync_folder(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_file(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[Sequence[Any]]) -> Path:
    """`rows` (the header first) as a CSV file."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    return write_text(path, text.getvalue())


def open_lock_file(path: str | os.PathLike) -> int:
    """A descriptor of the lock file `path`, created if missing (read-write). Refused with a FileExistsError: a
    symbolic link, a hard link to another file, or anything but a regular file, which writing a process id into
    would change something else."""
    path = check_path(path)
    make_folder(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW | _CLOSE_ON_EXEC | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP or path.is_symlink():
            _refuse_link(path)
        raise _with_path(error, path) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise FileExistsError(f"{path} is {what}: attnkit writes its process id into this lock file and will not "
                              f"change another file. Remove {path} or choose another folder.")
    return fd


_ADVICE = {
    errno.EACCES: "Check its permissions and its folder's, or choose another path.",
    errno.EPERM: "Check its permissions and its folder's, or choose another path.",
    errno.EROFS: "The file system is read-only: choose a path on a writable one.",
    errno.ENOSPC: "Free some space on that disk, or choose a path on another one.",
    getattr(errno, "EDQUOT", errno.ENOSPC): "Free some space on that disk, or choose a path on another one.",
    errno.EFBIG: "The file is larger than the file-size limit allows (ulimit -f): raise the limit or choose another "
                 "path.",
    errno.ENAMETOOLONG: f"A name in it is longer than the file system allows (usually {_NAME_BYTES} bytes): "
                        f"choose a shorter one.",
    errno.ENOTDIR: "A part of the path is a file, not a folder: choose another path.",
    errno.EISDIR: "It is a folder: give the path of a file.",
    errno.ELOOP: "It is a symbolic link, or a loop of them: remove the link or choose another path.",
    errno.ENOENT: "Check the path.",
    errno.EIO: "The device reported an input/output error: check the disk.",
}


def os_error_message(error: OSError) -> str:
    """One line for an OS error: the path it is about, what went wrong, and what to do."""
    if error.errno is None:  # attnkit's own errors carry their message whole
        return str(error)
    where = "" if error.filename is None else printable(error.filename) + ": "
    if error.filename2 is not None:
        where = f"{printable(error.filename)} -> {printable(error.filename2)}: "
    return f"{where}{error.strerror or os.strerror(error.errno)}. {_ADVICE.get(error.errno, '')}".rstrip()
