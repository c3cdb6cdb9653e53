"""Where the fused CPU path pays, and what mode 'auto' makes of it: for each gate module, its time in mode 'auto' and
on the fused path (mode 'cpu') over its time on the reference formulas (mode 'reference'), forward in eval mode
without autograd and forward+backward in training, at input sizes from 32 KiB to 2 MiB, in one run. While autograd
records, 'auto' takes the fused path from attnkit.kernels.dispatch.CPU_MIN_BYTES and the fast formulas below it;
this is the measurement that sets it.

    python benchmarks/threshold.py [--modules se,eca,srm,ge,cbam,coord,triplet] [--repeats 30] [--threads N]
        [--clock wall|cpu] [--markdown BENCHMARKS.md]

The three modes take turns, run by run; a ratio below 1 means faster than the reference formulas.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

import attnkit
from attnkit.kernels import dispatch
from modules import Report, header, in_mode  # beside this script
from timing import CLOCKS, median_ms  # benchmarks/timing.py, beside this script

SHAPES = [(2, 16, 16, 16), (4, 32, 16, 16), (64, 16, 8, 8), (64, 64, 5, 5), (8, 64, 16, 16), (64, 32, 10, 10),
          (8, 64, 32, 32)]
MODES = ("reference", "auto", "cpu")


def evaluation(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module.eval()(x)
    return run


def training(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    xg = x.detach().requires_grad_()

    def run() -> None:
        xg.grad = None
        module.train()(xg).backward(dy)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", default="se,eca,srm,ge,cbam,coord,triplet")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS), help="wall clock or process CPU time")
    parser.add_argument("--markdown", metavar="PATH", help="append the header and table to PATH")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.modules.split(",")

    torch.manual_seed(0)
    report = Report("Where the fused CPU path pays: auto and fused over reference (benchmarks/threshold.py)",
                    header("cpu", "float32, NCHW; each cell: auto ; fused, eval forward | training forward+backward",
                           f"{args.clock} clock, median of {args.repeats} after {args.warmup}"))
    report.add(f"While autograd records, 'auto' takes the fused path from {dispatch.CPU_MIN_BYTES // 1024} KiB "
               f"(attnkit.kernels.dispatch.CPU_MIN_BYTES).")
    report.add()
    report.add(f"| input | KiB | {' | '.join(names)} |")
    report.add("|---|---:|" + "---:|" * len(names))
    worst = 0.0
    for shape in SHAPES:
        x = torch.randn(shape)
        dy = torch.randn_like(x)
        cells = []
        for name in names:
            module = attnkit.create(name, shape[1])
            fns = [in_mode(mode, fn) for fn in (evaluation(module, x), training(module, x, dy)) for mode in MODES]
            ref_eval, auto_eval, fused_eval, ref_train, auto_train, fused_train = median_ms(
                fns, args.warmup, args.repeats, CLOCKS[args.clock])
            worst = max(worst, auto_eval / ref_eval, auto_train / ref_train)
            cells.append(f"{auto_eval / ref_eval:.2f} ; {fused_eval / ref_eval:.2f} \\| "
                         f"{auto_train / ref_train:.2f} ; {fused_train / ref_train:.2f}")
        report.add(f"| {'×'.join(map(str, shape))} | {x.nbytes // 1024} | {' | '.join(cells)} |")
    report.add()
    report.add(f"'auto' over reference, largest: {worst:.2f}.")
    if args.markdown:
        report.append_to(args.markdown)


if __name__ == "__main__":
    main()
