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
import os
import threading
from typing import Iterator

import torch
from torch import Tensor

from .backend import Backend

MODES = ("auto", "reference", "cpu", "triton")
CPU_DTYPES = (torch.float32, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 'auto' on the CPU: below this input size the fused path's fixed costs (Python, ctypes, the passes' set-up: ~50 µs
# a module) outweigh the traffic it saves. benchmarks/threshold.py on the 2-core machine of BENCHMARKS.md: fused
# forward+backward takes 1.0-1.4× the reference's time at 32-128 KiB, 0.6-1.2× at 512 KiB, 0.4-0.9× from 2 MiB
CPU_MIN_BYTES = 1 << 20
# 'auto' on the CPU, for a forward without autograd of a module whose reference formula already makes the fused
# forward's two passes (a mean, then a product: SE, ECA, GE θ⁻): the fused path gains only from 32 MiB, where glibc
# maps every allocation afresh (its dynamic mmap threshold stops there) and the CPU backend's huge-page hint halves
# the page faults of the output (49 MiB: 11 ms against torch's 28 ms for the product); below, it is 1.0-1.4× slower
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


def _graph_capture() -> bool:
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export())


def _layout_ok(x: Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _why_not(name: str, x: Tensor) -> str | None:
    """Why backend `name` cannot serve `x`, or None if it can."""
    if not _layout_ok(x):
        return f"needs a contiguous NCHW or channels_last tensor, got strides {x.stride()} for shape {tuple(x.shape)}"
    if name == "cpu":
        from . import cpu
        if x.device.type != "cpu":
            return f"serves CPU tensors, got one on {x.device}"
        if x.dtype not in CPU_DTYPES:
            return f"serves {[str(d) for d in CPU_DTYPES]}, got {x.dtype}"
        return cpu.unavailable()
    from . import triton as triton_backend
    if x.device.type != "cuda" and not triton_backend.interpreting():
        return f"serves CUDA tensors (or any under TRITON_INTERPRET=1), got one on {x.device}"
    if x.dtype not in TRITON_DTYPES:
        return f"serves {[str(d) for d in TRITON_DTYPES]}, got {x.dtype}"
    return triton_backend.unavailable()


def backend_for(x: object, forward_pays: bool = True) -> Backend | None:
    """The backend that runs the fused path for input `x` in the current mode, or None for the reference path.
    `forward_pays=False`: the module's reference forward is already the fused one's passes (see CPU_FRESH_BYTES)."""
    mode = get_mode()
    if mode == "reference" or type(x) is not Tensor or _graph_capture():
        return None
    if mode == "auto":
        name = "cpu" if x.device.type == "cpu" else "triton"
        if name == "cpu":
            size = x.numel() * x.element_size()
            if size < CPU_MIN_BYTES or (not forward_pays and not torch.is_grad_enabled() and size < CPU_FRESH_BYTES):
                return None
        return None if _why_not(name, x) else _load(name)
    reason = _why_not(mode, x)
    if reason:
        raise RuntimeError(f"attnkit.kernels mode {mode!r}: the {mode} backend {reason}. Use mode 'auto' to fall "
                           f"back to the reference formulas.")
    return _load(mode)


def _load(name: str) -> Backend:
    if name == "cpu":
        from . import cpu
        return cpu
    from . import triton as triton_backend
    return triton_backend
