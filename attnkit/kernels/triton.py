"""Triton kernels for the fused attention paths: the GPU backend (and, under TRITON_INTERPRET=1, a slow CPU one).

Each public function is its namesake in reference.py, the specification: same signature, output shapes and dtypes,
statistics accumulated in float32, every product with x rounded to x's dtype after each factor as the reference
writes it (round to nearest even, no fused multiply-adds: full-size outputs equal the reference's bit for bit), the
index of a maximum the first one, a NaN winning, as torch.max along a dimension reports it. Every primitive reads
each full-size tensor once and writes each full-size output once: the memory-traffic floor.

Addressing. A full-size tensor (x, dy, and y or dx, allocated like x or dy so that it keeps its memory format) is
N×C×H×W, contiguous NCHW or channels_last (anything else is copied to NCHW first). The kernels address it as
[N, C, P = H·W] through strides (sn, sc, sp): both layouts keep the H×W positions of a channel at one stride (1 in
NCHW, C in channels_last), and Triton specializes a stride of 1, so loads along the contiguous axis vectorize.
Factors and statistics ([N, C], [N, C, H], [N, C, W], [N, H, W]) are contiguous float32; indices int64.

Programs. Tiles are [BLOCK_C, BLOCK_P] (or [BLOCK_C, BLOCK_H, BLOCK_W]) of about _TILE elements, long along the
memory-contiguous axis (positions in NCHW, channels in channels_last):
  elementwise (scale_*, grad_*): grid (P blocks, C blocks, N), one tile per program;
  over H·W (pool_hw, dot_hw, pool_hw_avgmax): grid (C blocks, N), a program walks P;
  over C, or both (pool_c_gated, dot_cs, dot_x_s): grid (P blocks, C chunks, N), a program walks a chunk of C and
      writes partial results, combined afterwards over the chunks (or the P blocks) in a fixed order;
  per row and column (pool_h_w, dot_h_w, zpool3, dot3): grid (C blocks, N), a program walks whole H×W planes
      BLOCK_H rows at a time (BLOCK_W spans W); zpool3 and dot3 pool over C per C block, combined afterwards.
Deterministic: no atomics, each program writes only its own outputs, every sum runs in a fixed order. The block
constants below are a starting point, checked by compiling for sm_90 (registers, no spills, vector loads), not yet
timed on a GPU.

The kernels are jitted when this module is imported (attnkit imports it when a CUDA tensor first takes a fused
path), in the mode TRITON_INTERPRET says then, as triton.jit reads it.
"""
from __future__ import annotations

import contextlib
import os
import torch
from torch import Tensor

from .backend import in_layout_of

try:
    import triton
    import triton.language as tl
except ImportError:  # unavailable() says so; the module still imports
    triton = tl = None

FULL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TILE = 1024      # elements a program holds per step (per full-size tensor): 4 per thread of _WARPS warps
_WARPS = 8
_RUN_P = 512      # the longest block of positions (NCHW: the contiguous axis)
_RUN_C = 32       # the longest block of channels (channels_last: the contiguous axis)
_PROGRAMS = 1024  # programs a reduction over C aims for, splitting C into chunks when N × (P blocks) is smaller


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (or true/on) is set: Triton then runs the kernels on the CPU, in Python."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def unavailable() -> str | None:
    """Why this backend cannot run here (a phrase following "the triton backend"), or None if it can."""
    if triton is None:
        return "needs the triton package: pip install triton"
    if not (interpreting() or torch.cuda.is_available()):
        return "needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)"
    if interpreting() and isinstance(tl.sum, triton.runtime.JITFunction):
        return ("needs TRITON_INTERPRET=1 set before triton is imported: Triton jitted its own functions (tl.sum, ...) "
                "for the GPU when it was imported")
    if interpreting() != _INTERPRETED_AT_IMPORT:
        return ("was imported, and its kernels jitted, before TRITON_INTERPRET changed: set it before the first fused "
                "path runs, or restart the process")
    return None


def _require() -> None:
    reason = unavailable()
    if reason:
        raise RuntimeError(f"attnkit.kernels.triton {reason}")


_INTERPRETED_AT_IMPORT = interpreting()
_jit = triton.jit if triton is not None else (lambda fn: fn)  # the module imports without triton; unavailable() says


# --- device helpers ---

@_jit
def _to(v, dtype: tl.constexpr):
    """v (float32) converted to dtype, rounding to nearest even. Spelled out for bfloat16 (where it is what the
    compiled cast does) because Triton's interpreter truncates instead."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = tl.where(v != v, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))  # a NaN stays a (quiet) NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@_jit
def _round(v, like):
    """v (float32) rounded to the element type of pointer `like` and back: `v.to(like.dtype)` in the reference."""
    return _to(v, like.dtype.element_ty).to(tl.float32)


@_jit
def _argmax(v, axis: tl.constexpr):
    """(maximum, first position of it) of v along axis, a NaN beating any number as in torch.max."""
    nan = v != v
    top, at = tl.max(tl.where(nan, float("-inf"), v), axis, return_indices=True, return_indices_tie_break_left=True)
    any_nan, nan_at = tl.max(nan.to(tl.int32), axis, return_indices=True, return_indices_tie_break_left=True)
    return tl.where(any_nan > 0, float("nan"), top), tl.where(any_nan > 0, nan_at, at)


@_jit
def _first_max(v1, i1, v2, i2):
    """Merge two (maximum, first index) results: the greater value, a NaN beating any number; on a tie, the lower
    index."""
    nan1 = v1 != v1
    nan2 = v2 != v2
    first = (v1 > v2) | (nan1 & ~nan2) | (((v1 == v2) | (nan1 & nan2)) & (i1 < i2))
    return tl.where(first, v1, v2), tl.where(first, i1, i2)


@_jit
def _tile(C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's sample, channels, positions and in-bounds mask on an elementwise grid (P blocks, C blocks, N)."""
    n = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, c, p, (c < C)[:, None] & (p < P)[None, :]


@_jit
def _at(n, c, p, sn, sc, sp):
    """Offsets of a [channels, positions] tile of sample n in a full-size tensor."""
    return n.to(tl.int64) * sn + c[:, None] * sc + p[None, :] * sp


@_jit
def _plane(n, c, h, w, W, sn, sc, sp):
    """Offsets of a [channels, rows, columns] tile of sample n in a full-size tensor."""
    return n.to(tl.int64) * sn + c[:, None, None] * sc + (h[None, :, None] * W + w[None, None, :]) * sp


