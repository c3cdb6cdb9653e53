"""The end-to-end training step (forward, cross-entropy, backward, SGD step) of a network without attention and with
each gate module, in one run: what attention costs over the plain network, with attnkit's modules in mode 'auto'
(the default: fused kernels or the fast eager formulas) and in mode 'reference', and with timm's module of the same
function in the same places, where timm has one.

    python benchmarks/train_step.py [--net resnet56|resnet20-compare|mobilenet_v2|resnet50|resnet50-224|
                                           torchvision-resnet50|timm-resnet50]
        [--attn se,eca,srm,ge,cbam,coord,triplet] [--batch 64] [--size 32] [--threads 2] [--clock wall|cpu]
        [--repeats 10] [--device cpu|cuda] [--bf16] [--channels-last] [--separate] [--no-timm] [--runs K]
        [--against REV] [--quick] [--markdown BENCHMARKS.md]

The networks (--net; --model, --size, --batch, --in-chans and --classes override): the CIFAR ResNet-56 (64×3×32×32,
the CPU default), the default `attnkit compare`'s ResNet-20 (64×1×20×20, the cluttered digits), MobileNetV2
(32×3×112×112), ResNet-50 (16×3×128×128; at 224×224 the CUDA default), and torchvision's and timm's ResNet-50
(16×3×128×128). Every variant (plain, then each module placed by attach() as its paper places it: attnkit 'auto',
attnkit 'reference', timm's module registered for attach() to place) is a model of its own; their steps take turns,
step by step, and the median of `--repeats` after `--warmup` is reported, with each variant's overhead over plain.
--clock cpu times the process's CPU time instead of the wall clock: on a machine shared with other work, with one
thread, it leaves out the time the process waits for a core. SGD: lr 0.01, momentum 0.9, weight decay 5e-4.
--quick: batch 4, 2 repeats after 1, for a smoke run. --runs K repeats the whole measurement in K fresh processes
and reports, for each variant, the median over the runs and their range: on a shared VM the overheads of one
process move by up to ten points from run to run (where each variant's tensors land, the allocator's page faults),
which the steps of one process do not average out. --separate adds attnkit 'auto' with the residual blocks of the
ResNets (attnkit's, torchvision's, timm's) ending as separate operations (the gate, the addition, the ReLU), which by default SE, ECA, SRM and
GE θ⁻ fuse into their own passes (attnkit.surgery.gating.residual_end): what that fusion saves, in one run.
--against REV adds attnkit 'auto' as of git revision REV (its attnkit/ folder, imported beside the working tree's as a
package of its own): a change's effect measured in one process, step by step against the same plain network, which
runs of the two versions one after the other cannot resolve on a machine whose speed drifts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit.registry import BASELINE
from attnkit.surgery.endings import ending_of
from modules import Report, add_common_options, check_device, header, in_mode, synced, timm_module
from timing import CLOCKS, attnkit_at, median_ms, short_commit  # benchmarks/timing.py, beside this script


class Net(NamedTuple):
    model: str
    size: int
    batch: int
    in_chans: int
    classes: int


NETS = {
    "resnet56": Net("resnet56", 32, 64, 3, 10),
    "resnet20-compare": Net("resnet20", 20, 64, 1, 10),  # attnkit compare's defaults: cluttered digits, batch 64
    "mobilenet_v2": Net("mobilenet_v2", 112, 32, 3, 1000),
    "resnet50": Net("resnet50", 128, 16, 3, 1000),
    "resnet50-224": Net("resnet50", 224, 32, 3, 1000),
    "torchvision-resnet50": Net("torchvision:resnet50", 128, 16, 3, 1000),
    "timm-resnet50": Net("timm:resnet50", 128, 16, 3, 1000),
}
DEFAULT_NET = {"cpu": "resnet56", "cuda": "resnet50-224"}


class Variant(NamedTuple):
    label: str  # plain, or the module and its implementation
    attn: str | None
    impl: str  # "auto", "separate", "reference" or "timm"


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


def timm_spec(name: str) -> str | None:
    """The registry name under which timm's module of the same function as attnkit's `name` is registered here (for
    attach() to place it where it places attnkit's), or None where timm has no such module."""
    if timm_module(name, 16, (1, 1)) is None:
        return None
    spec = f"timm_{name}"
    if spec not in attnkit.list_modules():
        def factory(channels: int) -> nn.Module:
            return timm_module(name, channels, (1, 1))
        attnkit.register(spec)(factory)
    return spec


class SeparateReLU(nn.ReLU):
    """nn.ReLU under another class, which attnkit.surgery.gating.residual_end does not fuse into the gate."""


def with_blocks_ending_apart(model: nn.Module) -> nn.Module:
    """`model` with its residual blocks ending as the separate operations (gate, addition, ReLU), in place: the ReLU
    that ends each block of the classes attnkit ends in the gate's pass (attnkit.surgery.endings.ENDINGS) becomes a
    SeparateReLU."""
    for block in model.modules():
        ending = ending_of(block)
        if ending is not None and isinstance(getattr(block, ending.activation), nn.ReLU):
            setattr(block, ending.activation, SeparateReLU(inplace=getattr(block, ending.activation).inplace))
    return model


def plain_network(net: Net) -> nn.Module:
    """The network `net.model` names: attnkit's (create_model), or 'torchvision:NAME' or 'timm:NAME'."""
    source, _, name = net.model.rpartition(":")
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, num_classes=net.classes)
    if source == "timm":
        import timm

        return timm.create_model(name, num_classes=net.classes, in_chans=net.in_chans)
    return attnkit.create_model(name, num_classes=net.classes, in_chans=net.in_chans)


