"""median_ms: the functions take turns, each round starting one later, so that none always follows the same one; the
median of each function's own runs, by the clock given."""
from __future__ import annotations

import itertools

from attnkit.analysis.timing import median_ms


def test_each_function_follows_each_other_equally_often():
    order: list[str] = []
    fns = [lambda name=name: order.append(name) for name in "abc"]
    median_ms(fns, warmup=1, repeats=6)
    timed = order[3:]  # after one warm-up run of each
    assert sorted(timed) == sorted("abc" * 6)
    pairs = [p for p in itertools.pairwise(timed) if p[0] != p[1]]
    predecessors = {name: [a for a, b in pairs if b == name] for name in "abc"}
    assert all(sorted(set(before)) == sorted(set("abc") - {name}) for name, before in predecessors.items())
    assert [timed[3 * r] for r in range(6)] == list("abcabc")  # round r starts with function r mod 3


def test_the_median_of_each_functions_own_runs():
    now = [0.0]  # the clock: seconds the functions have "taken"

    def taking(*durations: float):
        runs = iter(durations)

        def run() -> None:
            now[0] += next(runs)
        return run

    fast, slow = taking(1, 1, 9), taking(3, 30, 3)  # one outlier each, which the median leaves out
    assert median_ms([fast, slow], warmup=0, repeats=3, clock=lambda: now[0]) == [1000.0, 3000.0]
