"""The gate convolution of CBAM and Triplet Attention on the CPU: a k×k 'same' convolution of two pooled maps into
one (64×2×32×32 in a CIFAR ResNet's first stage), forward and backward (both gradients), by attnkit's direct kernels
(attnkit.kernels.cpu.conv_planes) against PyTorch's convolution on NCHW maps and on channels_last ones (what
attnkit ran before: PyTorch's backward is about 3x faster from them), in one run, the three taking turns; with
--against REV, attnkit's direct kernels as of git revision REV too.

    python benchmarks/gate_conv.py [--threads 2] [--repeats 30] [--against REV] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from attnkit.kernels import cpu
from attnkit.kernels.functions import conv_planes
from modules import Report, header
from timing import attnkit_at, median_ms, short_commit  # benchmarks/timing.py, beside this script

# (N, P, H, W): CBAM's maps over H×W at the CIFAR ResNet-56's stages and MobileNetV2's 56×56 and 14×14, Triplet's
# (C, W) plane of the first CIFAR stage
SHAPES = [(64, 2, 32, 32), (64, 2, 16, 16), (64, 2, 8, 8), (32, 2, 56, 56), (32, 2, 14, 14), (64, 2, 16, 32)]


def forward_backward(maps: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor,
                     conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        m, w = maps.detach().requires_grad_(), weight.detach().requires_grad_()
        conv(m, w).backward(dout)
    return run


def torch_conv(maps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(maps, weight, padding=weight.shape[-1] // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--against", metavar="REV", help="also attnkit's direct kernels as of this git revision")
    parser.add_argument("--markdown", metavar="PATH", help="append the header and the table to PATH")
    args = parser.parse_args()
    if cpu.unavailable():
        parser.error(f"the CPU backend is unavailable: {cpu.unavailable()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.kernel_size
    against = short_commit(args.against) if args.against else None
    convs = {"direct": conv_planes, "NCHW": torch_conv, "channels_last": torch_conv,
             **({against: attnkit_at(args.against).kernels.functions.conv_planes} if against else {})}
    report = Report(f"The gate convolution of CBAM and Triplet Attention, {k}×{k}, forward+backward "
                    "(benchmarks/gate_conv.py)",
                    header("cpu", f"float32, {k}×{k} filter over 2 maps into 1", f"median of {args.repeats} after "
                           f"{args.warmup}, the implementations taking turns"))
    report.add("| maps | attnkit direct ms | torch NCHW ms | torch channels_last ms | speed-up over NCHW | over "
               "channels_last |" + (f" direct at {against} ms | speed-up over {against} |" if against else ""))
    report.add("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if against else ""))
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1, 2, k, k, generator=generator)
    for n, p, h, w in SHAPES:
        maps = torch.randn(n, p, h, w, generator=generator)
        dout = torch.randn(n, 1, h, w, generator=generator)
        last_maps = maps.contiguous(memory_format=torch.channels_last)
        runs = [forward_backward(last_maps if name == "channels_last" else maps, weight, dout, conv)
                for name, conv in convs.items()]
        direct, nchw, last, *before = median_ms(runs, args.warmup, args.repeats)
        report.add(f"| {n}×{p}×{h}×{w} | {direct:.3f} | {nchw:.3f} | {last:.3f} | {nchw / direct:.1f}× | "
                   f"{last / direct:.1f}× |" + "".join(f" {b:.3f} | {b / direct:.2f}× |" for b in before))
    if args.markdown:
        report.append_to(args.markdown)


if __name__ == "__main__":
    main()
