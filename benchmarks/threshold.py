"""Where the fused CPU path starts to pay: for each gate module, its time on the fused path over its time on the
reference formulas, forward in eval mode and forward+backward in training, at input sizes from 32 KiB to 24.5 MiB,
in one run. Below attnkit.kernels.dispatch.CPU_MIN_BYTES, mode 'auto' takes the reference formulas; this is the
measurement that sets it.

    python benchmarks/threshold.py [--modules se,eca,srm,cbam,coord,triplet] [--repeats 30] [--markdown BENCHMARKS.md]

Both paths are timed in forced modes ('cpu' and 'reference'), taking turns; a ratio below 1 means the fused path is
faster.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

import attnkit
from attnkit.kernels import dispatch
from modules import Report, header, in_mode  # beside this script
from timing import median_ms  # benchmarks/timing.py, beside this script

SHAPES = [(2, 16, 16, 16), (4, 32, 16, 16), (8, 64, 16, 16), (8, 64, 32, 32), (16, 128, 32, 32), (32, 256, 28, 28)]


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
    parser.add_argument("--modules", default="se,eca,srm,cbam,coord,triplet")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--markdown", metavar="PATH", help="append the header and table to PATH")
    args = parser.parse_args()
    names = args.modules.split(",")

    torch.manual_seed(0)
    report = Report("Where the fused CPU path pays: fused / reference time (benchmarks/threshold.py)",
                    header("cpu", "float32, NCHW; each cell: eval forward ; training forward+backward",
                           f"median of {args.repeats} after {args.warmup}"))
    report.add(f"'auto' takes the fused path from {dispatch.CPU_MIN_BYTES / 2**20:g} MiB "
               f"(attnkit.kernels.dispatch.CPU_MIN_BYTES).")
    report.add()
    report.add(f"| input | KiB | {' | '.join(names)} |")
    report.add("|---|---:|" + "---:|" * len(names))
    for shape in SHAPES:
        x = torch.randn(shape)
        dy = torch.randn_like(x)
        cells = []
        for name in names:
            module = attnkit.create(name, shape[1])
            fns = [in_mode(mode, fn) for fn in (evaluation(module, x), training(module, x, dy))
                   for mode in ("cpu", "reference")]
            fused_eval, ref_eval, fused_train, ref_train = median_ms(fns, args.warmup, args.repeats)
            cells.append(f"{fused_eval / ref_eval:.2f} ; {fused_train / ref_train:.2f}")
        report.add(f"| {'×'.join(map(str, shape))} | {x.nbytes // 1024} | {' | '.join(cells)} |")
    if args.markdown:
        report.append_to(args.markdown)


if __name__ == "__main__":
    main()
