"""The CPU backend: the primitives of reference.py as compiled C loops (csrc/), float32 and bfloat16, NCHW and
channels_last.

The C source is compiled once per machine with the system's C compiler (gcc or cc, -O3 -march=native -fopenmp) into
a cache folder ($ATTNKIT_CACHE, else $XDG_CACHE_HOME/attnkit, else ~/.cache/attnkit), keyed by the source, the flags
and the CPU's features, and loaded with ctypes; no torch headers are needed, so it takes a second or two. Without a
compiler the backend is unavailable and the modules run their reference formulas.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .._paths import cache_dir
from .backend import GateWeights, in_layout_of

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("gates.c", "gates_impl.h")]
# -fno-trapping-math: no kernel reads the floating-point exception flags, and without it GCC keeps the comparisons
# of a select (SimAM's and Shuffle Attention's exponential) out of vectorized loops
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11"]
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cpu_features() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | str:
    """The compiled library, or why there is none."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return "needs a C compiler (gcc or cc) on PATH to build its kernels"
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), " ".join([compiler, *FLAGS]).encode(), _cpu_features().encode()]:
        key.update(part)
    target = cache_dir() / f"gates-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCES[0])], check=True, capture_output=True,
                               text=True)
                os.replace(built, target)  # atomic: concurrent builders each install a whole library
        except subprocess.CalledProcessError as error:
            return f"could not build its kernels with {compiler}: {error.stderr.strip().splitlines()[0:1]}"
        except OSError as error:
            return f"could not build its kernels in {target.parent}: {error}"
    return ctypes.CDLL(str(target))


def unavailable() -> str | None:
    """None if the kernels are built and loaded, else why not."""
    library = _library()
    return library if isinstance(library, str) else None


# the elements per thread below which a pass runs on one thread: ATen's grain size for its own parallel loops
GRAIN = 32768


def _ctype(value: object) -> type:
    if isinstance(value, Tensor) or value is None:
        return ctypes.c_void_p
    return ctypes.c_float if isinstance(value, float) else ctypes.c_int64


@functools.lru_cache(maxsize=None)
def _kernel(name: str, dtype: torch.dtype) -> Callable[..., None]:
    return getattr(_library(), f"{name}_{SUFFIX[dtype]}")


