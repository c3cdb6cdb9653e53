"""Which path the attention modules take: a fused backend or the reference formulas.

Modes (`set_mode` for the process, the `use` context for the current thread, or the ATTNKIT_KERNELS environment
variable at start-up):
  'auto'       fused where a backend serves the input and it pays (the default), the reference formulas elsewhere;
  'reference'  always the reference formulas (plain torch ops, any device, dtype and layout);
  'cpu', 'triton'  that backend, or an error saying why it cannot serve the input.
The reference path also runs, whatever the mode, while a model is traced, scripted, compiled or exported, so
exported graphs hold the plain formula.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Callable, Iterator

import torch
from torch import Tensor

from .backend import Backend, GateWeights

MODES = ("auto", "reference", "cpu", "triton")
CPU_DTYPES = (torch.float32, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 'auto' on the CPU, while autograd records: below this input size the fused path's fixed costs (two autograd
# Functions, four kernel calls: ~0.1 ms a module) outweigh the traffic and allocations it saves. benchmarks/threshold.py
# on the 2-core machine of BENCHMARKS.md: fused forward+backward takes 1.1-1.4× the fast formulas' time at 32-128
# KiB with batch 2-4, 0.7-1.0× at 256 KiB (batch 64 at 8×8), 0.5-0.8× from 2 MiB. Without autograd the fused
# forward is as fast as the formulas from 32 KiB, and faster for modules with more than a mean and a product.
CPU_MIN_BYTES = 256 << 10
# The same for a module whose reference forward already makes the fused forward's two passes (a mean, then a
# product: SE, ECA, GE θ⁻): only its backward gains, and GE θ⁻, which has no gate network to amortise the fixed
# costs over, breaks even at 400 KiB (1.1× the formulas' time at 256 KiB). SE and ECA run their whole-module kernel
# below these sizes too, where it serves the input (whole_module).
CPU_MIN_BYTES_BACKWARD = 512 << 10
# Those modules' forward without autograd: the fused path gains only from 32 MiB, where glibc
# maps every allocation afresh (its dynamic mmap threshold stops there) and the CPU backend's huge-page hint halves
# the page faults of the output (49 MiB: 11 ms against torch's 28 ms for the product); below, it is as fast or slower
CPU_FRESH_BYTES = 32 << 20

_mode = os.environ.get("ATTNKIT_KERNELS", "auto")  # the process's mode
_local = threading.local()  # `use` blocks: this thread's mode, where one is open


def _checked(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"attnkit.kernels: mode must be one of {list(MODES)}, got {mode!r}.")
    return mode  # type: ignore[return-value]


def get_mode() -> str:
    """The current thread's mode: that of the innermost `use` block, else the process's."""
    return _checked(getattr(_local, "mode", None) or _mode)


def set_mode(mode: str) -> None:
    """Set the mode for the whole process (threads inside a `use` block keep theirs)."""
    global _mode
    _mode = _checked(mode)


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
    """Run a block in `mode`, in this thread only, e.g. `with attnkit.kernels.use("reference"): y = net(x)`."""
    previous = getattr(_local, "mode", None)
    _local.mode = _checked(mode)
    try:
        yield
    finally:
        _local.mode = previous


@functools.lru_cache(maxsize=None)
def _onnx_exporting() -> Callable[[], bool]:
    """torch.onnx.is_in_onnx_export without the imports it runs at every call (10 µs, as much as a small operator):
    the two flags it reads, looked up once; torch's own function where they have moved."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


def _graph_capture() -> bool:
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or _onnx_exporting()())


def _layout_ok(x: Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _why_not(name: str, x: Tensor) -> str | None:
    """Why backend `name` cannot serve `x`, or None if it can."""
    if not _layout_ok(x):
        return f"needs a contiguous NCHW or channels_last tensor, got strides {x.stride()} for shape {tuple(x.shape)}"
    if name == "cpu":
        if x.device.type != "cpu":
            return f"serves CPU tensors, got one on {x.device}"
        if x.dtype not in CPU_DTYPES:
            return f"serves {[str(d) for d in CPU_DTYPES]}, got {x.dtype}"
        return _load("cpu").unavailable()
    triton_backend = _load("triton")
    if x.device.type != "cuda" and not triton_backend.interpreting():
        return f"serves CUDA tensors (or any under TRITON_INTERPRET=1), got one on {x.device}"
    if x.dtype not in TRITON_DTYPES:
        return f"serves {[str(d) for d in TRITON_DTYPES]}, got {x.dtype}"
    return triton_backend.unavailable()


def reference_only(x: object) -> bool:
    """Whether the modules must run their reference formulas as written for input `x`: in mode 'reference', while a
    model is traced, scripted, compiled or exported, and for anything but a plain tensor. Elsewhere they may compute
    the same function with cheaper operations (their gate networks' 1×1 convolutions over pooled maps as F.linear)."""
    return get_mode() == "reference" or type(x) is not Tensor or _graph_capture()


def backend_for(x: object, forward_pays: bool = True) -> Backend | None:
    """The backend that runs the fused path for input `x` in the current mode, or None for the reference path.
    `forward_pays=False`: the module's reference forward is already the fused one's passes (see
    CPU_MIN_BYTES_BACKWARD and CPU_FRESH_BYTES)."""
    return route(x, forward_pays)[0]


def route(x: object, forward_pays: bool = True) -> tuple[Backend | None, bool]:
    """(backend_for(x, forward_pays), not reference_only(x)), decided once: a module's forward asks both."""
    mode = get_mode()
    if mode == "reference" or type(x) is not Tensor or _graph_capture():
        return None, False
    return _backend(mode, x, forward_pays), True


def _backend(mode: str, x: Tensor, forward_pays: bool) -> Backend | None:
    if mode == "auto":
        name = "cpu" if x.device.type == "cpu" else "triton"
        if name == "cpu":
            size = x.numel() * x.element_size()
            if torch.is_grad_enabled():
                if size < (CPU_MIN_BYTES if forward_pays else CPU_MIN_BYTES_BACKWARD):
                    return None
            elif not forward_pays and size < CPU_FRESH_BYTES:
                return None
        return None if _why_not(name, x) else _load(name)
    reason = _why_not(mode, x)
    if reason:
        raise RuntimeError(f"attnkit.kernels mode {mode!r}: the {mode} backend {reason}. Use mode 'auto' to fall "
                           f"back to the reference formulas.")
    return _load(mode)


def whole_module(x: Tensor, net: GateWeights | None) -> Backend | None:
    """In mode 'auto', where `route` left x to the formulas for its size: the CPU backend if it runs the whole module
    of gate network `net` in one call each way for x (cpu.channel_gate_module: SE's, ECA's), which costs less than
    the formulas' operations from the smallest maps on (benchmarks/threshold.py); else None."""
    if net is None or get_mode() != "auto" or x.device.type != "cpu" or _why_not("cpu", x):
        return None
    cpu = _load("cpu")
    return cpu if cpu.module_fits(x, net) else None


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Backend:
    return importlib.import_module(f".{name}", __package__)
