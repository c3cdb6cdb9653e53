"""Attention modules against the memory-traffic floor: forward and forward+backward time of attnkit's fused path,
attnkit's reference formulas, timm's module where timm has the same one, and torch.compile of attnkit's reference
formulas, at network-sized shapes, in one run.

    python benchmarks/modules.py [--shapes r50-s3-b32,r50-s3-b64,mbv2-b32,r50-s3-b1] [--modules se,eca,cbam]
        [--repeats 15] [--device cpu|cuda] [--dtype float32|bfloat16] [--channels-last] [--no-compile]
        [--against REV] [--markdown BENCHMARKS.md]

The implementations, each timed in its own attnkit.kernels mode: "attnkit fused (B)" in mode 'auto', B being the
backend `attnkit.kernels.backend_for(x)` picks for the input ('reference' where none serves it: the row then
repeats the reference); "attnkit reference" in mode 'reference'; "timm"; "attnkit compiled", torch.compile of
the module, compiled and run in mode 'reference'; with --against REV, "attnkit fused at REV", the module of attnkit
as of git revision REV (timing.attnkit_at) in its mode 'auto', taking turns with the others. The closing table
gives the fused path's forward+backward speed-up over the others. Modules train (BatchNorm on batch statistics),
but for the batch-1 shape r50-s3-b1, the inference case, which runs them in eval mode.

The floor: a gate module reads x to pool it, then reads x and writes y: 3|x| bytes forward; backward reads dy
and x to reduce and reads dy again to write dx: 4|x| more (7|x| in all). CBAM, Coordinate Attention and
Triplet Attention pool twice or along two axes: 4|x| forward, 8|x| in all; Gather-Excite θ's backward reads x
once more for its depthwise kernel's gradient, GCT's, SimAM's and Shuffle Attention's to write dx (their gates
depend on x's spread):
8|x| in all. scSE pools over H×W and over C (4|x| forward), and its backward reads x to reduce, to write dx and
for its convolution's weight gradient: 10|x| in all. SGE pools the means and the groups' similarities (4|x|
forward) and reads x twice in its backward: 9|x| in all. EMA's gate network has full-size layers of its own (a 3×3
convolution and a GroupNorm per group): its rows have no floor. The bandwidth is that of a copy of
x measured in the same run; each figure is printed as milliseconds and as a multiple of its floor.

The glibc allocator decides much of the backward's cost on CPU (fresh mmaps for full-size temporaries are zeroed
by the kernel every time): the header states the regime; run once as is and once with
MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=1000000000000 to see both.

`--markdown PATH` appends the header (machine, torch, threads, dtype, allocator, date, command) and the tables to
PATH. The helpers for that header are shared with train_step.py.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
from types import ModuleType
from typing import Callable, NamedTuple

import torch
from torch import nn

import attnkit
import attnkit.kernels
from timing import REPO, attnkit_at, cpu_name, load, median_ms, short_commit  # benchmarks/timing.py, beside this script

SHAPES = {  # name: N×C×H×W
    "r50-s3-b32": (32, 512, 28, 28),  # SE-ResNet-50, stage 3 (conv3_x), batch 32
    "r50-s3-b64": (64, 512, 28, 28),
    "mbv2-b32": (32, 144, 56, 56),  # MobileNetV2 / EfficientNet-B0, the expanded 56×56 block, batch 32
    "r50-s3-b1": (1, 512, 28, 28),  # batch-1 inference
    "r50-s5-b32": (32, 2048, 7, 7),  # the last stage (conv5_x) at 224×224: rows of 7
    "r50-s5-b16-128": (16, 2048, 4, 4),  # the same at 128×128 (train_step.py's ResNet-50): rows of 4
    "r56-s1": (64, 16, 32, 32),  # CIFAR ResNet-56, its three stages, batch 64 (train_step.py's resnet56)
    "r56-s2": (64, 32, 16, 16),
    "r56-s3": (64, 64, 8, 8),
}
INFERENCE = {"r50-s3-b1"}  # shapes whose modules run in eval mode (BatchNorm on its running statistics)
TWO_POOLS = {"cbam", "coord", "triplet"}  # floor 4|x| forward, 8|x| forward+backward
X_IN_BACKWARD = {"ge-theta", "gct", "gct-l1", "simam", "shuffle"}  # floor 3|x| forward, 8|x| forward+backward
FLOORS = {"scse": (4, 10), "sge": (4, 9)}
NO_FLOOR = {"ema"}  # its gate network has full-size layers (a 3×3 convolution, a GroupNorm): no gate module's floor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the environment a figure depends on, written before the command line in the markdown file
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF")


# --- shared with train_step.py: devices, the fused backend, the header, the markdown file ---

def add_common_options(parser: argparse.ArgumentParser) -> None:
    """--device, --channels-last and --markdown."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--channels-last", action="store_true", help="inputs in channels_last memory format")
    parser.add_argument("--markdown", metavar="PATH", help="append the header and tables to PATH")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")


