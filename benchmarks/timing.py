"""What the benchmarks share: timing functions that take turns, so a slow phase of the machine affects them alike, and
the name of the machine they ran on."""
from __future__ import annotations

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


def median_ms(fns: list[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """Median milliseconds of each function over `repeats` runs after `warmup` untimed ones; the functions take
    turns, run by run."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, runs in zip(fns, times):
            start = time.perf_counter()
            fn()
            runs.append(1e3 * (time.perf_counter() - start))
    return [statistics.median(runs) for runs in times]