def build(variant: Variant, net: Net, against: str | None = None) -> nn.Module | None:
    """The variant's network: plain, or with attnkit's module (as create_model places it: attach(), paper
    initialisation), or with timm's module of the same function in the same places, or with the module as attnkit at
    git revision `against` places it."""
    model = plain_network(net)
    attn = timm_spec(variant.attn) if variant.impl == "timm" else variant.attn
    if variant.attn is not None and attn is None:
        return None
    if attn is not None:
        (attnkit_at(against) if variant.impl == "against" else attnkit).attach(model, attn)
    return with_blocks_ending_apart(model) if variant.impl == "separate" else model


def overhead_over_runs(runs: list[dict[str, float]], label: str) -> str:
    """The median over the runs of a variant's overhead over plain, and their range when there are several runs."""
    each = sorted(100 * (run[label] / run[BASELINE] - 1) for run in runs)
    median = f"{statistics.median(each):+.1f}%"
    return median if len(each) == 1 else f"{median} ({each[0]:+.1f} to {each[-1]:+.1f})"


IMPLS = {"auto": "attnkit auto", "separate": "auto, blocks ending apart", "reference": "attnkit reference",
         "timm": "timm", "against": "auto at --against"}


def add_table(report: Report, names: list[str], impls: tuple[str, ...], runs: list[dict[str, float]]) -> None:
    """Each variant's median step time over the runs and its overhead over plain (`overhead_over_runs`); runs map a
    variant's label to its median step in ms."""
    report.add(f"| module | {' | '.join(f'{IMPLS[i]} ms' for i in impls)} | overhead over plain: "
               f"{' | '.join(i if k else IMPLS[i].split()[-1] for k, i in enumerate(impls))} |")
    report.add("|---|" + "---:|" * (2 * len(impls)))
    report.add(f"| plain | {statistics.median(run[BASELINE] for run in runs):.1f} |" + " |" * (2 * len(impls) - 1))
    for name in names:
        labels = [f"{name} {impl}" if f"{name} {impl}" in runs[0] else None for impl in impls]
        cells = [f"{statistics.median(run[label] for run in runs):.1f}" if label else "—" for label in labels]
        cells += [overhead_over_runs(runs, label) if label else "—" for label in labels]
        report.add(f"| {name} | {' | '.join(cells)} |")


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options `names` and their values (as `--name value` or `--name=value`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


def runs_in_fresh_processes(count: int) -> list[dict[str, float]]:
    """This script's measurement `count` times, each in a process of its own: each variant's median step in ms."""
    argv = without_options(sys.argv[1:], ("--runs", "--markdown", "--json"))
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(count):
            path = f"{folder}/run{i}.json"
            subprocess.run([sys.executable, sys.argv[0], *argv, "--json", path], check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                runs.append(json.load(f))
            print(f"run {i + 1} of {count}: done", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=tuple(NETS), help="the network and its input (default: resnet56 on CPU, "
                        "resnet50-224 on CUDA)")
    parser.add_argument("--attn", default="se,eca,srm,ge,cbam,coord,triplet", help="comma-separated modules; plain "
                        "always runs")
    parser.add_argument("--model", help="create_model name (or torchvision:NAME, timm:NAME), instead of the network's")
    parser.add_argument("--size", type=int, help="input side, instead of the network's")
    parser.add_argument("--batch", type=int, help="batch size, instead of the network's (4 with --quick)")
    parser.add_argument("--in-chans", type=int, help="input channels, instead of the network's")
    parser.add_argument("--classes", type=int, help="number of classes, instead of the network's")
    parser.add_argument("--no-timm", dest="timm", action="store_false", help="leave out timm's modules")
    parser.add_argument("--separate", action="store_true", help="also attnkit 'auto' with the residual blocks ending "
                        "as separate operations (residual_end unfused), to measure what fusing the ends saves")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS), help="wall clock or process CPU time")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--against", metavar="REV", help="also attnkit 'auto' as of this git revision, in the same "
                        "process")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, 2 repeats after 1")
    parser.add_argument("--runs", type=int, default=1, help="repeat the measurement in this many fresh processes and "
                        "report the median over them and their range")
    parser.add_argument("--json", metavar="PATH", help=argparse.SUPPRESS)  # a run's step times, for --runs
    add_common_options(parser)
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = NETS[args.net or DEFAULT_NET[args.device]]
    net = Net(args.model or preset.model, args.size or preset.size, args.batch or (4 if args.quick else preset.batch),
              args.in_chans or preset.in_chans, args.classes or preset.classes)
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    names = args.attn.split(",")
    impls = ("auto", *(("against",) if args.against else ()), *(("separate",) if args.separate else ()), "reference",
             *(("timm",) if args.timm else ()))
    numbers = f"{'bf16 autocast' if args.bf16 else 'float32'}, {'channels_last' if args.channels_last else 'NCHW'}"
    shape = f"{net.batch}×{net.in_chans}×{net.size}×{net.size}"
    timing = f"{args.clock} clock, median of {repeats} steps after {warmup}, the variants taking turns"
    if args.runs > 1:
        timing += f"; median over {args.runs} fresh processes (and their range)"
    if args.against:
        timing += f"; --against {short_commit(args.against)}"
    title = f"Training step: {net.model} {shape}, attention overhead over plain (benchmarks/train_step.py)"
    if args.runs > 1:
        runs = runs_in_fresh_processes(args.runs)
    else:
        runs = [measure(args, net, names, impls, layout, warmup, repeats)]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(runs[0], f)
            return
    report = Report(title, header(args.device, f"{net.model}, input {shape}, {numbers}", timing))
    add_table(report, names, impls, runs)
    if args.markdown:
        report.append_to(args.markdown)


def measure(args: argparse.Namespace, net: Net, names: list[str], impls: tuple[str, ...], layout: torch.memory_format,
            warmup: int, repeats: int) -> dict[str, float]:
    """Each variant's median step in ms, by its label."""
    torch.manual_seed(0)
    x = torch.randn(net.batch, net.in_chans, net.size, net.size, device=args.device).contiguous(memory_format=layout)
    y = torch.randint(net.classes, (net.batch,), device=args.device)
    steps: dict[Variant, Callable[[], None]] = {}
    for variant in [Variant(BASELINE, None, "auto"), *[Variant(f"{n} {i}", n, i) for n in names for i in impls]]:
        model = build(variant, net, args.against)
        if model is not None:
            step = sgd_step(model.to(args.device, memory_format=layout).train(), x, y, args.bf16)
            mode = {"timm": "reference", "separate": "auto", "against": "auto"}.get(variant.impl, variant.impl)
            steps[variant] = synced(in_mode(mode, step), args.device)
    return dict(zip((v.label for v in steps), median_ms(list(steps.values()), warmup, repeats, CLOCKS[args.clock])))


if __name__ == "__main__":
    main()