def _threads(like: Tensor) -> int:
    """The threads a pass over `like` runs on: torch's count, but one per GRAIN elements at most, as ATen's own
    elementwise loops (a parallel region costs more than a small pass, and on a busy machine waits for every
    thread it asks for)."""
    return max(1, min(torch.get_num_threads(), like.numel() // GRAIN))


def _invoke(function: Callable[..., None], args: tuple, *flags: int) -> None:
    """Call a kernel with tensors as their data pointers, then the int `flags`."""
    if function.argtypes is None:  # declared once, from the first call: ctypes then converts plain ints and floats
        function.argtypes, function.restype = [*map(_ctype, args), *[ctypes.c_int] * len(flags)], None
    function(*[a.data_ptr() if isinstance(a, Tensor) else a for a in args], *flags)


def _call(name: str, like: Tensor, *args: object) -> None:
    """Run kernel `name` for `like`'s dtype; appends the layout flag and the thread count."""
    _invoke(_kernel(name, like.dtype), args, _cl(like), _threads(like))


def _cl(x: Tensor) -> bool:
    return not x.is_contiguous()


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return function


def _output_like(x: Tensor) -> Tensor:
    """An uninitialised tensor like x for a kernel to write. A large one is asked to be backed by huge pages: a
    fresh allocation of that size is a new mapping whose every 4 KiB page the kernel faults in and zeroes on first
    write, which costs several times the write itself; 2 MiB pages cut the faults 512-fold (what torch's
    THP_MEM_ALLOC_ENABLE does for every large allocation). Memory already in use is only marked, never moved."""
    y = torch.empty_like(x)
    madvise = _madvise()
    start = -(-y.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (y.data_ptr() + y.nbytes) // HUGE_PAGE * HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, MADV_HUGEPAGE)  # advice only: where refused, the pages stay small
    return y


def _f32(shape: tuple[int, ...] | torch.Size) -> Tensor:
    return torch.empty(shape, dtype=torch.float32)


def _stat(t: Tensor, channels_last: bool = False) -> Tensor:
    """A float32 statistic, contiguous; [N, C, L] as [N, L, C] when `channels_last`."""
    t = t.float()
    return (t.transpose(1, 2) if channels_last else t).contiguous()


def _factor(t: Tensor, x: Tensor, channels_last: bool = False) -> Tensor:
    """A factor rounded to x's dtype, as a float32 statistic (`_stat`)."""
    return _stat(t.to(x.dtype), channels_last)


def _back(t: Tensor, channels_last: bool) -> Tensor:
    """An [N, L, C] result as [N, C, L]."""
    return t.transpose(1, 2) if channels_last else t


# --- one gate per channel ---

def pool_hw(x: Tensor, with_m2: bool) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = x.shape
    mean, m2 = _f32((n, c)), _f32((n, c)) if with_m2 else None
    _call("pool_hw", x, x, mean, m2, 0, n, c, h * w)
    return mean, m2


def scale_c(x: Tensor, g: Tensor) -> Tensor:
    return _scale_c(x, g, None, False)


def scale_c_add(x: Tensor, g: Tensor, r: Tensor, relu: bool) -> Tensor:
    return _scale_c(x, g, in_layout_of(r, x), relu)


def _scale_c(x: Tensor, g: Tensor, r: Tensor | None, relu: bool) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_c", x, x, _factor(g, x), r, int(relu), y, n, c, h * w)
    return y


def dot_hw(dy: Tensor, x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    out = _f32((n, c))
    _call("dot_hw", x, dy, None, x, None, out, n, c, h * w)
    return out


def dot_hw_relu(dy: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    out, dr = _f32((n, c)), _output_like(x)
    _call("dot_hw", x, dy, y, x, dr, out, n, c, h * w)
    return out, dr


def grad_c(dy: Tensor, g: Tensor, a: Tensor, x: Tensor | None = None, b: Tensor | None = None,
           m: Tensor | None = None) -> Tensor:
    n, c, h, w = dy.shape
    dx = _output_like(dy)
    _call("grad_c", dy, dy, _factor(g, dy), _stat(a), x, None if b is None else _stat(b),
          None if m is None else _stat(m), dx, n, c, h * w)
    return dx


# --- SE and ECA: the whole module, sample by sample ---

#: the gate networks, activations and gates that channel_gate_module computes, by their codes in the kernel
NETS = {"mlp": 0, "windows": 1}
ACTS: dict[type[nn.Module], int] = {nn.ReLU: 0, nn.SiLU: 1, nn.Hardswish: 2}
GATES: dict[type[nn.Module], int] = {nn.Sigmoid: 0, nn.Hardsigmoid: 1}
# SE's W₁ size C·Hd up to which a sample's gate network in the kernel's plain loops costs less than its share of
# MKL's products over the batch; above it (ResNet-50's last stage: 2048·128) they cost more than the passes they save
MODULE_MAX_WEIGHTS = 1 << 16


def module_fits(x: Tensor, net: GateWeights) -> bool:
    """Whether channel_gate_module runs this gate network for x: float32 weights, contiguous, SE's of a size its loops
    run faster than the products they replace, and samples enough for its threads, each of which takes whole samples
    (an equal share each, or 8 or more per thread)."""
    threads, n = _threads(x), x.shape[0]
    return (x.dtype in SUFFIX and net.w1.numel() <= MODULE_MAX_WEIGHTS and n >= threads
            and (n % threads == 0 or n >= 8 * threads)
            and all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in net.weights))


def _width(net: GateWeights) -> int:
    """SE's hidden width, or ECA's kernel size."""
    return net.w1.shape[0] if net.kind == "mlp" else net.w1.numel()


def channel_gate_module(x: Tensor, r: Tensor | None, relu: bool, net: GateWeights) -> tuple[Tensor, Tensor]:
    """y = x·gate(net(mean_hw(x))), ended by r and the ReLU as scale_c_add, in one call; and what the backward needs
    of the gate network (the kernel's `work`)."""
    n, c, h, w = x.shape
    width = _width(net)
    y, work = _output_like(x), _f32((n, 4 * c + 2 * width))
    _invoke(_kernel("channel_gate_module", x.dtype),
            (x, None if r is None else in_layout_of(r, x), int(relu), y, work, NETS[net.kind], *net.weights,
             ACTS[net.act], GATES[net.gate], n, c, width, h * w), _cl(x), _threads(x))
    return y, work


def channel_gate_module_backward(dy: Tensor, y: Tensor | None, x: Tensor, work: Tensor, net: GateWeights,
                                 with_dx: bool, with_weights: bool) -> tuple[Tensor | None, Tensor | None, tuple]:
    """channel_gate_module's backward: dx (if `with_dx`), the residual's gradient dy masked by y > 0 (where a ReLU
    ended it, y its output; else None: dy is it), and the gradients of net.weights (with_weights; None for an absent
    one)."""
    n, c, h, w = x.shape
    width = _width(net)
    dy = in_layout_of(dy, x)
    dr = _output_like(x) if y is not None else None
    dx = _output_like(x) if with_dx else None
    grads = tuple(None if t is None or not with_weights else torch.empty(t.shape) for t in net.weights)
    w1, _, w2, _ = net.weights
    _invoke(_kernel("channel_gate_module_backward", x.dtype),
            (dy, y, x, dr, dx, work, _f32((n, 3 * c + width)), NETS[net.kind], w1, w2, *grads, ACTS[net.act],
             GATES[net.gate], n, c, width, h * w), _cl(x), _threads(x))
    return dx, dr, grads


def pool_abs_hw(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    mean = _f32((n, c))
    _call("pool_hw", x, x, mean, None, 1, n, c, h * w)
    return mean


def grad_c_sign(dy: Tensor, g: Tensor, a: Tensor, x: Tensor) -> Tensor:
    n, c, h, w = dy.shape
    dx = _output_like(dy)
    _call("grad_c_sign", dy, dy, _factor(g, dy), _stat(a), x, dx, n, c, h * w)
    return dx


# --- Gather-Excite θ, global extent ---

def _kernel_map(k: Tensor, channels_last: bool) -> Tensor:
    """k [C, H, W] as float32 [C, HW], or [HW, C] for channels_last input."""
    k = k.float().flatten(1)
    return (k.t() if channels_last else k).contiguous()


def pool_k(x: Tensor, k: Tensor) -> Tensor:
    n, c, h, w = x.shape
    out = _f32((n, c))
    _call("pool_k", x, x, _kernel_map(k, _cl(x)), out, n, c, h * w)
    return out


def grad_k(dy: Tensor, g: Tensor, a: Tensor, x: Tensor, k: Tensor, with_dx: bool,
           with_dk: bool) -> tuple[Tensor | None, Tensor | None]:
    n, c, h, w = dy.shape
    cl = _cl(dy)
    dx = _output_like(dy) if with_dx else None
    dk = _f32((h * w, c) if cl else (c, h * w)) if with_dk else None
    _call("grad_k", dy, dy, _factor(g, dy), _stat(a), x, _kernel_map(k, cl), dx, dk, n, c, h * w)
    return dx, None if dk is None else (dk.t() if cl else dk).reshape(c, h, w)


# --- Coordinate Attention ---

def pool_h_w(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    cl = _cl(x)
    z = _f32((n, h + w, c) if cl else (n, c, h + w))
    _call("pool_h_w", x, x, z, n, c, h, w)
    return _back(z, cl)


def scale_hw(x: Tensor, ah: Tensor, aw: Tensor) -> Tensor:
    return _scale_hw(x, ah, aw, None, False)


def scale_hw_add(x: Tensor, ah: Tensor, aw: Tensor, r: Tensor, relu: bool) -> Tensor:
    return _scale_hw(x, ah, aw, in_layout_of(r, x), relu)


def _scale_hw(x: Tensor, ah: Tensor, aw: Tensor, r: Tensor | None, relu: bool) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_hw", x, x, _factor(ah, x, _cl(x)), _factor(aw, x, _cl(x)), r, int(relu), y, n, c, h, w)
    return y


def dot_h_w(dy: Tensor, x: Tensor, ah: Tensor, aw: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    cl = _cl(x)
    dah, daw = _f32((n, h, c) if cl else (n, c, h)), _f32((n, w, c) if cl else (n, c, w))
    _call("dot_h_w", x, dy, x, _factor(ah, x, cl), _factor(aw, x, cl), dah, daw, n, c, h, w)
    return _back(dah, cl), _back(daw, cl)


def grad_hw(dy: Tensor, ah: Tensor, aw: Tensor, bh: Tensor, bw: Tensor) -> Tensor:
    n, c, h, w = dy.shape
    cl = _cl(dy)
    dx = _output_like(dy)
    _call("grad_hw", dy, dy, _factor(ah, dy, cl), _factor(aw, dy, cl), _stat(bh, cl), _stat(bw, cl), dx,
          n, c, h, w)
    return dx


# --- CBAM ---

def pool_hw_avgmax(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, c, h, w = x.shape
    mean, top, at = _f32((n, c)), _f32((n, c)), torch.empty((n, c), dtype=torch.int64)
    _call("pool_hw_avgmax", x, x, mean, top, at, n, c, h * w)
    return mean, top, at


def pool_c_gated(x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, c, h, w = x.shape
    mean, top, at = _f32((n, h, w)), _f32((n, h, w)), torch.empty((n, h, w), dtype=torch.int64)
    _call("pool_c_gated", x, x, _factor(mc, x), mean, top, at, n, c, h * w)
    return mean, top, at


def scale_cs(x: Tensor, mc: Tensor, ms: Tensor) -> Tensor:
    return _scale_cs(x, mc, ms, None, False)


def scale_cs_add(x: Tensor, mc: Tensor, ms: Tensor, r: Tensor, relu: bool) -> Tensor:
    return _scale_cs(x, mc, ms, in_layout_of(r, x), relu)


def _scale_cs(x: Tensor, mc: Tensor, ms: Tensor, r: Tensor | None, relu: bool) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_cs", x, x, _factor(mc, x), _factor(ms, x), r, int(relu), y, n, c, h * w)
    return y


def dot_cs(dy: Tensor, x: Tensor, mc: Tensor, ms: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    dmc, dms = _f32((n, c)), _f32((n, h, w))
    _call("dot_cs", x, dy, x, _factor(mc, x), _factor(ms, x), dmc, dms, n, c, h * w)
    return dmc, dms


def dot_x_s(x: Tensor, u: Tensor, v: Tensor, argc: Tensor) -> Tensor:
    n, c, h, w = x.shape
    out = _f32((n, c))
    _call("dot_x_s", x, x, _stat(u), _stat(v), argc.contiguous(), out, n, c, h * w)
    return out


def grad_cs(dy: Tensor, mc: Tensor, ms: Tensor, u: Tensor, v: Tensor, argc: Tensor,
            a: Tensor, b: Tensor, arghw: Tensor) -> Tensor:
    n, c, h, w = dy.shape
    dx = _output_like(dy)
    _call("grad_cs", dy, dy, _factor(mc, dy), _factor(ms, dy), _stat(u), _stat(v), argc.contiguous(),
          _stat(a), _stat(b), arghw.contiguous(), dx, n, c, h * w)
    return dx


# --- Triplet Attention ---

def zpool3(x: Tensor, spatial: bool) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
    n, c, h, w = x.shape
    cl = _cl(x)

    def pool(shape: tuple[int, ...]) -> list[Tensor]:
        return [_f32(shape), torch.empty(shape, dtype=torch.int64), _f32(shape)]

    over_h, over_w = pool((n, w, c) if cl else (n, c, w)), pool((n, h, c) if cl else (n, c, h))
    over_c = pool((n, h, w)) if spatial else [None, None, None]
    _call("zpool3", x, x, *over_h, *over_w, *over_c, n, c, h, w)
    pools = [tuple(_back(t, cl) for t in over_h), tuple(_back(t, cl) for t in over_w)]
    return tuple(pools + ([tuple(over_c)] if spatial else []))


def scale_mean3(x: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None) -> Tensor:
    n, c, h, w = x.shape
    cl = _cl(x)
    y = _output_like(x)
    k = 2.0 if a_hw is None else 3.0
    _call("scale_mean3", x, x, _stat(a_cw, cl), _stat(a_hc, cl), None if a_hw is None else _stat(a_hw), k, y,
          n, c, h, w)
    return y


def dot3(dy: Tensor, x: Tensor, spatial: bool) -> tuple[Tensor, ...]:
    n, c, h, w = x.shape
    cl = _cl(x)
    dh, dw = _f32((n, w, c) if cl else (n, c, w)), _f32((n, h, c) if cl else (n, c, h))
    dc = _f32((n, h, w)) if spatial else None
    _call("dot3", x, dy, x, dh, dw, dc, n, c, h, w)
    return (_back(dh, cl), _back(dw, cl)) + ((dc,) if spatial else ())


def grad_mean3(dy: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None,
               pools: tuple[tuple[Tensor, Tensor, Tensor], ...]) -> Tensor:
    n, c, h, w = dy.shape
    cl = _cl(dy)
    dx = _output_like(dy)
    k = 2.0 if a_hw is None else 3.0
    layouts = (cl, cl, False)
    flat = []
    for (v, index, u), layout in zip(pools, layouts):
        flat += [_stat(v, layout), (index.transpose(1, 2) if layout else index).contiguous(), _stat(u, layout)]
    flat += [None, None, None] * (3 - len(pools))
    _call("grad_mean3", dy, dy, _stat(a_cw, cl), _stat(a_hc, cl),
          None if a_hw is None else _stat(a_hw), k, *flat, dx, n, c, h, w)
    return dx


# --- SimAM ---

def scale_energy(x: Tensor, m: Tensor, q: Tensor) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_energy", x, x, _stat(m), _stat(q), y, n, c, h * w)
    return y


def dot_energy(dy: Tensor, x: Tensor, m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    ta, tb = _f32((n, c)), _f32((n, c))
    _call("dot_energy", x, dy, x, _stat(m), _stat(q), ta, tb, n, c, h * w)
    return ta, tb


def grad_energy(dy: Tensor, x: Tensor, m: Tensor, q: Tensor, a: Tensor, b: Tensor) -> Tensor:
    n, c, h, w = dy.shape
    dx = _output_like(dy)
    _call("grad_energy", dy, dy, x, _stat(m), _stat(q), _stat(a), _stat(b), dx, n, c, h * w)
    return dx


# --- scSE ---

COMBINES = {"max": 0, "add": 1, "mul": 2}


def pool_c_weighted(x: Tensor, w: Tensor) -> Tensor:
    n, c, h, wd = x.shape
    z = _f32((n, h, wd))
    _call("pool_c_weighted", x, x, w.float().contiguous(), z, n, c, h * wd)
    return z


def scale_pair(x: Tensor, s: Tensor, q: Tensor, combine: str) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_pair", x, x, _factor(s, x), _factor(q, x), y, COMBINES[combine], n, c, h * w)
    return y


def dot_pair(dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    ds, dq = _f32((n, c)), _f32((n, h, w))
    _call("dot_pair", x, dy, x, _factor(s, x), _factor(q, x), ds, dq, COMBINES[combine], n, c, h * w)
    return ds, dq


def grad_pair(dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str, a: Tensor, w: Tensor, dz: Tensor) -> Tensor:
    n, c, h, wd = dy.shape
    dx = _output_like(dy)
    _call("grad_pair", dy, dy, x, _factor(s, dy), _factor(q, dy), _stat(a), w.float().contiguous(), _stat(dz), dx,
          COMBINES[combine], n, c, h * wd)
    return dx


# --- SGE ---

def pool_groups(x: Tensor, m: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    out = _f32((n, groups, h, w))
    _call("pool_groups", x, x, _stat(m), out, groups, n, c, h * w)
    return out


def scale_groups(x: Tensor, a: Tensor) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_groups", x, x, _factor(a, x), y, a.shape[1], n, c, h * w)
    return y


def dot_groups(dy: Tensor, x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    out = _f32((n, groups, h, w))
    _call("dot_groups", x, dy, x, out, groups, n, c, h * w)
    return out


def dot_x_groups(x: Tensor, u: Tensor) -> Tensor:
    n, c, h, w = x.shape
    out = _f32((n, c))
    _call("dot_x_groups", x, x, _stat(u), out, u.shape[1], n, c, h * w)
    return out


def grad_groups(dy: Tensor, a: Tensor, m: Tensor, u: Tensor, b: Tensor) -> Tensor:
    n, c, h, w = dy.shape
    dx = _output_like(dy)
    _call("grad_groups", dy, dy, _factor(a, dy), _stat(m), _stat(u), _stat(b), dx, a.shape[1], n, c, h * w)
    return dx


# --- Shuffle Attention ---

def scale_affine(x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> Tensor:
    n, c, h, w = x.shape
    y = _output_like(x)
    _call("scale_affine", x, x, _stat(alpha), _stat(beta), _stat(m), perm.contiguous(), y, n, c, h * w)
    return y


def dot_affine(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    ta, tb = _f32((n, c)), _f32((n, c))
    _call("dot_affine", x, dy, x, _stat(alpha), _stat(beta), _stat(m), perm.contiguous(), ta, tb, n, c, h * w)
    return ta, tb


def grad_affine(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, a: Tensor, b: Tensor,
                perm: Tensor) -> Tensor:
    n, c, h, w = dy.shape
    dx = _output_like(dy)
    _call("grad_affine", dy, dy, x, _stat(alpha), _stat(beta), _stat(m), _stat(a), _stat(b), perm.contiguous(), dx,
          n, c, h * w)
    return dx


# --- the gate convolution of CBAM and Triplet Attention: not a primitive, an operator of their gate networks ---

def _conv_threads(maps: Tensor, k: int) -> int:
    """_threads for k·k products per element: the samples, on as many threads as GRAIN products each allow."""
    return max(1, min(torch.get_num_threads(), maps.shape[0], maps.numel() * k * k // GRAIN))


def _conv_scratch(threads: int, grids: int, h: int, w: int, k: int) -> Tensor:
    """Each thread's working memory for the gate convolution, as the C kernels lay it out: `grids` maps widened to
    (H + k) × (W + k − 1) (a zero border of (k − 1)/2 and a spare row), then one H × (W + k − 1) accumulator."""
    return _f32((threads, grids * (h + k) * (w + k - 1) + h * (w + k - 1)))


def conv_planes(maps: Tensor, weight: Tensor) -> Tensor:
    """F.conv2d(maps, weight, padding=k // 2) for float32 maps [N, P, H, W], NCHW, and one filter [1, P, k, k], k odd."""
    n, p, h, w = maps.shape
    k = weight.shape[-1]
    out, threads = _f32((n, 1, h, w)), _conv_threads(maps, k)
    scratch = _conv_scratch(threads, p, h, w, k)
    _invoke(_kernel("conv_planes", torch.float32), (maps, weight, out, scratch, n, p, h, w, k), threads)
    return out


def conv_planes_backward(dout: Tensor, maps: Tensor, weight: Tensor, with_dmaps: bool,
                         with_dweight: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of conv_planes for the output gradient dout [N, 1, H, W]: (dmaps, dweight), each None when not
    asked for."""
    n, p, h, w = maps.shape
    k = weight.shape[-1]
    dmaps = _f32(maps.shape) if with_dmaps else None
    per_sample, dweight = (_f32((n, p * k * k)), _f32(weight.shape)) if with_dweight else (None, None)
    threads = _conv_threads(maps, k)
    scratch = _conv_scratch(threads, p + 1, h, w, k)  # dout's grid and the maps'
    _invoke(_kernel("conv_planes_backward", torch.float32),
            (dout, maps, weight, dmaps, per_sample, dweight, scratch, n, p, h, w, k), threads)
    return dmaps, dweight
