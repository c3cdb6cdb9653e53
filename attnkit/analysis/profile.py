"""What attention costs: parameters, FLOPs, activation memory of a training step, and inference latency of the
plain network and of each attention variant (`attnkit profile`)."""
from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..cost import count_macs, count_params
from ..models import create_model, list_models
from ..modules._common import positive_int
from ..registry import BASELINE
from ..surgery import attach
from .report import text_table
from .timing import median_ms

__all__ = ["DEFAULT_INPUT_SIZES", "ProfileRow", "activation_bytes", "format_profile", "profile"]

# The input side each backbone is built for: ImageNet 224, CIFAR 32, MNIST 28.
DEFAULT_INPUT_SIZES: dict[str, int] = {
    "lenet": 28,
    **{f"resnet{d}": 32 for d in (20, 32, 44, 56, 110)},
    **{name: 224 for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2")},
}


@dataclass
class ProfileRow:
    """One variant's costs. FLOPs are per image with a multiply-add counted once; memory and latency are per batch
    of `input_shape[0]`; the overheads are relative to the plain network (0 on its own row); `cuda_*` are None
    without a GPU."""

    variant: str  # 'plain' or the attention spec
    input_shape: tuple[int, ...]  # N×C×H×W of the batch measured
    params: int
    flops: int  # multiply-adds of a 1-image inference forward pass (torch.utils.flop_counter, halved)
    activation_bytes: int  # tensors saved for backward in a training-mode forward pass of the batch
    cpu_ms: float  # median inference latency per batch
    cpu_images_per_s: float
    params_added: int
    flops_overhead: float  # fractions: 0.01 is 1% more than the plain network
    activation_overhead: float
    cpu_latency_overhead: float
    timed_runs: int
    warmup_runs: int
    cpu_threads: int
    cuda_ms: float | None = None
    cuda_images_per_s: float | None = None
    cuda_latency_overhead: float | None = None
    cuda_peak_bytes: int | None = None  # peak allocated during a training step, beyond the weights and the input
    cuda_device: str | None = None


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during one training-mode forward pass of `x`: the
    activation memory a training step holds at its peak, between forward and backward. Measured with
    torch.autograd.graph.saved_tensors_hooks, so it is exact and the same on every run; a storage saved by
    several operations (views, in-place activations) is counted once; parameters and buffers are not counted."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, torch.UntypedStorage] = {}  # holding the storages keeps their addresses from being reused

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage
        return t

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was_training)
    return sum(s.nbytes() for s in saved.values())


def _first_tensor(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"profile: the model must return a tensor (or a tuple whose first item is one), got {type(out).__name__}.")


def _cuda_step_peak(model: nn.Module, x: Tensor) -> int:
    """Peak CUDA memory allocated during one training step (forward and backward) beyond what was allocated
    before it (weights and input): activations, gradients and workspaces."""
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _first_tensor(model(x)).float().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    return peak


def _latencies_ms(models: Sequence[nn.Module], x: Tensor, warmup: int, repeats: int) -> list[float]:
    """Median ms per forward pass of each model in eval mode without autograd, after `warmup` passes; the models
    take turns (median_ms), and on a GPU each pass ends when its kernels have."""
    wait = torch.cuda.synchronize if x.device.type == "cuda" else lambda: None

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model(x)
            wait()
        return run

    for m in models:
        m.eval()
    with torch.inference_mode():
        return median_ms([forward(m) for m in models], warmup, repeats)


def _input_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"profile: {type(model).__name__} has no Conv2d to tell its input channels from; pass in_chans.")
    return conv.in_channels


def _overhead(value: float, base: float) -> float:
    return value / base - 1 if base else 0.0