def synced(fn: Callable[[], None], device: str) -> Callable[[], None]:
    """fn, then a wait for the GPU on CUDA. median_ms times the functions one after another, so with each ending
    in a synchronize, every timing starts on an idle GPU and ends when fn's kernels have finished."""
    if device != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize()
    return run


def in_mode(mode: str, fn: Callable[[], None]) -> Callable[[], None]:
    """fn run inside `attnkit.kernels.use(mode)`."""
    def run() -> None:
        with attnkit.kernels.use(mode):
            fn()
    return run


def fused_backend(x: torch.Tensor) -> str:
    """The backend mode 'auto' runs for input x ('cpu', 'triton'), or 'reference' where none serves it."""
    with attnkit.kernels.use("auto"):
        backend = attnkit.kernels.backend_for(x)
    return backend.__name__.rsplit(".", 1)[-1] if backend else "reference"


def machine(device: str) -> str:
    host = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host {host}"
    return host


def allocator(device: str) -> str:
    if device == "cuda":
        return f"CUDA caching allocator ({os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'default settings')})"
    return "glibc, reuse (MALLOC_MMAP_THRESHOLD_ set)" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc default"


def command() -> str:
    """The command line of this run, from the repository root, with the environment variables that matter."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_VARS if k in os.environ]
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join([*env, shlex.join(["python", script, *sys.argv[1:]])])


def header(device: str, setup: str, timing: str) -> str:
    """One line: machine, torch, threads, the run's set-up (dtype, layout...), allocator, how it was timed, date."""
    return (f"Machine: {machine(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; {setup}; "
            f"allocator: {allocator(device)}; {timing}; {load()} at the start; {datetime.date.today().isoformat()}.")


class Report:
    """Lines printed as they come and kept for the markdown file."""

    def __init__(self, title: str, header_line: str) -> None:
        self.title, self.lines = title, [header_line, ""]
        print(header_line + "\n", flush=True)

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def append_to(self, path: str) -> None:
        """Append a section: the title, the command, the header and the tables."""
        with open(path, "a") as f:
            f.write("\n".join(["", f"### {self.title}", "", f"`{command()}`", "", *self.lines, ""]))
        print(f"\nappended to {path}")


# --- this benchmark ---

class Impl(NamedTuple):
    key: str  # fused, reference, timm or compiled
    label: str
    module: nn.Module
    mode: str  # the attnkit.kernels mode it runs in (timm's module has no attnkit code: 'reference')


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


