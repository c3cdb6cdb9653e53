"""What the benchmarks share: timing functions that take turns, so a slow phase of the machine affects them alike
(attnkit's median_ms, which `attnkit profile` times with too), the name of the machine they ran on, and attnkit as of
a git revision, for --against."""
from __future__ import annotations

import atexit
import functools
import importlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

from attnkit.analysis.timing import median_ms

__all__ = ["CLOCKS", "REPO", "attnkit_at", "cpu_name", "load", "median_ms", "short_commit"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# how the benchmarks time a run: the wall clock, or the process's CPU time, which on a machine shared with other
# work leaves out the time the process waits for a core (with one thread; with more it counts their waits too)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def load() -> str:
    """The machine's load averages over 1, 5 and 15 minutes, where the platform has them."""
    try:
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def short_commit(revision: str) -> str:
    """git's short name of the commit `revision` names in this repository."""
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", revision], capture_output=True, text=True,
                          check=True).stdout.strip()


@functools.lru_cache(maxsize=None)
def attnkit_at(revision: str) -> ModuleType:
    """attnkit as of git `revision`: its attnkit/ folder from `git archive`, imported as the package
    attnkit_at_<commit> beside the working tree's attnkit (kept until the process ends)."""
    commit = short_commit(revision)
    folder = Path(tempfile.mkdtemp(prefix="attnkit-against-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "attnkit"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    name = f"attnkit_at_{commit}"
    (folder / "attnkit").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)
