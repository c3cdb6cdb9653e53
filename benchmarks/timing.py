"""What the benchmarks share: timing functions that take turns, so a slow phase of the machine affects them alike, and
the name of the machine they ran on."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


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


def median_ms(fns: list[Callable[[], object]], warmup: int, repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median milliseconds of each function over `repeats` runs after `warmup` untimed ones, by `clock` (the wall
    clock, or e.g. time.process_time); the functions take turns, run by run."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, runs in zip(fns, times):
            start = clock()
            fn()
            runs.append(1e3 * (clock() - start))
    return [statistics.median(runs) for runs in times]