@_jit
def _mean_gate(a_cw, a_hc, a_hw, n, c, p, C, P, W, mask, SPATIAL: tl.constexpr):
    """(a_cw[n, c, w] + a_hc[n, c, h] (+ a_hw[n, h, w])) / (number of gates) at positions p = h·W + w, summed and
    divided (correctly rounded) as the reference does."""
    row = (n * C + c)[:, None]
    gate = tl.load(a_cw + row * W + p % W, mask=mask) + tl.load(a_hc + row * (P // W) + p // W, mask=mask)
    if SPATIAL:
        return tl.math.div_rn(gate + tl.load(a_hw + n * P + p, mask=p < P)[None, :], 3.0)
    return tl.math.div_rn(gate, 2.0)


# --- one gate per channel: SE, ECA, SRM, Gather-Excite ---

@_jit
def _pool_hw_kernel(x, mean, m2, C, P, sn, sc, sp, WITH_M2: tl.constexpr, ABS: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """mean (and M2) over P of BLOCK_C channels, in one read of x (of |x| with ABS). Values are shifted by each
    channel's first one, so that sums stay small when the mean is large against the spread; M2 centres each block of
    positions on its own mean and merges the blocks by Chan's formula, with no cancellation of large squares."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    shift = tl.load(x + n.to(tl.int64) * sn + c * sc, mask=c < C, other=0.0).to(tl.float32)
    if ABS:
        shift = tl.abs(shift)
    total = tl.zeros([BLOCK_C], tl.float32)
    dev = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (c < C)[:, None] & (p < P)[None, :]
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        if ABS:
            v = tl.abs(v)
        v = tl.where(mask, v - shift[:, None], 0.0)
        s = tl.sum(v, 1)
        if WITH_M2:
            seen = p0 * 1.0
            k = tl.minimum(P - p0, BLOCK_P).to(tl.float32)
            d = tl.where(mask, v - (s / k)[:, None], 0.0)
            delta = s / k - total / tl.maximum(seen, 1.0)
            dev += tl.sum(d * d, 1) + delta * delta * (seen * k / (seen + k))
        total += s
    tl.store(mean + n * C + c, shift + total / P, mask=c < C)
    if WITH_M2:
        tl.store(m2 + n * C + c, dev, mask=c < C)


@_jit
def _ended(v, x, r, at, mask, RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """What a scaling kernel stores for v: v, or with a RESIDUAL v rounded to x's dtype plus r (strided as x), then
    max(·, 0) with RELU (a residual block's end, rounded as the separate operations round; a NaN passes the ReLU, as
    torch's passes it)."""
    if RESIDUAL:
        v = _round(v, x) + tl.load(r + at, mask=mask).to(tl.float32)
        if RELU:
            v = tl.where(v < 0, 0.0, v)
    return v


@_jit
def _scale_c_kernel(x, g, r, y, C, P, W, sn, sc, sp, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = x · g[n, c] (_ended)."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    gc = _round(tl.load(g + n * C + c, mask=c < C), x)
    v = tl.load(x + at, mask=mask).to(tl.float32) * gc[:, None]
    tl.store(y + at, _to(_ended(v, x, r, at, mask, RESIDUAL, RELU), y.dtype.element_ty), mask=mask)


@_jit
def _dot_hw_kernel(dy, y, x, dr, out, C, P, dsn, dsc, dsp, sn, sc, sp, MASKED: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Σ_p dy·x of BLOCK_C channels. MASKED (the backward of scale_c ended by a ReLU, y its output; dy, y and dr
    strided as x): dr = dy where y > 0, else 0, written, and Σ_p dr·x."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (c < C)[:, None] & (p < P)[None, :]
        d = tl.load(dy + _at(n, c, p, dsn, dsc, dsp), mask=mask, other=0.0)
        at = _at(n, c, p, sn, sc, sp)
        if MASKED:
            d = tl.where(tl.load(y + at, mask=mask, other=0.0).to(tl.float32) > 0, d, tl.zeros_like(d))
            tl.store(dr + at, d, mask=mask)
        total += tl.sum(d.to(tl.float32) * tl.load(x + at, mask=mask, other=0.0).to(tl.float32), 1)
    tl.store(out + n * C + c, total, mask=c < C)


@_jit
def _grad_c_kernel(dy, g, a, x, b, m, dx, xsn, xsc, xsp, C, P, W, sn, sc, sp, WITH_B: tl.constexpr,
                   WITH_SIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy·g + a (+ b·(x − m)), or dy·g + a·sign(x) WITH_SIGN, per-channel factors."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    nc = n * C + c
    d = tl.load(dy + at, mask=mask).to(tl.float32)
    shift = tl.load(a + nc, mask=c < C)[:, None]
    if WITH_B or WITH_SIGN:
        v = tl.load(x + _at(n, c, p, xsn, xsc, xsp), mask=mask).to(tl.float32)
        if WITH_SIGN:  # torch.sign: 0 at 0 and for a NaN
            shift = shift * ((v > 0).to(tl.float32) - (v < 0).to(tl.float32))
    out = d * _round(tl.load(g + nc, mask=c < C), dy)[:, None] + shift
    if WITH_B:
        out = out + tl.load(b + nc, mask=c < C)[:, None] * (v - tl.load(m + nc, mask=c < C)[:, None])
    tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)


# --- Gather-Excite θ, global extent: a depthwise kernel k [C, P] covering the map ---

@_jit
def _grad_k_kernel(dy, g, a, x, k, dx, dk, N, C, P, dsn, dsc, dsp, sn, sc, sp, WITH_DX: tl.constexpr,
                   WITH_DK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy·g[n, c] + a[n, c]·k[c, p] and dk[c, p] = Σ_n a[n, c]·x on a tile of channels and positions, the
    batch walked in order (one program owns each dk element: no atomics)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (c < C)[:, None] & (p < P)[None, :]
    kernel = tl.load(k + c[:, None] * P + p[None, :], mask=mask, other=0.0)
    total = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for n in range(0, N):
        sample = tl.cast(n, tl.int64)  # a Python int under the interpreter, which _at cannot convert
        an = tl.load(a + n * C + c, mask=c < C, other=0.0)[:, None]
        if WITH_DX:
            at = _at(sample, c, p, dsn, dsc, dsp)
            gn = _round(tl.load(g + n * C + c, mask=c < C), dy)[:, None]
            out = tl.load(dy + at, mask=mask).to(tl.float32) * gn + an * kernel
            tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)
        if WITH_DK:
            total += an * tl.load(x + _at(sample, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
    if WITH_DK:
        tl.store(dk + c[:, None] * P + p[None, :], total, mask=mask)


# --- Coordinate Attention: a gate per row and per column of each channel ---

@_jit
def _pool_h_w_kernel(x, z, C, H, W: tl.constexpr, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """The joined pools z [N, C, H + W]: means over W (per row, complete for each step's rows), then over H (per
    column, summed over the steps)."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    w = tl.arange(0, BLOCK_W)
    columns = tl.zeros([BLOCK_C, BLOCK_W], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (c < C)[:, None, None] & (h < H)[None, :, None] & (w < W)[None, None, :]
        v = tl.load(x + _plane(n, c, h, w, W, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        rows = (c < C)[:, None] & (h < H)[None, :]
        tl.store(z + (n * C + c)[:, None] * (H + W) + h[None, :], tl.sum(v, 2) / W, mask=rows)
        columns += tl.sum(v, 1)
    tl.store(z + (n * C + c)[:, None] * (H + W) + H + w[None, :], columns / H,
             mask=(c < C)[:, None] & (w < W)[None, :])


@_jit
def _scale_hw_kernel(x, ah, aw, r, y, C, P, W, sn, sc, sp, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = x · aw[n, c, w] · ah[n, c, h], rounded after each factor (_ended)."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    row = (n * C + c)[:, None]
    aw_ = _round(tl.load(aw + row * W + p % W, mask=mask), x)
    ah_ = _round(tl.load(ah + row * (P // W) + p // W, mask=mask), x)
    v = _round(tl.load(x + at, mask=mask).to(tl.float32) * aw_, x)
    tl.store(y + at, _to(_ended(v * ah_, x, r, at, mask, RESIDUAL, RELU), y.dtype.element_ty), mask=mask)


@_jit
def _dot_h_w_kernel(dy, x, ah, aw, out_h, out_w, C, H, W: tl.constexpr, dsn, dsc, dsp, sn, sc, sp,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Σ_w dy·x·aw per row and Σ_h dy·x·ah per column, planes walked as in _pool_h_w_kernel."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    w = tl.arange(0, BLOCK_W)
    col_in = (c < C)[:, None] & (w < W)[None, :]
    aw_ = _round(tl.load(aw + (n * C + c)[:, None] * W + w[None, :], mask=col_in, other=0.0), x)
    columns = tl.zeros([BLOCK_C, BLOCK_W], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (c < C)[:, None, None] & (h < H)[None, :, None] & (w < W)[None, None, :]
        prod = (tl.load(dy + _plane(n, c, h, w, W, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
                * tl.load(x + _plane(n, c, h, w, W, sn, sc, sp), mask=mask, other=0.0).to(tl.float32))
        rows = (c < C)[:, None] & (h < H)[None, :]
        at_rows = (n * C + c)[:, None] * H + h[None, :]
        tl.store(out_h + at_rows, tl.sum(prod * aw_[:, None, :], 2), mask=rows)
        ah_ = _round(tl.load(ah + at_rows, mask=rows, other=0.0), x)
        columns += tl.sum(prod * ah_[:, :, None], 1)
    tl.store(out_w + (n * C + c)[:, None] * W + w[None, :], columns, mask=col_in)


@_jit
def _grad_hw_kernel(dy, ah, aw, bh, bw, dx, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy·ah·aw + bh[n, c, h] + bw[n, c, w]."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    row = (n * C + c)[:, None]
    at_h = row * (P // W) + p // W
    at_w = row * W + p % W
    out = (tl.load(dy + at, mask=mask).to(tl.float32) * _round(tl.load(ah + at_h, mask=mask), dy)
           * _round(tl.load(aw + at_w, mask=mask), dy))
    out = out + tl.load(bh + at_h, mask=mask) + tl.load(bw + at_w, mask=mask)
    tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)


# --- CBAM: a channel gate, then a spatial gate pooled from the channel-gated map ---

@_jit
def _pool_hw_avgmax_kernel(x, mean, top, top_at, C, P, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Mean, maximum and first argmax over P of BLOCK_C channels."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], tl.float32)
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK_C], tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (c < C)[:, None] & (p < P)[None, :]
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(v, 1)
        step, step_at = _argmax(tl.where(mask, v, float("-inf")), 1)
        best, best_at = _first_max(best, best_at, step, p0 + step_at)
    tl.store(mean + n * C + c, total / P, mask=c < C)
    tl.store(top + n * C + c, best, mask=c < C)
    tl.store(top_at + n * C + c, best_at.to(tl.int64), mask=c < C)


@_jit
def _pool_c_gated_kernel(x, mc, total, top, top_at, C, P, c_chunk, sn, sc, sp, BLOCK_C: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """Sum, maximum and first argmax over a chunk of C of x·mc (rounded), per position: [N, C chunks, P] partials."""
    n = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_first = tl.program_id(1) * c_chunk
    acc = tl.zeros([BLOCK_P], tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK_P], tl.int32) + c_first
    for c0 in range(c_first, c_first + c_chunk, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & (p < P)[None, :]
        g = _round(tl.load(mc + n * C + c, mask=c < C, other=0.0), x)
        t = _round(tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32) * g[:, None], x)
        acc += tl.sum(t, 0)
        step, step_at = _argmax(tl.where(mask, t, float("-inf")), 0)
        best, best_at = _first_max(best, best_at, step, c0 + step_at)
    out = (n * tl.num_programs(1) + tl.program_id(1)) * P + p
    tl.store(total + out, acc, mask=p < P)
    tl.store(top + out, best, mask=p < P)
    tl.store(top_at + out, best_at, mask=p < P)


@_jit
def _scale_cs_kernel(x, mc, ms, r, y, C, P, W, sn, sc, sp, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = (x · mc[n, c]) · ms[n, p], rounded after each factor (_ended)."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    v = _round(tl.load(x + at, mask=mask).to(tl.float32) * _round(tl.load(mc + n * C + c, mask=c < C), x)[:, None], x)
    s = _round(tl.load(ms + n * P + p, mask=p < P), x)
    tl.store(y + at, _to(_ended(v * s[None, :], x, r, at, mask, RESIDUAL, RELU), y.dtype.element_ty), mask=mask)


@_jit
def _dot_cs_kernel(dy, x, mc, ms, by_c, by_p, C, P, c_chunk, dsn, dsc, dsp, sn, sc, sp, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Partials of dot_cs over a block of positions and a chunk of channels: Σ_p dy·x·ms per channel into
    by_c[n, c, P block] and Σ_c dy·(x·mc) per position into by_p[n, C chunk, p]."""
    n = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = _round(tl.load(ms + n * P + p, mask=p < P, other=0.0), x)
    acc = tl.zeros([BLOCK_P], tl.float32)
    c_first = tl.program_id(1) * c_chunk
    for c0 in range(c_first, c_first + c_chunk, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & (p < P)[None, :]
        d = tl.load(dy + _at(n, c, p, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        tl.store(by_c + (n * C + c) * tl.num_programs(0) + tl.program_id(0), tl.sum(d * v * s[None, :], 1),
                 mask=c < C)
        g = _round(tl.load(mc + n * C + c, mask=c < C, other=0.0), x)
        acc += tl.sum(d * _round(v * g[:, None], x), 0)
    tl.store(by_p + (n * tl.num_programs(1) + tl.program_id(1)) * P + p, acc, mask=p < P)


@_jit
def _dot_x_s_kernel(x, u, v, argc, by_c, C, P, c_chunk, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Σ_p x·(u + v·[c = argc]) over a block of positions, for a chunk of channels: by_c[n, c, P block]."""
    n = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    u_ = tl.load(u + n * P + p, mask=p < P, other=0.0)[None, :]
    v_ = tl.load(v + n * P + p, mask=p < P, other=0.0)[None, :]
    argc_ = tl.load(argc + n * P + p, mask=p < P, other=-1)[None, :]
    c_first = tl.program_id(1) * c_chunk
    for c0 in range(c_first, c_first + c_chunk, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & (p < P)[None, :]
        xv = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        weight = u_ + tl.where(c[:, None] == argc_, v_, 0.0)
        tl.store(by_c + (n * C + c) * tl.num_programs(0) + tl.program_id(0), tl.sum(xv * weight, 1), mask=c < C)


@_jit
def _grad_cs_kernel(dy, mc, ms, u, v, argc, a, b, arghw, dx, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """dx = mc·(dy·ms + u + v·[c = argc]) + a + b·[p = arghw]."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    pos, nc = n * P + p, n * C + c
    s = _round(tl.load(ms + pos, mask=p < P), dy)[None, :]
    u_ = tl.load(u + pos, mask=p < P)[None, :]
    v_ = tl.load(v + pos, mask=p < P)[None, :]
    argc_ = tl.load(argc + pos, mask=p < P)[None, :]
    g = _round(tl.load(mc + nc, mask=c < C), dy)[:, None]
    a_ = tl.load(a + nc, mask=c < C)[:, None]
    b_ = tl.load(b + nc, mask=c < C)[:, None]
    arghw_ = tl.load(arghw + nc, mask=c < C)[:, None]
    t = tl.load(dy + at, mask=mask).to(tl.float32) * s + u_ + tl.where(c[:, None] == argc_, v_, 0.0)
    out = t * g + a_ + tl.where(p[None, :] == arghw_, b_, 0.0)
    tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)


# --- Triplet Attention: Z-pools over H, W and C; the mean of three gates ---

@_jit
def _zpool3_kernel(x, h_top, h_at, h_mean, w_top, w_at, w_mean, c_top, c_at, c_sum, C, H, W: tl.constexpr, sn, sc,
                   sp, SPATIAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(max, first argmax, mean) of BLOCK_C channels over W (per row, complete each step) and over H (per column,
    merged over the steps); with SPATIAL, (max, first argmax, sum) over these channels: [N, C blocks, H, W] partials."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    w = tl.arange(0, BLOCK_W)
    col_top = tl.full([BLOCK_C, BLOCK_W], float("-inf"), tl.float32)
    col_at = tl.zeros([BLOCK_C, BLOCK_W], tl.int32)
    col_sum = tl.zeros([BLOCK_C, BLOCK_W], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (c < C)[:, None, None] & (h < H)[None, :, None] & (w < W)[None, None, :]
        v = tl.load(x + _plane(n, c, h, w, W, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        vm = tl.where(mask, v, float("-inf"))
        rows = (c < C)[:, None] & (h < H)[None, :]
        at_rows = (n * C + c)[:, None] * H + h[None, :]
        row_top, row_at = _argmax(vm, 2)
        tl.store(w_top + at_rows, row_top, mask=rows)
        tl.store(w_at + at_rows, row_at.to(tl.int64), mask=rows)
        tl.store(w_mean + at_rows, tl.sum(v, 2) / W, mask=rows)
        step, step_at = _argmax(vm, 1)
        col_top, col_at = _first_max(col_top, col_at, step, h0 + step_at)
        col_sum += tl.sum(v, 1)
        if SPATIAL:
            at_c = ((n * tl.num_programs(0) + tl.program_id(0)) * H + h[:, None]) * W + w[None, :]
            in_c = (h < H)[:, None] & (w < W)[None, :]
            chan_top, chan_at = _argmax(vm, 0)
            tl.store(c_top + at_c, chan_top, mask=in_c)
            tl.store(c_at + at_c, tl.program_id(0) * BLOCK_C + chan_at, mask=in_c)
            tl.store(c_sum + at_c, tl.sum(v, 0), mask=in_c)
    at_cols = (n * C + c)[:, None] * W + w[None, :]
    cols = (c < C)[:, None] & (w < W)[None, :]
    tl.store(h_top + at_cols, col_top, mask=cols)
    tl.store(h_at + at_cols, col_at.to(tl.int64), mask=cols)
    tl.store(h_mean + at_cols, col_sum / H, mask=cols)


@_jit
def _scale_mean3_kernel(x, a_cw, a_hc, a_hw, y, C, P, W, sn, sc, sp, SPATIAL: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """y = x · mean of the gates."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    gate = _mean_gate(a_cw, a_hc, a_hw, n, c, p, C, P, W, mask, SPATIAL)
    tl.store(y + at, _to(tl.load(x + at, mask=mask).to(tl.float32) * _round(gate, x), y.dtype.element_ty), mask=mask)


@_jit
def _dot3_kernel(dy, x, by_h, by_w, by_c, C, H, W: tl.constexpr, dsn, dsc, dsp, sn, sc, sp, SPATIAL: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Σ_h dy·x per column, Σ_w per row and, with SPATIAL, Σ over these channels: [N, C blocks, H, W] partials."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    w = tl.arange(0, BLOCK_W)
    columns = tl.zeros([BLOCK_C, BLOCK_W], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (c < C)[:, None, None] & (h < H)[None, :, None] & (w < W)[None, None, :]
        prod = (tl.load(dy + _plane(n, c, h, w, W, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
                * tl.load(x + _plane(n, c, h, w, W, sn, sc, sp), mask=mask, other=0.0).to(tl.float32))
        rows = (c < C)[:, None] & (h < H)[None, :]
        tl.store(by_w + (n * C + c)[:, None] * H + h[None, :], tl.sum(prod, 2), mask=rows)
        columns += tl.sum(prod, 1)
        if SPATIAL:
            at_c = ((n * tl.num_programs(0) + tl.program_id(0)) * H + h[:, None]) * W + w[None, :]
            tl.store(by_c + at_c, tl.sum(prod, 0), mask=(h < H)[:, None] & (w < W)[None, :])
    tl.store(by_h + (n * C + c)[:, None] * W + w[None, :], columns, mask=(c < C)[:, None] & (w < W)[None, :])


@_jit
def _grad_mean3_kernel(dy, a_cw, a_hc, a_hw, v_h, at_h, u_h, v_w, at_w, u_w, v_c, at_c, u_c, dx, C, P, W, sn, sc,
                       sp, SPATIAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy·gate + the pools' gradients: over H (u_h, v_h at at_h, per column), over W (per row) and, with
    SPATIAL, over C (per position)."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    gate = _mean_gate(a_cw, a_hc, a_hw, n, c, p, C, P, W, mask, SPATIAL)
    out = tl.load(dy + at, mask=mask).to(tl.float32) * _round(gate, dy)
    h = p // W
    w = p % W
    col = (n * C + c)[:, None] * W + w[None, :]
    out = out + tl.load(u_h + col, mask=mask)
    out = out + tl.where(h[None, :] == tl.load(at_h + col, mask=mask), tl.load(v_h + col, mask=mask), 0.0)
    row = (n * C + c)[:, None] * (P // W) + h[None, :]
    out = out + tl.load(u_w + row, mask=mask)
    out = out + tl.where(w[None, :] == tl.load(at_w + row, mask=mask), tl.load(v_w + row, mask=mask), 0.0)
    if SPATIAL:
        pos = n * P + p
        out = out + tl.load(u_c + pos, mask=p < P)[None, :]
        out = out + tl.where(c[:, None] == tl.load(at_c + pos, mask=p < P)[None, :],
                             tl.load(v_c + pos, mask=p < P)[None, :], 0.0)
    tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)


# --- SimAM: an elementwise gate s = σ((x − m)² / q + ½) from per-channel m and q ---

@_jit
def _energy(v, m, q):
    """(s, d = v − m) for a [channels, positions] tile v and per-channel m, q."""
    d = v - m[:, None]
    return tl.sigmoid(d * d / q[:, None] + 0.5), d


@_jit
def _scale_energy_kernel(x, m, q, y, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = x · s."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    v = tl.load(x + at, mask=mask).to(tl.float32)
    s, _ = _energy(v, tl.load(m + n * C + c, mask=c < C), tl.load(q + n * C + c, mask=c < C, other=1.0))
    tl.store(y + at, _to(v * _round(s, x), y.dtype.element_ty), mask=mask)


@_jit
def _dot_energy_kernel(dy, x, m, q, ta, tb, C, P, dsn, dsc, dsp, sn, sc, sp, BLOCK_C: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Σ_p t·d and Σ_p t·d² of BLOCK_C channels, t = dy·x·s·(1 − s)."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = tl.load(m + n * C + c, mask=c < C, other=0.0)
    qc = tl.load(q + n * C + c, mask=c < C, other=1.0)
    total_a = tl.zeros([BLOCK_C], tl.float32)
    total_b = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (c < C)[:, None] & (p < P)[None, :]
        g = tl.load(dy + _at(n, c, p, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        s, d = _energy(v, mc, qc)
        td = tl.where(mask, g * v * s * (1.0 - s) * d, 0.0)
        total_a += tl.sum(td, 1)
        total_b += tl.sum(td * d, 1)
    tl.store(ta + n * C + c, total_a, mask=c < C)
    tl.store(tb + n * C + c, total_b, mask=c < C)


@_jit
def _grad_energy_kernel(dy, x, m, q, a, b, dx, xsn, xsc, xsp, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """dx = dy·s + d·(2t / q + b) + a, t = dy·x·s·(1 − s), per-channel m, q, a, b."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    nc = n * C + c
    g = tl.load(dy + at, mask=mask).to(tl.float32)
    v = tl.load(x + _at(n, c, p, xsn, xsc, xsp), mask=mask).to(tl.float32)
    qc = tl.load(q + nc, mask=c < C, other=1.0)
    s, d = _energy(v, tl.load(m + nc, mask=c < C), qc)
    t = g * v * s * (1.0 - s)
    out = g * _round(s, dy) + d * (2.0 * t / qc[:, None] + tl.load(b + nc, mask=c < C)[:, None])
    tl.store(dx + at, _to(out + tl.load(a + nc, mask=c < C)[:, None], dx.dtype.element_ty), mask=mask)


# --- scSE: a channel gate s [N, C] and a spatial gate q [N, P], combined by max, add or mul ---

_PAIR_MAX, _PAIR_ADD, _PAIR_MUL = 0, 1, 2
COMBINES = {"max": _PAIR_MAX, "add": _PAIR_ADD, "mul": _PAIR_MUL}


@_jit
def _pool_c_weighted_kernel(x, w, z, C, P, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Σ_c w[c]·x over all channels, for a block of positions."""
    n = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & (p < P)[None, :]
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v * tl.load(w + c, mask=c < C, other=0.0)[:, None], 0)
    tl.store(z + n * P + p, acc, mask=p < P)


@_jit
def _pair_shares(v, s, q, x, COMBINE: tl.constexpr):
    """(x·s rounded, ∂y/∂(x·s), ∂y/∂(x·q)) for 'max' (torch.maximum's: ½ each on a tie) and 'add'."""
    a = _round(v * s, x)
    if COMBINE == 0:
        b = _round(v * q, x)
        wa = tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))
        return a, wa, 1.0 - wa
    return a, tl.full(a.shape, 1.0, tl.float32), tl.full(a.shape, 1.0, tl.float32)


@_jit
def _scale_pair_kernel(x, s, q, y, C, P, W, sn, sc, sp, COMBINE: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """y = max(x·s, x·q), x·s + x·q or (x·s)·q."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    v = tl.load(x + at, mask=mask).to(tl.float32)
    sv = _round(tl.load(s + n * C + c, mask=c < C), x)[:, None]
    qv = _round(tl.load(q + n * P + p, mask=p < P), x)[None, :]
    a = _round(v * sv, x)
    if COMBINE == 2:
        out = a * qv
    elif COMBINE == 0:
        b = _round(v * qv, x)
        out = tl.where((a > b) | (a != a), a, b)
    else:
        out = a + _round(v * qv, x)
    tl.store(y + at, _to(out, y.dtype.element_ty), mask=mask)


@_jit
def _dot_pair_kernel(dy, x, s, q, by_c, by_p, C, P, c_chunk, dsn, dsc, dsp, sn, sc, sp, COMBINE: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partials of dot_pair over a block of positions and a chunk of channels, as _dot_cs_kernel's."""
    n = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    qv = _round(tl.load(q + n * P + p, mask=p < P, other=0.0), x)[None, :]
    acc = tl.zeros([BLOCK_P], tl.float32)
    c_first = tl.program_id(1) * c_chunk
    for c0 in range(c_first, c_first + c_chunk, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & (p < P)[None, :]
        d = tl.load(dy + _at(n, c, p, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        sv = _round(tl.load(s + n * C + c, mask=c < C, other=0.0), x)[:, None]
        if COMBINE == 2:
            to_c = d * v * qv
            to_p = d * _round(v * sv, x)
        else:
            _, wa, wb = _pair_shares(v, sv, qv, x, COMBINE)
            to_c = d * v * wa
            to_p = d * v * wb
        tl.store(by_c + (n * C + c) * tl.num_programs(0) + tl.program_id(0), tl.sum(to_c, 1), mask=c < C)
        acc += tl.sum(to_p, 0)
    tl.store(by_p + (n * tl.num_programs(1) + tl.program_id(1)) * P + p, acc, mask=p < P)


@_jit
def _grad_pair_kernel(dy, x, s, q, a, w, dz, dx, xsn, xsc, xsp, C, P, W, sn, sc, sp, COMBINE: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy·∂y/∂x + a[n, c] + w[c]·dz[n, p]."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    d = tl.load(dy + at, mask=mask).to(tl.float32)
    sv = _round(tl.load(s + n * C + c, mask=c < C), dy)[:, None]
    qv = _round(tl.load(q + n * P + p, mask=p < P), dy)[None, :]
    if COMBINE == 2:
        local = d * sv * qv
    else:
        v = tl.load(x + _at(n, c, p, xsn, xsc, xsp), mask=mask).to(tl.float32)
        _, wa, wb = _pair_shares(v, sv, qv, dy, COMBINE)
        local = d * (wa * sv + wb * qv)
    out = local + tl.load(a + n * C + c, mask=c < C)[:, None]
    out = out + tl.load(w + c, mask=c < C)[:, None] * tl.load(dz + n * P + p, mask=p < P)[None, :]
    tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)


# --- SGE: G equal groups of K = C/G channels; per-group maps [N, G, P] ---

@_jit
def _sum_groups_kernel(x, m, dy, out, G, K, C, P, sn, sc, sp, dsn, dsc, dsp, WITH_DY: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Σ over the channels of group g of f·x for a block of positions, f = dy (WITH_DY) or m[n, c]."""
    n = tl.program_id(2)
    g = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for k0 in range(0, K, BLOCK_C):
        c = g * K + k0 + tl.arange(0, BLOCK_C)
        in_group = (k0 + tl.arange(0, BLOCK_C)) < K
        mask = in_group[:, None] & (p < P)[None, :]
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        if WITH_DY:
            f = tl.load(dy + _at(n, c, p, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
        else:
            f = tl.load(m + n * C + c, mask=in_group, other=0.0)[:, None]
        acc += tl.sum(v * f, 0)
    tl.store(out + (n * G + g) * P + p, acc, mask=p < P)


@_jit
def _scale_groups_kernel(x, a, y, K, G, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = x · a[n, c // K, p]."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    av = _round(tl.load(a + (n * G + c // K)[:, None] * P + p[None, :], mask=mask), x)
    tl.store(y + at, _to(tl.load(x + at, mask=mask).to(tl.float32) * av, y.dtype.element_ty), mask=mask)


@_jit
def _dot_x_groups_kernel(x, u, out, K, G, C, P, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Σ_p x·u[n, c // K, p] of BLOCK_C channels."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (c < C)[:, None] & (p < P)[None, :]
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(v * tl.load(u + (n * G + c // K)[:, None] * P + p[None, :], mask=mask, other=0.0), 1)
    tl.store(out + n * C + c, total, mask=c < C)


@_jit
def _grad_groups_kernel(dy, a, m, u, b, dx, K, G, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy·a[n, g, p] + u[n, g, p]·m[n, c] + b[n, c], g = c // K."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    at = _at(n, c, p, sn, sc, sp)
    group_at = (n * G + c // K)[:, None] * P + p[None, :]
    out = tl.load(dy + at, mask=mask).to(tl.float32) * _round(tl.load(a + group_at, mask=mask), dy)
    out = out + tl.load(u + group_at, mask=mask) * tl.load(m + n * C + c, mask=c < C)[:, None]
    out = out + tl.load(b + n * C + c, mask=c < C)[:, None]
    tl.store(dx + at, _to(out, dx.dtype.element_ty), mask=mask)


# --- Shuffle Attention: s = σ(α[n, c]·(x − m[n, c]) + β[n, c]); y and dy in channels perm[c] ---

@_jit
def _affine(v, alpha, beta, m, nc, C_MASK):
    """(s, x − m) on a tile, per-channel α, β, m at offsets nc."""
    d = v - tl.load(m + nc, mask=C_MASK, other=0.0)[:, None]
    e = tl.load(alpha + nc, mask=C_MASK, other=0.0)[:, None] * d + tl.load(beta + nc, mask=C_MASK, other=0.0)[:, None]
    return tl.sigmoid(e), d


@_jit
def _scale_affine_kernel(x, alpha, beta, m, perm, y, C, P, W, sn, sc, sp, BLOCK_C: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """y[n, perm[c]] = x · s."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask).to(tl.float32)
    s, _ = _affine(v, alpha, beta, m, n * C + c, c < C)
    out_c = tl.load(perm + c, mask=c < C, other=0)
    tl.store(y + _at(n, out_c, p, sn, sc, sp), _to(v * _round(s, x), y.dtype.element_ty), mask=mask)


@_jit
def _dot_affine_kernel(dy, x, alpha, beta, m, perm, ta, tb, C, P, dsn, dsc, dsp, sn, sc, sp, BLOCK_C: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Σ_p t·(x − m) and Σ_p t of BLOCK_C channels, t = dy[n, perm[c]]·x·s·(1 − s)."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    out_c = tl.load(perm + c, mask=c < C, other=0)
    total_a = tl.zeros([BLOCK_C], tl.float32)
    total_b = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (c < C)[:, None] & (p < P)[None, :]
        v = tl.load(x + _at(n, c, p, sn, sc, sp), mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy + _at(n, out_c, p, dsn, dsc, dsp), mask=mask, other=0.0).to(tl.float32)
        s, d = _affine(v, alpha, beta, m, n * C + c, c < C)
        t = tl.where(mask, g * v * s * (1.0 - s), 0.0)
        total_a += tl.sum(t * d, 1)
        total_b += tl.sum(t, 1)
    tl.store(ta + n * C + c, total_a, mask=c < C)
    tl.store(tb + n * C + c, total_b, mask=c < C)


@_jit
def _grad_affine_kernel(dy, x, alpha, beta, m, a, b, perm, dx, xsn, xsc, xsp, C, P, W, sn, sc, sp,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = dy[n, perm[c]]·s + t·α + a + b·(x − m), per-channel α, β, m, a, b."""
    n, c, p, mask = _tile(C, P, BLOCK_C, BLOCK_P)
    nc = n * C + c
    out_c = tl.load(perm + c, mask=c < C, other=0)
    g = tl.load(dy + _at(n, out_c, p, sn, sc, sp), mask=mask).to(tl.float32)
    v = tl.load(x + _at(n, c, p, xsn, xsc, xsp), mask=mask).to(tl.float32)
    s, d = _affine(v, alpha, beta, m, nc, c < C)
    t = g * v * s * (1.0 - s)
    out = g * _round(s, dy) + t * tl.load(alpha + nc, mask=c < C)[:, None] + tl.load(a + nc, mask=c < C)[:, None]
    out = out + tl.load(b + nc, mask=c < C)[:, None] * d
    tl.store(dx + _at(n, c, p, sn, sc, sp), _to(out, dx.dtype.element_ty), mask=mask)


# --- host side: layouts, blocks, launches ---

def _full(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """A full-size tensor, copied to NCHW unless contiguous NCHW or channels_last, and its strides over [N, C, P]."""
    if t.dim() != 4 or t.dtype not in FULL_DTYPES:
        raise ValueError(f"attnkit.kernels.triton: needs an N×C×H×W tensor of {FULL_DTYPES}, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous()
    sn, sc, sh, sw = t.stride()
    return t, (sn, sc, sh if t.shape[3] == 1 else sw)  # both layouts store position h·W + w at (h·W + w)·sw


def _small(t: Tensor) -> Tensor:
    """A factor or index tensor as the kernels read it: contiguous, float32 (indices stay int64)."""
    return t.contiguous() if t.dtype == torch.int64 else t.to(torch.float32).contiguous()


def _stats(*shape: int, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _channels_last(strides: tuple[int, int, int]) -> bool:
    _, sc, sp = strides
    return sc < sp


def _blocks(c: int, p: int, strides: tuple[int, int, int]) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): up to _RUN_C channels (channels_last) or _RUN_P positions (NCHW) along the contiguous axis,
    then across it up to _TILE elements."""
    if _channels_last(strides):
        bc = min(_pow2(c), _RUN_C)
        return bc, min(_pow2(p), max(1, _TILE // bc))
    bp = min(_pow2(p), _RUN_P)
    return min(_pow2(c), max(1, _TILE // bp)), bp


def _blocks_3d(c: int, h: int, w: int, channels_first: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W) for programs walking whole planes: BLOCK_W spans W; channels_first (channels_last
    memory, or a pass that also reduces over C) takes up to _RUN_C channels before rows, otherwise rows first."""
    bw = _pow2(w)
    fit = max(1, _TILE // bw)
    if channels_first:
        bc = min(_pow2(c), _RUN_C, fit)
        return bc, min(_pow2(h), max(1, fit // bc)), bw
    bh = min(_pow2(h), fit)
    return min(_pow2(c), _RUN_C, max(1, fit // bh)), bh, bw


def _channel_chunks(n: int, c: int, p: int, s: tuple[int, int, int]) -> tuple[int, int, int, int, int]:
    """The tiling of a pass over C: (BLOCK_C, BLOCK_P, position blocks, channels per program, programs along C).
    A program takes all the channels, or fewer so that about _PROGRAMS programs run."""
    block_c, block_p = _blocks(c, p, s)
    p_blocks = triton.cdiv(p, block_p)
    chunks = max(1, min(triton.cdiv(c, block_c), _PROGRAMS // max(1, n * p_blocks)))
    chunk = triton.cdiv(triton.cdiv(c, chunks), block_c) * block_c
    return block_c, block_p, p_blocks, chunk, triton.cdiv(c, chunk)


def _launch(kernel: Callable, grid: tuple[int, ...], *args: object, **constexprs: object) -> None:
    """kernel[grid](*args) on the device of args[0] (a full-size tensor). No fused multiply-adds: each float32
    operation rounds as torch's separate ones do, so full-size outputs equal the reference's bit for bit."""
    with torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext():
        kernel[grid](*args, **constexprs, num_warps=_WARPS, enable_fp_fusion=False)


def _elementwise(kernel: Callable, like: Tensor, strides: tuple[int, int, int], *args: object,
                 **constexprs: object) -> None:
    """Launch an elementwise kernel on the grid (P blocks, C blocks, N) of `like`, with arguments (*args, C, P, W,
    *strides, **constexprs, BLOCK_C, BLOCK_P)."""
    n, c, h, w = like.shape
    bc, bp = _blocks(c, h * w, strides)
    _launch(kernel, (triton.cdiv(h * w, bp), triton.cdiv(c, bc), n), *args, c, h * w, w, *strides, **constexprs,
            BLOCK_C=bc, BLOCK_P=bp)


def _first_max_of_parts(top: Tensor, top_at: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Combine per-part (maximum, first index) along dim, parts in index order: torch.max takes the first part
    holding the maximum (or a NaN), whose first index is then the overall first."""
    best, part = top.max(dim)
    return best, top_at.gather(dim, part.unsqueeze(dim)).squeeze(dim).long()


# --- the primitives (reference.py's, which document each) ---

def pool_hw(x: Tensor, with_m2: bool) -> tuple[Tensor, Tensor | None]:
    """mean[N, C] over H×W, and the sum of squared deviations from it, M2[N, C], when asked."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    mean = _stats(n, c, like=x)
    m2 = _stats(n, c, like=x) if with_m2 else None
    bc, bp = _blocks(c, h * w, s)
    _launch(_pool_hw_kernel, (triton.cdiv(c, bc), n), x, mean, mean if m2 is None else m2, c, h * w, *s,
            WITH_M2=with_m2, ABS=False, BLOCK_C=bc, BLOCK_P=bp)
    return mean, m2


def scale_c(x: Tensor, g: Tensor) -> Tensor:
    """y = x · g[n, c]."""
    return _scaled(_scale_c_kernel, x, None, False, _small(g))


def scale_c_add(x: Tensor, g: Tensor, r: Tensor, relu: bool) -> Tensor:
    """scale_c, then + r, then max(·, 0) when `relu`."""
    return _scaled(_scale_c_kernel, x, r, relu, _small(g))


def _scaled(kernel: Callable, x: Tensor, r: Tensor | None, relu: bool, *factors: Tensor) -> Tensor:
    """A scaling kernel's y for x and its factors, ended by the residual r (and the ReLU) where r is given."""
    _require()
    x, s = _full(x)
    y = torch.empty_like(x)  # x is dense, so y gets its strides and the kernels address both alike
    residual = x if r is None else in_layout_of(r, x)  # x: an unread stand-in
    _elementwise(kernel, x, s, x, *factors, residual, y, RESIDUAL=r is not None, RELU=relu)
    return y


def dot_hw(dy: Tensor, x: Tensor) -> Tensor:
    """Σ_hw dy·x, [N, C]."""
    return _dot_hw(dy, None, x)[0]


def dot_hw_relu(dy: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw dr·x [N, C], dr = dy where y > 0, else 0)."""
    return _dot_hw(dy, y, x)


def _dot_hw(dy: Tensor, y: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(Σ_hw dy·x, None), or with y (Σ_hw dr·x, dr)."""
    _require()
    x, s = _full(x)
    if y is None:
        dy, ds = _full(dy)
        y = dr = x  # unread stand-ins
    else:
        dy, y, ds = in_layout_of(dy, x), in_layout_of(y, x), s
        dr = torch.empty_like(x, dtype=dy.dtype)
    n, c, h, w = x.shape
    out = _stats(n, c, like=x)
    bc, bp = _blocks(c, h * w, s)
    _launch(_dot_hw_kernel, (triton.cdiv(c, bc), n), dy, y, x, dr, out, c, h * w, *ds, *s, MASKED=dr is not x,
            BLOCK_C=bc, BLOCK_P=bp)
    return out, None if dr is x else dr


def grad_c(dy: Tensor, g: Tensor, a: Tensor, x: Tensor | None = None, b: Tensor | None = None,
           m: Tensor | None = None) -> Tensor:
    """dx = dy·g[n, c] + a[n, c] (+ b[n, c]·(x − m[n, c]) when b is given), rounded to dy's dtype once."""
    _require()
    dy, ds = _full(dy)
    with_b = b is not None
    x, s = _full(x) if with_b else (dy, ds)
    g, a = _small(g), _small(a)
    b, m = (_small(b), _small(m)) if with_b else (a, a)  # unread stand-ins without b
    dx = torch.empty_like(dy)
    _elementwise(_grad_c_kernel, dy, ds, dy, g, a, x, b, m, dx, *s, WITH_B=with_b, WITH_SIGN=False)
    return dx


def pool_abs_hw(x: Tensor) -> Tensor:
    """mean[N, C] of |x| over H×W."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    mean = _stats(n, c, like=x)
    bc, bp = _blocks(c, h * w, s)
    _launch(_pool_hw_kernel, (triton.cdiv(c, bc), n), x, mean, mean, c, h * w, *s, WITH_M2=False, ABS=True,
            BLOCK_C=bc, BLOCK_P=bp)
    return mean


def grad_c_sign(dy: Tensor, g: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """dx = dy·g[n, c] + a[n, c]·sign(x), rounded to dy's dtype once."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    g, a = _small(g), _small(a)
    dx = torch.empty_like(dy)
    _elementwise(_grad_c_kernel, dy, ds, dy, g, a, x, a, a, dx, *s, WITH_B=False, WITH_SIGN=True)
    return dx


def pool_k(x: Tensor, k: Tensor) -> Tensor:
    """Σ_hw x·k[c, h, w], [N, C]."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    out = _stats(n, c, like=x)
    bc, bp = _blocks(c, h * w, s)
    # Σ_p k·x: dot_hw's kernel with k as its first operand, the same [C, P] for every sample (stride 0 over N)
    _launch(_dot_hw_kernel, (triton.cdiv(c, bc), n), _small(k), x, x, x, out, c, h * w, 0, h * w, 1, *s, MASKED=False,
            BLOCK_C=bc, BLOCK_P=bp)
    return out


def grad_k(dy: Tensor, g: Tensor, a: Tensor, x: Tensor, k: Tensor, with_dx: bool,
           with_dk: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dx = dy·g[n, c] + a[n, c]·k[c, h, w], dk[c, h, w] = Σ_n a[n, c]·x), each only when asked."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    n, c, h, w = dy.shape
    a = _small(a)
    dx = torch.empty_like(dy) if with_dx else None
    dk = _stats(c, h, w, like=dy) if with_dk else None
    bc, bp = _blocks(c, h * w, ds)
    _launch(_grad_k_kernel, (triton.cdiv(h * w, bp), triton.cdiv(c, bc)), dy, _small(g), a, x, _small(k),
            dy if dx is None else dx, a if dk is None else dk, n, c, h * w, *ds, *s,  # unwritten stand-ins
            WITH_DX=with_dx, WITH_DK=with_dk, BLOCK_C=bc, BLOCK_P=bp)
    return dx, dk


def pool_h_w(x: Tensor) -> Tensor:
    """The joined pools [N, C, H + W]: the mean over W of each row, then the mean over H of each column."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    z = _stats(n, c, h + w, like=x)
    bc, bh, bw = _blocks_3d(c, h, w, _channels_last(s))
    _launch(_pool_h_w_kernel, (triton.cdiv(c, bc), n), x, z, c, h, w, *s, BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw)
    return z


def scale_hw(x: Tensor, ah: Tensor, aw: Tensor) -> Tensor:
    """y = x · aw[n, c, w] · ah[n, c, h] (the reference's order of rounding)."""
    return _scaled(_scale_hw_kernel, x, None, False, _small(ah), _small(aw))


def scale_hw_add(x: Tensor, ah: Tensor, aw: Tensor, r: Tensor, relu: bool) -> Tensor:
    """scale_hw, then + r, then max(·, 0) when `relu`."""
    return _scaled(_scale_hw_kernel, x, r, relu, _small(ah), _small(aw))


def dot_h_w(dy: Tensor, x: Tensor, ah: Tensor, aw: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_w dy·x·aw [N, C, H], Σ_h dy·x·ah [N, C, W]), with the factors as rounded in the forward."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    n, c, h, w = x.shape
    out_h, out_w = _stats(n, c, h, like=x), _stats(n, c, w, like=x)
    bc, bh, bw = _blocks_3d(c, h, w, _channels_last(s))
    _launch(_dot_h_w_kernel, (triton.cdiv(c, bc), n), dy, x, _small(ah), _small(aw), out_h, out_w, c, h, w, *ds, *s,
            BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw)
    return out_h, out_w


def grad_hw(dy: Tensor, ah: Tensor, aw: Tensor, bh: Tensor, bw: Tensor) -> Tensor:
    """dx = dy·ah·aw + bh[n, c, h] + bw[n, c, w]."""
    _require()
    dy, s = _full(dy)
    dx = torch.empty_like(dy)
    _elementwise(_grad_hw_kernel, dy, s, dy, _small(ah), _small(aw), _small(bh), _small(bw), dx)
    return dx


def pool_hw_avgmax(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, index of the first max) over H×W, each [N, C]; the index counts h·W + w."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    mean, top, top_at = _stats(n, c, like=x), _stats(n, c, like=x), _stats(n, c, like=x, dtype=torch.int64)
    bc, bp = _blocks(c, h * w, s)
    _launch(_pool_hw_avgmax_kernel, (triton.cdiv(c, bc), n), x, mean, top, top_at, c, h * w, *s, BLOCK_C=bc,
            BLOCK_P=bp)
    return mean, top, top_at


def pool_c_gated(x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, index of the first max) over C of x·mc (rounded to x's dtype), each [N, H, W]."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    bc, bp, p_blocks, chunk, parts = _channel_chunks(n, c, h * w, s)
    total, top = _stats(n, parts, h, w, like=x), _stats(n, parts, h, w, like=x)
    top_at = _stats(n, parts, h, w, like=x, dtype=torch.int32)
    _launch(_pool_c_gated_kernel, (p_blocks, parts, n), x, _small(mc), total, top, top_at, c, h * w, chunk, *s,
            BLOCK_C=bc, BLOCK_P=bp)
    return (total.sum(1) / c, *_first_max_of_parts(top, top_at, 1))


def scale_cs(x: Tensor, mc: Tensor, ms: Tensor) -> Tensor:
    """y = (x · mc[n, c]) · ms[n, h, w]."""
    return _scaled(_scale_cs_kernel, x, None, False, _small(mc), _small(ms))


def scale_cs_add(x: Tensor, mc: Tensor, ms: Tensor, r: Tensor, relu: bool) -> Tensor:
    """scale_cs, then + r, then max(·, 0) when `relu`."""
    return _scaled(_scale_cs_kernel, x, r, relu, _small(mc), _small(ms))


def dot_cs(dy: Tensor, x: Tensor, mc: Tensor, ms: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw dy·x·ms [N, C], Σ_c dy·(x·mc) [N, H, W]), factors as rounded in the forward."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    n, c, h, w = x.shape
    bc, bp, p_blocks, chunk, parts = _channel_chunks(n, c, h * w, s)
    by_c, by_p = _stats(n, c, p_blocks, like=x), _stats(n, parts, h, w, like=x)
    _launch(_dot_cs_kernel, (p_blocks, parts, n), dy, x, _small(mc), _small(ms), by_c, by_p, c, h * w, chunk, *ds,
            *s, BLOCK_C=bc, BLOCK_P=bp)
    return by_c.sum(2), by_p.sum(1)


def dot_x_s(x: Tensor, u: Tensor, v: Tensor, argc: Tensor) -> Tensor:
    """Σ_hw x·(u[n, h, w] + v[n, h, w]·[c = argc[n, h, w]]), [N, C]."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    bc, bp, p_blocks, chunk, parts = _channel_chunks(n, c, h * w, s)
    by_c = _stats(n, c, p_blocks, like=x)
    _launch(_dot_x_s_kernel, (p_blocks, parts, n), x, _small(u), _small(v), _small(argc), by_c, c,
            h * w, chunk, *s, BLOCK_C=bc, BLOCK_P=bp)
    return by_c.sum(2)


def grad_cs(dy: Tensor, mc: Tensor, ms: Tensor, u: Tensor, v: Tensor, argc: Tensor,
            a: Tensor, b: Tensor, arghw: Tensor) -> Tensor:
    """dx = mc·(dy·ms + u + v·[c = argc]) + a[n, c] + b[n, c]·[h·W + w = arghw[n, c]]."""
    _require()
    dy, s = _full(dy)
    dx = torch.empty_like(dy)
    _elementwise(_grad_cs_kernel, dy, s, dy, *[_small(t) for t in (mc, ms, u, v, argc, a, b, arghw)], dx)
    return dx


def zpool3(x: Tensor, spatial: bool) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
    """For H ([N, C, W]), W ([N, C, H]) and, if `spatial`, C ([N, H, W]): (max, index of the first max, mean).
    One read of x: a program holds whole planes of a block of channels, so its pools over H and W are complete; its
    pools over C cover its block, and the blocks' are combined after."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    bc, bh, bw = _blocks_3d(c, h, w, channels_first=spatial or _channels_last(s))
    blocks = triton.cdiv(c, bc)
    over_h = (_stats(n, c, w, like=x), _stats(n, c, w, like=x, dtype=torch.int64), _stats(n, c, w, like=x))
    over_w = (_stats(n, c, h, like=x), _stats(n, c, h, like=x, dtype=torch.int64), _stats(n, c, h, like=x))
    over_c = ((_stats(n, blocks, h, w, like=x), _stats(n, blocks, h, w, like=x, dtype=torch.int32),
               _stats(n, blocks, h, w, like=x)) if spatial else over_h)  # unwritten stand-ins without `spatial`
    _launch(_zpool3_kernel, (blocks, n), x, *over_h, *over_w, *over_c, c, h, w, *s, SPATIAL=spatial, BLOCK_C=bc,
            BLOCK_H=bh, BLOCK_W=bw)
    if not spatial:
        return over_h, over_w
    top, top_at, total = over_c
    return over_h, over_w, (*_first_max_of_parts(top, top_at, 1), total.sum(1) / c)


def scale_mean3(x: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None) -> Tensor:
    """y = x · (a_cw[n, c, w] + a_hc[n, c, h] (+ a_hw[n, h, w])) / (number of gates)."""
    _require()
    x, s = _full(x)
    y = torch.empty_like(x)
    a_cw = _small(a_cw)
    _elementwise(_scale_mean3_kernel, x, s, x, a_cw, _small(a_hc), a_cw if a_hw is None else _small(a_hw), y,
                 SPATIAL=a_hw is not None)
    return y


def dot3(dy: Tensor, x: Tensor, spatial: bool) -> tuple[Tensor, ...]:
    """Σ_h dy·x [N, C, W], Σ_w dy·x [N, C, H] and, if `spatial`, Σ_c dy·x [N, H, W], in one pass as zpool3."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    n, c, h, w = x.shape
    bc, bh, bw = _blocks_3d(c, h, w, channels_first=spatial or _channels_last(s))
    by_h, by_w = _stats(n, c, w, like=x), _stats(n, c, h, like=x)
    by_c = _stats(n, triton.cdiv(c, bc), h, w, like=x) if spatial else by_h  # an unwritten stand-in
    _launch(_dot3_kernel, (triton.cdiv(c, bc), n), dy, x, by_h, by_w, by_c, c, h, w, *ds, *s, SPATIAL=spatial,
            BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw)
    return (by_h, by_w, by_c.sum(1)) if spatial else (by_h, by_w)


def grad_mean3(dy: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None,
               pools: tuple[tuple[Tensor, Tensor, Tensor], ...]) -> Tensor:
    """dx = dy·gate + Σ over the pooled axes d of (u_d + v_d·[position along d = argmax_d]), each pool (v_d,
    argmax_d, u_d) for H, W and, with a_hw, C."""
    _require()
    dy, s = _full(dy)
    spatial = a_hw is not None
    if len(pools) != 2 + spatial:
        raise ValueError(f"grad_mean3: {2 + spatial} pools go with a_hw {'given' if spatial else 'None'}, "
                         f"got {len(pools)}")
    a_cw = _small(a_cw)
    pooled = [_small(t) for pool in pools for t in pool]
    if not spatial:
        pooled += pooled[:3]  # unread stand-ins for the pool over C
    dx = torch.empty_like(dy)
    _elementwise(_grad_mean3_kernel, dy, s, dy, a_cw, _small(a_hc), _small(a_hw) if spatial else a_cw, *pooled, dx,
                 SPATIAL=spatial)
    return dx


def scale_energy(x: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """y = x · σ((x − m[n, c])² / q[n, c] + ½)."""
    _require()
    x, s = _full(x)
    y = torch.empty_like(x)
    _elementwise(_scale_energy_kernel, x, s, x, _small(m), _small(q), y)
    return y


def dot_energy(dy: Tensor, x: Tensor, m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw t·(x − m), Σ_hw t·(x − m)²), t = dy·x·s·(1 − s)."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    n, c, h, w = x.shape
    ta, tb = _stats(n, c, like=x), _stats(n, c, like=x)
    bc, bp = _blocks(c, h * w, s)
    _launch(_dot_energy_kernel, (triton.cdiv(c, bc), n), dy, x, _small(m), _small(q), ta, tb, c, h * w, *ds, *s,
            BLOCK_C=bc, BLOCK_P=bp)
    return ta, tb


def grad_energy(dy: Tensor, x: Tensor, m: Tensor, q: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """dx = dy·s + (x − m)·(2t / q[n, c] + b[n, c]) + a[n, c], rounded to dy's dtype once."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    dx = torch.empty_like(dy)
    _elementwise(_grad_energy_kernel, dy, ds, dy, x, _small(m), _small(q), _small(a), _small(b), dx, *s)
    return dx


def pool_c_weighted(x: Tensor, w: Tensor) -> Tensor:
    """Σ_c w[c]·x, [N, H, W]."""
    _require()
    x, s = _full(x)
    n, c, h, wd = x.shape
    z = _stats(n, h, wd, like=x)
    bc, bp = _blocks(c, h * wd, s)
    _launch(_pool_c_weighted_kernel, (triton.cdiv(h * wd, bp), n), x, _small(w), z, c, h * wd, *s, BLOCK_C=bc,
            BLOCK_P=bp)
    return z


def scale_pair(x: Tensor, s: Tensor, q: Tensor, combine: str) -> Tensor:
    """y = max(x·s[n, c], x·q[n, h, w]), x·s + x·q or (x·s)·q."""
    _require()
    x, st = _full(x)
    y = torch.empty_like(x)
    _elementwise(_scale_pair_kernel, x, st, x, _small(s), _small(q), y, COMBINE=COMBINES[combine])
    return y


def dot_pair(dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str) -> tuple[Tensor, Tensor]:
    """(Σ_hw dy·∂y/∂s [N, C], Σ_c dy·∂y/∂q [N, H, W])."""
    _require()
    dy, ds = _full(dy)
    x, st = _full(x)
    n, c, h, w = x.shape
    bc, bp, p_blocks, chunk, parts = _channel_chunks(n, c, h * w, st)
    by_c, by_p = _stats(n, c, p_blocks, like=x), _stats(n, parts, h, w, like=x)
    _launch(_dot_pair_kernel, (p_blocks, parts, n), dy, x, _small(s), _small(q), by_c, by_p, c, h * w, chunk, *ds,
            *st, COMBINE=COMBINES[combine], BLOCK_C=bc, BLOCK_P=bp)
    return by_c.sum(2), by_p.sum(1)


def grad_pair(dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str, a: Tensor, w: Tensor, dz: Tensor) -> Tensor:
    """dx = dy·∂y/∂x + a[n, c] + w[c]·dz[n, h, w], rounded to dy's dtype once."""
    _require()
    dy, ds = _full(dy)
    x, st = _full(x)
    dx = torch.empty_like(dy)
    _elementwise(_grad_pair_kernel, dy, ds, dy, x, _small(s), _small(q), _small(a), _small(w), _small(dz), dx, *st,
                 COMBINE=COMBINES[combine])
    return dx


def _sum_groups(x: Tensor, m: Tensor | None, dy: Tensor | None, groups: int) -> Tensor:
    x, s = _full(x)
    n, c, h, w = x.shape
    dy, ds = _full(dy) if dy is not None else (x, s)  # an unread stand-in without dy
    out = _stats(n, groups, h, w, like=x)
    bc, bp = _blocks(c // groups, h * w, s)
    _launch(_sum_groups_kernel, (triton.cdiv(h * w, bp), groups, n), x, out if m is None else _small(m), dy, out,
            groups, c // groups, c, h * w, *s, *ds, WITH_DY=m is None, BLOCK_C=bc, BLOCK_P=bp)
    return out


def pool_groups(x: Tensor, m: Tensor, groups: int) -> Tensor:
    """Σ over the channels c of group g of m[n, c]·x, [N, G, H, W]."""
    _require()
    return _sum_groups(x, m, None, groups)


def scale_groups(x: Tensor, a: Tensor) -> Tensor:
    """y = x · a[n, g, h, w], g the group of x's channel."""
    _require()
    x, s = _full(x)
    groups = a.shape[1]
    y = torch.empty_like(x)
    _elementwise(_scale_groups_kernel, x, s, x, _small(a), y, x.shape[1] // groups, groups)
    return y


def dot_groups(dy: Tensor, x: Tensor, groups: int) -> Tensor:
    """Σ over the channels of each group of dy·x, [N, G, H, W]."""
    _require()
    return _sum_groups(x, None, dy, groups)


def dot_x_groups(x: Tensor, u: Tensor) -> Tensor:
    """Σ_hw x·u[n, g, h, w], [N, C]."""
    _require()
    x, s = _full(x)
    n, c, h, w = x.shape
    groups = u.shape[1]
    out = _stats(n, c, like=x)
    bc, bp = _blocks(c, h * w, s)
    _launch(_dot_x_groups_kernel, (triton.cdiv(c, bc), n), x, _small(u), out, c // groups, groups, c, h * w, *s,
            BLOCK_C=bc, BLOCK_P=bp)
    return out


def grad_groups(dy: Tensor, a: Tensor, m: Tensor, u: Tensor, b: Tensor) -> Tensor:
    """dx = dy·a[n, g, h, w] + u[n, g, h, w]·m[n, c] + b[n, c], rounded to dy's dtype once."""
    _require()
    dy, ds = _full(dy)
    groups = a.shape[1]
    dx = torch.empty_like(dy)
    _elementwise(_grad_groups_kernel, dy, ds, dy, _small(a), _small(m), _small(u), _small(b), dx,
                 dy.shape[1] // groups, groups)
    return dx


def scale_affine(x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> Tensor:
    """y[n, perm[c]] = x[n, c] · σ(α[n, c]·(x − m[n, c]) + β[n, c])."""
    _require()
    x, s = _full(x)
    y = torch.empty_like(x)
    _elementwise(_scale_affine_kernel, x, s, x, _small(alpha), _small(beta), _small(m), _small(perm), y)
    return y


def dot_affine(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw t·(x − m), Σ_hw t), t = dy[n, perm[c]]·x·s·(1 − s)."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    n, c, h, w = x.shape
    ta, tb = _stats(n, c, like=x), _stats(n, c, like=x)
    bc, bp = _blocks(c, h * w, s)
    _launch(_dot_affine_kernel, (triton.cdiv(c, bc), n), dy, x, _small(alpha), _small(beta), _small(m), _small(perm),
            ta, tb, c, h * w, *ds, *s, BLOCK_C=bc, BLOCK_P=bp)
    return ta, tb


def grad_affine(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, a: Tensor, b: Tensor,
                perm: Tensor) -> Tensor:
    """dx = dy[n, perm[c]]·s + t·α + a[n, c] + b[n, c]·(x − m[n, c]), rounded to dy's dtype once."""
    _require()
    dy, ds = _full(dy)
    x, s = _full(x)
    dx = torch.empty_like(dy)
    _elementwise(_grad_affine_kernel, dy, ds, dy, x, _small(alpha), _small(beta), _small(m), _small(a), _small(b),
                 _small(perm), dx, *s)
    return dx
