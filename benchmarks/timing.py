"""What the benchmarks share: timing functions that take turns, so a slow phase of the machine affects them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


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