def attnkit_module(name: str, channels: int, hw: tuple[int, int], package: ModuleType = attnkit) -> nn.Module:
    """Module `name` as `package` (attnkit, or attnkit as of a revision) builds it."""
    if name == "ge-theta":
        return package.create("ge", channels, variant="theta", spatial_size=hw)
    if name == "gct-l1":
        return package.create("gct", channels, mode="l1")
    if name in ("sge", "shuffle"):  # the papers' 64 groups, or as many as divide the channels (e.g. 144: 16 and 8)
        return package.create(name, channels, groups=math.gcd(channels // (2 if name == "shuffle" else 1), 64))
    if name == "ema":  # the official 32 groups, or as many as divide the channels (144: 16)
        return package.create(name, channels, groups=math.gcd(channels, 32))
    return package.create(name, channels)


def prepared(module: nn.Module, x: torch.Tensor, training: bool) -> nn.Module:
    """module in training or eval mode, on x's device and dtype."""
    return module.to(x.device, x.dtype).train(training)


def impls(name: str, x: torch.Tensor, backend: str, with_compile: bool, training: bool,
          against: str | None = None) -> list[Impl]:
    """The implementations of module `name` for input x; `backend` names the fused one. The fused and reference
    rows time the same module, in modes 'auto' and 'reference'; `against`, a git revision, adds that attnkit's."""
    _, c, h, w = x.shape
    ours = prepared(attnkit_module(name, c, (h, w)), x, training)
    found = [Impl("fused", f"attnkit fused ({backend})", ours, "auto"),
             Impl("reference", "attnkit reference", ours, "reference")]
    if against is not None:  # its own package, in its own default mode 'auto'
        theirs = prepared(attnkit_module(name, c, (h, w), attnkit_at(against)), x, training)
        found.append(Impl("against", f"attnkit fused at {short_commit(against)}", theirs, "auto"))
    theirs = timm_module(name, c, (h, w))
    if theirs is not None:
        found.append(Impl("timm", "timm", prepared(theirs, x, training), "reference"))
    if with_compile:
        with attnkit.kernels.use("reference"):
            compiled = torch.compile(prepared(attnkit_module(name, c, (h, w)), x, training), dynamic=False)
        found.append(Impl("compiled", "attnkit compiled", compiled, "reference"))
    return found


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


def timed(impl: Impl, fn: Callable[[], None], device: str) -> Callable[[], None]:
    return synced(in_mode(impl.mode, fn), device)


def copy_ms(x: torch.Tensor, args: argparse.Namespace) -> float:
    """Median time of a copy of x, which reads and writes |x|: the bandwidth the floors use."""
    copy = torch.empty_like(x)
    (ms,) = median_ms([synced(lambda: copy.copy_(x), args.device)], args.warmup, args.repeats)
    return ms


def bench_shape(report: Report, shape_name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The rows of one shape: the copy, then each module's implementations. Returns {module: {impl key: fwd+bwd
    ms}} for the modules that ran."""
    n, c, h, w = SHAPES[shape_name]
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, device=args.device, dtype=DTYPES[args.dtype]).contiguous(memory_format=layout)
    dy = torch.randn_like(x)
    copy = copy_ms(x, args)
    bandwidth = 2 * x.nbytes / (copy / 1e3)  # bytes/s
    report.add(f"| {shape_name} {n}×{c}×{h}×{w} | copy | {x.nbytes / 2**20:.1f} MiB | {copy:.2f} | "
               f"{bandwidth / 1e9:.1f} GB/s | | |")
    backend = fused_backend(x)
    results: dict[str, dict[str, float]] = {}
    for name in args.modules.split(","):
        found = impls(name, x, backend, args.compile, shape_name not in INFERENCE, args.against)
        passes = FLOORS.get(name) or ((4, 8) if name in TWO_POOLS else (3, 8) if name in X_IN_BACKWARD else (3, 7))
        floors = [p * x.nbytes / bandwidth * 1e3 for p in passes]
        try:
            fwd = median_ms([timed(i, forward(i.module, x), args.device) for i in found], args.warmup, args.repeats)
            both = median_ms([timed(i, forward_backward(i.module, x, dy), args.device) for i in found],
                             args.warmup, args.repeats)
        except ValueError as e:  # an input the module refuses, e.g. ge-theta's BatchNorm training at batch 1
            report.add(f"| {shape_name} | {name} | not run: {str(e).split('. ')[0]} | | | | |")
            continue
        results[name] = {i.key: b for i, b in zip(found, both)}
        for impl, f, b in zip(found, fwd, both):
            if name in NO_FLOOR:
                report.add(f"| {shape_name} | {name} | {impl.label} | {f:.2f} | — | {b:.2f} | — |")
            else:
                report.add(f"| {shape_name} | {name} | {impl.label} | {f:.2f} | {f / floors[0]:.1f} | {b:.2f} | "
                           f"{b / floors[1]:.1f} |")
    return results


def speedups(results: dict[str, dict[str, dict[str, float]]], name: str, key: str) -> str:
    """The fused path's forward+backward speed-up over `key` at each shape, e.g. '1.8× r50-s3-b32, 1.5× mbv2-b32'."""
    cells = [f"{r[name][key] / r[name]['fused']:.2f}× {s}" for s, r in results.items() if key in r.get(name, {})]
    return ", ".join(cells) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="r50-s3-b32,r50-s3-b64,mbv2-b32,r50-s3-b1", help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--modules",
                        default="se,eca,srm,ge,ge-theta,cbam,coord,triplet,gct,gct-l1,fca,simam,scse,sge,shuffle,ema")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    parser.add_argument("--against", metavar="REV", help="also attnkit's module as of this git revision")
    add_common_options(parser)
    args = parser.parse_args()
    check_device(parser, args.device)
    shapes, names = args.shapes.split(","), args.modules.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")

    torch.manual_seed(0)
    report = Report("Gate modules: attnkit fused, reference, timm, compiled (benchmarks/modules.py)",
                    header(args.device, f"{args.dtype}, {'channels_last' if args.channels_last else 'NCHW'}",
                           f"median of {args.repeats} after {args.warmup}"))
    report.add("| shape | module | impl | fwd ms | fwd × floor | fwd+bwd ms | fwd+bwd × floor |")
    report.add("|---|---|---|---:|---:|---:|---:|")
    results = {shape: bench_shape(report, shape, args) for shape in shapes}
    report.add()
    keys = ("reference", "timm", "compiled", *(("against",) if args.against else ()))
    report.add("| module | fused fwd+bwd speed-up over reference | over timm | over compiled |"
               + (f" over {short_commit(args.against)} |" if args.against else ""))
    report.add("|---|---|---|---|" + ("---|" if args.against else ""))
    for name in names:
        cells = [speedups(results, name, key) for key in keys]
        report.add(f"| {name} | {' | '.join(cells)} |")
    if args.markdown:
        report.append_to(args.markdown)


if __name__ == "__main__":
    main()
