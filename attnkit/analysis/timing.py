"""Timing that takes turns: each function runs once per round, so a slow phase of the machine affects them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

__all__ = ["median_ms"]


def median_ms(fns: Sequence[Callable[[], object]], warmup: int, repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median milliseconds of each function over `repeats` runs after `warmup` untimed ones, by `clock` (the wall
    clock, or e.g. time.process_time); the functions take turns, run by run, each round starting one function later
    than the last, so that none always runs after the same one (whose caches and freed memory it would inherit: on the
    2-core machine of BENCHMARKS.md the same code measured 1.15× slower in the place after the reference formulas)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        for i in range(len(fns)):
            k = (round_ + i) % len(fns)
            start = clock()
            fns[k]()
            times[k].append(1e3 * (clock() - start))
    return [statistics.median(runs) for runs in times]
