"""The CPU backend's primitives one by one, against a copy of the map timed in the same run: where a module's time
goes below the module, at the shapes of benchmarks/modules.py.

    python benchmarks/primitives.py [--family se|coord|cbam] [--shapes r56-s1,r56-s2,r56-s3] [--threads 2]
        [--channels-last] [--dtype float32|bfloat16] [--repeats 30] [--against REV] [--markdown BENCHMARKS.md]

Each primitive of the family (the functions of attnkit/kernels/backend.py: the pools, the scaling with and without a
block's end, the backward reductions and dx) runs on random inputs of the shape; the table gives its median time and
that time over the copy's (a pass that reads and writes the map once). --against REV times attnkit's CPU backend as of
git revision REV too (timing.py's attnkit_at), the two versions' calls taking turns in the same process.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor

from attnkit.kernels import cpu
from modules import DTYPES, SHAPES, Report, header
from timing import attnkit_at, median_ms, short_commit  # benchmarks/timing.py, beside this script


def calls(family: str, x: Tensor) -> dict[str, Callable[..., object]]:
    """name -> function(backend) calling that primitive on inputs shaped for x (NCHW or channels_last as x is)."""
    n, c, h, w = x.shape
    r, dy = torch.randn_like(x), torch.randn_like(x)  # in x's memory format (randn_like preserves a dense one)

    def f(*shape: int) -> Tensor:
        return torch.rand(shape) + 0.5

    if family == "se":
        g, a = f(n, c), f(n, c)
        y = cpu.scale_c_add(x, g, r, True)
        return {"pool_hw": lambda ops: ops.pool_hw(x, False), "scale_c": lambda ops: ops.scale_c(x, g),
                "scale_c_add relu": lambda ops: ops.scale_c_add(x, g, r, True), "dot_hw": lambda ops: ops.dot_hw(dy, x),
                "dot_hw_relu": lambda ops: ops.dot_hw_relu(dy, y, x), "grad_c": lambda ops: ops.grad_c(dy, g, a)}
    if family == "coord":
        ah, aw, bh, bw = f(n, c, h), f(n, c, w), f(n, c, h), f(n, c, w)
        return {"pool_h_w": lambda ops: ops.pool_h_w(x), "scale_hw": lambda ops: ops.scale_hw(x, ah, aw),
                "scale_hw_add relu": lambda ops: ops.scale_hw_add(x, ah, aw, r, True),
                "dot_h_w": lambda ops: ops.dot_h_w(dy, x, ah, aw), "grad_hw": lambda ops: ops.grad_hw(dy, ah, aw, bh, bw)}
    mc, ms, u, v, a, b = f(n, c), f(n, h, w), f(n, h, w), f(n, h, w), f(n, c), f(n, c)
    argc, arghw = torch.randint(0, c, (n, h, w)), torch.randint(0, h * w, (n, c))
    return {"pool_hw_avgmax": lambda ops: ops.pool_hw_avgmax(x), "pool_c_gated": lambda ops: ops.pool_c_gated(x, mc),
            "scale_cs": lambda ops: ops.scale_cs(x, mc, ms),
            "scale_cs_add relu": lambda ops: ops.scale_cs_add(x, mc, ms, r, True),
            "dot_cs": lambda ops: ops.dot_cs(dy, x, mc, ms),
            "grad_cs": lambda ops: ops.grad_cs(dy, mc, ms, u, v, argc, a, b, arghw)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="coord", choices=("se", "coord", "cbam"))
    parser.add_argument("--shapes", default="r56-s1,r56-s2,r56-s3", help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, help="torch threads, which the kernels use too (default: torch's)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--against", metavar="REV", help="also attnkit's CPU backend as of this git revision")
    parser.add_argument("--markdown", metavar="PATH", help="append the header and tables to PATH")
    args = parser.parse_args()
    if unknown := [s for s in args.shapes.split(",") if s not in SHAPES]:
        parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if cpu.unavailable():
        parser.error(f"the CPU backend is unavailable: {cpu.unavailable()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = {"now": cpu}
    if args.against:
        backends[f"at {short_commit(args.against)}"] = attnkit_at(args.against).kernels.cpu
    layout = "channels_last" if args.channels_last else "NCHW"
    report = Report(f"CPU primitives of {args.family} against a copy (benchmarks/primitives.py)",
                    header("cpu", f"{args.dtype}, {layout}", f"median of {args.repeats} calls after {args.warmup}, "
                           "the calls taking turns"))
    others = [k for k in backends if k != "now"]
    report.add(f"| shape | primitive | ms | × copy |{''.join(f' {k} ms | now / {k} |' for k in others)}")
    report.add("|---|---|---:|---:|" + "---:|---:|" * len(others))
    for name in args.shapes.split(","):
        torch.manual_seed(0)
        x = torch.randn(SHAPES[name]).to(DTYPES[args.dtype])
        x = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
        (copy,) = median_ms([lambda: x.clone()], args.warmup, args.repeats)
        report.add(f"| {name} {'×'.join(map(str, x.shape))} | copy | {copy:.3f} | 1.0 |" + " | |" * len(others))
        for primitive, call in calls(args.family, x).items():
            times = dict(zip(backends, median_ms([lambda ops=ops: call(ops) for ops in backends.values()],
                                                 args.warmup, args.repeats)))
            cells = "".join(f" {times[k]:.3f} | {times['now'] / times[k]:.2f} |" for k in others)
            report.add(f"| | {primitive} | {times['now']:.3f} | {times['now'] / copy:.1f} |{cells}")
    if args.markdown:
        report.append_to(args.markdown)


if __name__ == "__main__":
    main()
