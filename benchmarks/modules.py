"""Attention modules against the memory-traffic floor: forward and forward+backward time of attnkit's modules, timm's
where timm has the same module, and torch.compile of attnkit's, at network-sized shapes, in one run.

    python benchmarks/modules.py [--shapes r50-s3-b32,mbv2-b32,r50-s3-b1] [--modules se,eca,cbam] [--repeats 15]

The floor: a gate module reads x to pool it, then reads x and writes y: 3|x| bytes forward; backward reads dy
and x to reduce and reads dy again to write dx: 4|x| more (7|x| in all). CBAM, Coordinate Attention and
Triplet Attention pool twice or along two axes: 4|x| forward, 8|x| in all. The bandwidth is that of a copy of
x measured in the same run; each figure is printed as milliseconds and as a multiple of its floor.

The glibc allocator decides much of the backward's cost on CPU (fresh mmaps for full-size temporaries are zeroed
by the kernel every time): the header states the regime; run once as is and once with
MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=1000000000000 to see both.
"""
from __future__ import annotations

import argparse
import os
import platform
from typing import Callable

import torch
from torch import nn

import attnkit
from timing import median_ms  # benchmarks/timing.py, beside this script

SHAPES = {  # name: N×C×H×W
    "r50-s3-b32": (32, 512, 28, 28),  # SE-ResNet-50, stage 3 (conv3_x), batch 32
    "r50-s3-b64": (64, 512, 28, 28),
    "mbv2-b32": (32, 144, 56, 56),  # MobileNetV2 / EfficientNet-B0, the expanded 56×56 block, batch 32
    "r50-s3-b1": (1, 512, 28, 28),  # batch-1 inference
}
TWO_POOLS = {"cbam", "coord", "triplet"}  # floor 4|x| forward, 8|x| forward+backward


def timm_module(name: str, channels: int, hw: tuple[int, int]) -> nn.Module | None:
    """timm's module computing the same function as attnkit's default (as the parity tests configure it)."""
    from timm.layers.cbam import CbamModule
    from timm.layers.coord_attn import CoordAttn
    from timm.layers.eca import EcaModule
    from timm.layers.squeeze_excite import SEModule

    if name == "se":
        return SEModule(channels, rd_channels=channels // 16)
    if name == "eca":
        return EcaModule(channels=channels)
    if name == "cbam":
        return CbamModule(channels, rd_channels=channels // 16)
    if name == "coord":
        return CoordAttn(channels, rd_channels=max(8, channels // 32))
    return None


def attnkit_module(name: str, channels: int, hw: tuple[int, int]) -> nn.Module:
    if name == "ge-theta":
        return attnkit.create("ge", channels, variant="theta", spatial_size=hw)
    return attnkit.create(name, channels)


def forward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)
    return run


def forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    xg = x.detach().requires_grad_()

    def run() -> None:
        xg.grad = None
        for p in module.parameters():
            p.grad = None
        module(xg).backward(dy)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="r50-s3-b32,mbv2-b32,r50-s3-b1", help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--modules", default="se,eca,srm,ge,ge-theta,cbam,coord,triplet")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    args = parser.parse_args()

    torch.manual_seed(0)
    regime = "reuse (MALLOC_MMAP_THRESHOLD_ set)" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc default"
    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"fp32, torch {torch.__version__}; allocator: {regime}; median of {args.repeats} after {args.warmup}\n")
    print("| shape | module | impl | fwd ms | fwd × floor | fwd+bwd ms | fwd+bwd × floor |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape_name in args.shapes.split(","):
        n, c, h, w = SHAPES[shape_name]
        x = torch.randn(n, c, h, w)
        dy = torch.randn_like(x)
        copy = torch.empty_like(x)
        (copy_ms,) = median_ms([lambda: copy.copy_(x)], args.warmup, args.repeats)
        bandwidth = 2 * x.nbytes / (copy_ms / 1e3)  # bytes/s: a copy reads and writes |x|
        print(f"| {shape_name} {n}×{c}×{h}×{w} | copy | {x.nbytes / 2**20:.1f} MiB | {copy_ms:.2f} | "
              f"{bandwidth / 1e9:.1f} GB/s | | |", flush=True)
        for name in args.modules.split(","):
            impls = {"attnkit": attnkit_module(name, c, (h, w)).train()}
            theirs = timm_module(name, c, (h, w))
            if theirs is not None:
                impls["timm"] = theirs.train()
            if args.compile:
                impls["attnkit compiled"] = torch.compile(attnkit_module(name, c, (h, w)).train())
            passes = (4, 8) if name in TWO_POOLS else (3, 7)
            floors = [p * x.nbytes / bandwidth * 1e3 for p in passes]
            fwd = median_ms([forward(m, x) for m in impls.values()], args.warmup, args.repeats)
            both = median_ms([forward_backward(m, x, dy) for m in impls.values()], args.warmup, args.repeats)
            for impl, f, b in zip(impls, fwd, both):
                print(f"| {shape_name} | {name} | {impl} | {f:.2f} | {f / floors[0]:.1f} | {b:.2f} | {b / floors[1]:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