def profile(
    model: str | nn.Module,
    attn: str | Sequence[str] = (),
    *,
    input_size: int | None = None,
    batch_size: int = 8,
    in_chans: int | None = None,
    num_classes: int | None = None,
    where: str | Sequence[str] = "auto",
    warmup: int = 3,
    repeats: int = 10,
    cuda: bool | None = None,
) -> list[ProfileRow]:
    """Parameters, FLOPs, activation memory and latency of `model` plain and with each attention spec in `attn`.

    Args:
        model: a backbone name (attnkit.list_models()), or an nn.Module, which is copied, never changed.
        attn: attention specs ("se", "cbam(reduction=8)"); a single string is one spec.
        input_size: the input's side; default for names: 224 (ImageNet ResNets, mobilenet_v2), 32 (CIFAR
            ResNets), 28 (lenet); required for a module.
        batch_size: the batch of the memory and latency measurements (FLOPs are per image).
        in_chans: input channels (for a name, passed to create_model); default: those of the first Conv2d.
        num_classes: classes of a backbone built by name.
        where: where attach() puts the modules ("auto": the paper's place; or module names or a pattern).
        warmup, repeats: untimed, then timed inference passes per variant; the median is reported.
        cuda: also measure on the GPU (default: when torch.cuda.is_available()).

    Returns:
        One ProfileRow per variant, the plain network first.
    """
    attn = [attn] if isinstance(attn, str) else list(attn)
    duplicates = sorted({s for s in attn if attn.count(s) > 1})
    if duplicates:
        raise ValueError(f"profile: each attention spec must appear once, got {', '.join(map(repr, duplicates))} more than once.")
    batch_size = positive_int("profile", "batch_size", batch_size)
    repeats = positive_int("profile", "repeats", repeats)
    warmup = positive_int("profile", "warmup", warmup, minimum=0)
    if input_size is not None:
        positive_int("profile", "input_size", input_size)
    if cuda is None:
        cuda = torch.cuda.is_available()
    elif cuda and not torch.cuda.is_available():
        raise ValueError("profile: cuda=True, but torch.cuda.is_available() is False on this machine.")

    if isinstance(model, str):
        size = input_size if input_size is not None else DEFAULT_INPUT_SIZES.get(model)
        if size is None and model in list_models():
            raise ValueError(f"profile: there is no default input size for {model!r}; pass input_size.")

        def build() -> nn.Module:
            return create_model(model, num_classes=num_classes, in_chans=in_chans, input_size=size)
    elif isinstance(model, nn.Module):
        if num_classes is not None:
            raise TypeError("profile: num_classes applies to backbones built by name; this model is already built.")
        if input_size is None:
            raise ValueError(f"profile: pass input_size (the input's side) to profile a {type(model).__name__}.")
        size = input_size

        def build() -> nn.Module:
            return copy.deepcopy(model)
    else:
        raise TypeError(f"profile: `model` must be a backbone name or an nn.Module, got {type(model).__name__}.")

    variants = [BASELINE, *attn]
    nets = []
    for spec in variants:
        net = build()
        if spec != BASELINE:
            attach(net, spec, where=where)
        nets.append(net)
    channels = in_chans if in_chans is not None else _input_channels(nets[0])
    shape = (batch_size, channels, size, size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    params = [count_params(net) for net in nets]
    flops = [count_macs(net, (1, *shape[1:])) for net in nets]
    memory = [activation_bytes(net, x) for net in nets]
    cpu_ms = _latencies_ms(nets, x, warmup, repeats)
    cuda_ms: list[float | None] = [None] * len(nets)
    cuda_peak: list[int | None] = [None] * len(nets)
    if cuda:
        nets = [net.cuda() for net in nets]
        x = x.cuda()
        cuda_peak = [_cuda_step_peak(net, x) for net in nets]
        cuda_ms = list(_latencies_ms(nets, x, warmup, repeats))

    rows = []
    for i, spec in enumerate(variants):
        gpu = cuda_ms[i]
        rows.append(ProfileRow(
            variant=spec,
            input_shape=shape,
            params=params[i],
            flops=flops[i],
            activation_bytes=memory[i],
            cpu_ms=cpu_ms[i],
            cpu_images_per_s=1e3 * batch_size / cpu_ms[i],
            params_added=params[i] - params[0],
            flops_overhead=_overhead(flops[i], flops[0]),
            activation_overhead=_overhead(memory[i], memory[0]),
            cpu_latency_overhead=_overhead(cpu_ms[i], cpu_ms[0]),
            timed_runs=repeats,
            warmup_runs=warmup,
            cpu_threads=torch.get_num_threads(),
            cuda_ms=gpu,
            cuda_images_per_s=None if gpu is None else 1e3 * batch_size / gpu,
            cuda_latency_overhead=None if gpu is None else _overhead(gpu, cuda_ms[0]),
            cuda_peak_bytes=cuda_peak[i],
            cuda_device=torch.cuda.get_device_name() if cuda else None,
        ))
    return rows


def _signed_pct(fraction: float) -> str:
    """+1.23%, with a third decimal below 0.1% so that small overheads do not read as +0.00%."""
    percent = 100 * fraction
    return f"{percent:+.2f}%" if percent == 0 or abs(percent) >= 0.1 else f"{percent:+.3f}%"


def _cells(row: ProfileRow, baseline: bool) -> dict[str, str]:
    def delta(text: str) -> str:
        return "—" if baseline else text

    mib = 2.0**20
    cells = {
        "variant": row.variant,
        "params": f"{row.params:,}",
        "Δparams": delta(f"{row.params_added:+,} ({_signed_pct(row.params_added / (row.params - row.params_added))})"),
        "MFLOPs": f"{row.flops / 1e6:,.2f}",
        "ΔFLOPs": delta(_signed_pct(row.flops_overhead)),
        "act. MiB": f"{row.activation_bytes / mib:,.2f}",
        "Δact.": delta(_signed_pct(row.activation_overhead)),
        "CPU ms": f"{row.cpu_ms:,.2f}",
        "CPU img/s": f"{row.cpu_images_per_s:,.0f}",
        "ΔCPU latency": delta(_signed_pct(row.cpu_latency_overhead)),
    }
    if row.cuda_ms is not None:
        cells.update({
            "GPU ms": f"{row.cuda_ms:,.3f}",
            "GPU img/s": f"{row.cuda_images_per_s:,.0f}",
            "ΔGPU latency": delta(_signed_pct(row.cuda_latency_overhead)),
            "GPU step peak MiB": f"{row.cuda_peak_bytes / mib:,.1f}",
        })
    return cells


def format_profile(rows: Sequence[ProfileRow]) -> str:
    """The rows as a terminal table, with what each column measures."""
    n, c, h, w = rows[0].input_shape
    notes = [
        "FLOPs: multiply-adds of a 1-image forward pass, each multiply-add counted once (as the papers count), "
        "convolutions and matrix products only (torch.utils.flop_counter, halved).",
        f"act.: bytes of the tensors autograd saves for backward in a training-mode forward pass of the batch of {n} "
        "(shared storage counted once; parameters not counted).",
        f"latency: median ms per batch of {n} over {rows[0].timed_runs} timed inference passes after "
        f"{rows[0].warmup_runs} untimed ones (eval mode, no autograd; the variants take turns); img/s = batch / latency. "
        "Δ: relative to plain.",
    ]
    if rows[0].cuda_peak_bytes is not None:
        notes.append("GPU step peak: torch.cuda.max_memory_allocated() during forward and backward of the batch, "
                     "minus what was allocated before (weights, input).")
    lines = [
        f"input {n}×{c}×{h}×{w} (batch × channels × height × width); CPU: {rows[0].cpu_threads} threads"
        + (f"; GPU: {rows[0].cuda_device}" if rows[0].cuda_device is not None else ""),
        "",
        text_table([_cells(row, i == 0) for i, row in enumerate(rows)]),
        "",
        *(textwrap.fill(note, 110, subsequent_indent="  ") for note in notes),
    ]
    return "\n".join(lines)
