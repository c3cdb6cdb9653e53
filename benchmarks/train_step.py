"""The end-to-end training step (forward, cross-entropy, backward, SGD step) of a network with and without attention,
with attnkit's gate modules on their reference formulas and on the fused path, in one run.

    python benchmarks/train_step.py [--attn se,cbam,coord] [--batch 64] [--repeats 10] [--device cpu|cuda]
        [--bf16] [--channels-last] [--quick] [--markdown BENCHMARKS.md]

On CPU the network is the CIFAR ResNet-56 (input batch×3×32×32, 10 classes); with --device cuda, ResNet-50 at
224×224 (1,000 classes); --model, --size and --classes override. Every variant (plain, then each --attn
module at the paper's placement) runs in mode 'reference' and in mode 'auto' (the fused path, labelled by the
backend it picks for the activations); the 2 × variants steps take turns, step by step, and the median of
`--repeats` after `--warmup` is reported. Plain has no gate module: its two columns differ by noise alone.
SGD: lr 0.01, momentum 0.9, weight decay 5e-4. --quick: batch 4, 2 repeats after 1, for a smoke run.
"""
from __future__ import annotations

import argparse
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from modules import Report, add_common_options, check_device, fused_backend, header, in_mode, synced  # beside this
from timing import median_ms  # benchmarks/timing.py, beside this script

MODES = ("reference", "auto")


class Preset(NamedTuple):
    model: str
    size: int
    classes: int


PRESETS = {"cpu": Preset("resnet56", 32, 10), "cuda": Preset("resnet50", 224, 1000)}


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One SGD step of `model` on (x, y), under bf16 autocast if asked."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run() -> None:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def overhead(ms: float, plain_ms: float) -> str:
    return f"{100 * (ms / plain_ms - 1):+.1f}%"


def variant_steps(variants: list[str | None], name: str, classes: int, x: torch.Tensor, y: torch.Tensor,
                  bf16: bool, layout: torch.memory_format) -> list[Callable[[], None]]:
    """For each variant, its training step in mode 'reference', then in mode 'auto'."""
    steps: list[Callable[[], None]] = []
    for attn in variants:
        model = attnkit.create_model(name, attn=attn, num_classes=classes)
        step = sgd_step(model.to(x.device, memory_format=layout).train(), x, y, bf16)
        steps += [synced(in_mode(mode, step), x.device.type) for mode in MODES]
    return steps


def add_table(report: Report, variants: list[str | None], times: list[float], backend: str) -> None:
    report.add(f"| variant | reference ms | fused ({backend}) ms | fused speed-up | overhead vs plain, reference | "
               f"overhead vs plain, fused |")
    report.add("|---|---:|---:|---:|---:|---:|")
    plain_ref, plain_fused = times[0], times[1]
    for i, attn in enumerate(variants):
        ref, fused = times[2 * i], times[2 * i + 1]
        report.add(f"| {attn or 'plain'} | {ref:.1f} | {fused:.1f} | {ref / fused:.2f}× | "
                   f"{overhead(ref, plain_ref)} | {overhead(fused, plain_fused)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attn", default="se,cbam,coord", help="comma-separated modules; plain always runs")
    parser.add_argument("--model", help="create_model name (default: resnet56 on CPU, resnet50 on CUDA)")
    parser.add_argument("--size", type=int, help="input side (default: 32 on CPU, 224 on CUDA)")
    parser.add_argument("--classes", type=int, help="number of classes (default: 10 on CPU, 1000 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64, 4 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, 2 repeats after 1")
    add_common_options(parser)
    args = parser.parse_args()
    check_device(parser, args.device)
    preset = PRESETS[args.device]
    name, size, classes = args.model or preset.model, args.size or preset.size, args.classes or preset.classes
    batch = args.batch or (4 if args.quick else 64)
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=args.device).contiguous(memory_format=layout)
    y = torch.randint(classes, (batch,), device=args.device)
    # the label: the backend 'auto' picks for the smallest activation a CIFAR ResNet's gates see (its last stage)
    activation = torch.empty(batch, 64, size // 4, size // 4, device=args.device,
                             dtype=torch.bfloat16 if args.bf16 else torch.float32)
    backend = fused_backend(activation.contiguous(memory_format=layout))
    variants = [None, *args.attn.split(",")]
    steps = variant_steps(variants, name, classes, x, y, args.bf16, layout)

    numbers = f"{'bf16 autocast' if args.bf16 else 'float32'}, {'channels_last' if args.channels_last else 'NCHW'}"
    report = Report(f"Training step: {name}, reference vs fused gate modules (benchmarks/train_step.py)",
                    header(args.device, f"{name}, input {batch}×3×{size}×{size}, {numbers}",
                           f"median of {repeats} steps after {warmup}, the variants taking turns"))
    add_table(report, variants, median_ms(steps, warmup, repeats), backend)
    if args.markdown:
        report.append_to(args.markdown)


if __name__ == "__main__":
    main()
