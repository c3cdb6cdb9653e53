"""Timing that takes turns: each function runs once per round, so a slow phase of the machine affects them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

__all__ = ["median_ms"]


def median_ms(fns: Sequence[Callable[[], object]], warmup: int, repeats: int,
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
