"""What the benchmarks share: timing functions that take turns, so a slow phase of the machine affects them alike
(attnkit's median_ms, which `attnkit profile` times with too), and the name of the machine they ran on."""
from __future__ import annotations

import os
import platform
import time

from attnkit.analysis.timing import median_ms

__all__ = ["CLOCKS", "cpu_name", "load", "median_ms"]


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
