"""The fused paths' primitives written as plain torch ops: the specification each backend (cpu.py, triton.py) matches.

Shapes: x and dy are N×C×H×W in their own dtype and memory format; per-sample factors and statistics are float32
(float64 for float64 input) with the shapes named below ([N, C] per channel, [N, C, H] per row of a channel,
[N, C, W] per column, [N, H, W] per position); argmax indices are int64. Every product with x is rounded to x's
dtype after each factor, as the modules' reference formulas round it (`x * g.to(x.dtype)`), and a maximum's
index is the first one, as torch.max along a dimension reports it. Outputs keep x's memory format.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _f(t: Tensor) -> Tensor:
    """In at least float32, as the modules compute statistics."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _round(t: Tensor, like: Tensor) -> Tensor:
    """Round a factor to the input's dtype and back: the value `factor.to(x.dtype)` has in the reference."""
    return t.to(like.dtype).to(t.dtype)


def _one_hot(index: Tensor, size: int, dim: int) -> Tensor:
    """1 where the position along `dim` equals `index` (which lacks `dim`), else 0, as float32."""
    shape = [1] * (index.dim() + 1)
    shape[dim] = size
    positions = torch.arange(size, device=index.device).view(shape)
    return (index.unsqueeze(dim) == positions).float()


# --- one gate per channel: SE, ECA, SRM, Gather-Excite (global extent) ---

def pool_hw(x: Tensor, with_m2: bool) -> tuple[Tensor, Tensor | None]:
    """mean[N, C] over H×W, and the sum of squared deviations from it, M2[N, C], when asked."""
    xf = _f(x)
    mean = xf.mean((2, 3))
    return mean, ((xf - mean[:, :, None, None]) ** 2).sum((2, 3)) if with_m2 else None


def scale_c(x: Tensor, g: Tensor) -> Tensor:
    """y = x · g[n, c]."""
    return x * g.to(x.dtype)[:, :, None, None]


def dot_hw(dy: Tensor, x: Tensor) -> Tensor:
    """Σ_hw dy·x, [N, C]."""
    return (_f(dy) * _f(x)).sum((2, 3))


def _ended(y: Tensor, r: Tensor, relu: bool) -> Tensor:
    """A gated map y as a residual block ends it: y + r, then max(·, 0) when `relu`."""
    return torch.relu(y + r) if relu else y + r


def scale_c_add(x: Tensor, g: Tensor, r: Tensor, relu: bool) -> Tensor:
    """scale_c, then + r, then max(·, 0) when `relu` (a residual block's end)."""
    return _ended(scale_c(x, g), r, relu)


def dot_hw_relu(dy: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """scale_c_add's backward through its ReLU, y its output: (Σ_hw dr·x [N, C], dr = dy where y > 0, else 0)."""
    dr = torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype))
    return dot_hw(dr, x), dr


def grad_c(dy: Tensor, g: Tensor, a: Tensor, x: Tensor | None = None, b: Tensor | None = None,
           m: Tensor | None = None) -> Tensor:
    """dx = dy·g[n, c] + a[n, c] (+ b[n, c]·(x − m[n, c]) when b is given), rounded to dy's dtype once."""
    dx = _f(dy) * _round(g, dy)[:, :, None, None] + a[:, :, None, None]
    if b is not None:
        dx = dx + b[:, :, None, None] * (_f(x) - m[:, :, None, None])
    return dx.to(dy.dtype)


def pool_abs_hw(x: Tensor) -> Tensor:
    """mean[N, C] of |x| over H×W."""
    return _f(x).abs().mean((2, 3))


def grad_c_sign(dy: Tensor, g: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """dx = dy·g[n, c] + a[n, c]·sign(x) (the gradient torch gives |x|: 0 at 0), rounded to dy's dtype once."""
    return (_f(dy) * _round(g, dy)[:, :, None, None] + a[:, :, None, None] * torch.sign(_f(x))).to(dy.dtype)


# --- Gather-Excite θ, global extent: a depthwise kernel k [C, H, W] covering the map gathers each channel ---

def pool_k(x: Tensor, k: Tensor) -> Tensor:
    """Σ_hw x·k[c, h, w], [N, C]: the depthwise convolution whose kernel covers the map."""
    return (_f(x) * _f(k)).sum((2, 3))


def grad_k(dy: Tensor, g: Tensor, a: Tensor, x: Tensor, k: Tensor, with_dx: bool,
           with_dk: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dx = dy·g[n, c] + a[n, c]·k[c, h, w] rounded to dy's dtype once, dk[c, h, w] = Σ_n a[n, c]·x), each only
    when asked."""
    dx = (_f(dy) * _round(g, dy)[:, :, None, None] + a[:, :, None, None] * _f(k)).to(dy.dtype) if with_dx else None
    return dx, (a[:, :, None, None] * _f(x)).sum(0) if with_dk else None


# --- Coordinate Attention: one gate per row and one per column of each channel ---

def pool_h_w(x: Tensor) -> Tensor:
    """The joined pools [N, C, H + W]: the mean over W of each row, then the mean over H of each column."""
    xf = _f(x)
    return torch.cat([xf.mean(3), xf.mean(2)], 2)


def scale_hw(x: Tensor, ah: Tensor, aw: Tensor) -> Tensor:
    """y = x · aw[n, c, w] · ah[n, c, h] (the reference's order of rounding)."""
    return x * aw.to(x.dtype)[:, :, None, :] * ah.to(x.dtype)[:, :, :, None]


def scale_hw_add(x: Tensor, ah: Tensor, aw: Tensor, r: Tensor, relu: bool) -> Tensor:
    """scale_hw, then + r, then max(·, 0) when `relu` (a residual block's end)."""
    return _ended(scale_hw(x, ah, aw), r, relu)


def dot_h_w(dy: Tensor, x: Tensor, ah: Tensor, aw: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_w dy·x·aw [N, C, H], Σ_h dy·x·ah [N, C, W]), with the factors as rounded in the forward."""
    p = _f(dy) * _f(x)
    return (p * _round(aw, x)[:, :, None, :]).sum(3), (p * _round(ah, x)[:, :, :, None]).sum(2)


def grad_hw(dy: Tensor, ah: Tensor, aw: Tensor, bh: Tensor, bw: Tensor) -> Tensor:
    """dx = dy·ah·aw + bh[n, c, h] + bw[n, c, w]."""
    dx = _f(dy) * _round(ah, dy)[:, :, :, None] * _round(aw, dy)[:, :, None, :]
    return (dx + bh[:, :, :, None] + bw[:, :, None, :]).to(dy.dtype)


# --- CBAM: a channel gate, then a spatial gate pooled from the channel-gated map ---

def pool_hw_avgmax(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, index of the first max) over H×W, each [N, C]; the index counts h·W + w."""
    xf = _f(x).flatten(2)
    values, index = torch.max(xf, 2)
    return xf.mean(2), values, index


def pool_c_gated(x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, index of the first max) over C of x·mc (rounded to x's dtype), each [N, H, W]."""
    t = _f(scale_c(x, mc))
    values, index = torch.max(t, 1)
    return t.mean(1), values, index


def scale_cs(x: Tensor, mc: Tensor, ms: Tensor) -> Tensor:
    """y = (x · mc[n, c]) · ms[n, h, w]."""
    return scale_c(x, mc) * ms.to(x.dtype)[:, None]


def scale_cs_add(x: Tensor, mc: Tensor, ms: Tensor, r: Tensor, relu: bool) -> Tensor:
    """scale_cs, then + r, then max(·, 0) when `relu` (a residual block's end)."""
    return _ended(scale_cs(x, mc, ms), r, relu)


def dot_cs(dy: Tensor, x: Tensor, mc: Tensor, ms: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw dy·x·ms [N, C], Σ_c dy·(x·mc) [N, H, W]), factors as rounded in the forward."""
    p = _f(dy) * _f(x)
    return (p * _round(ms, x)[:, None]).sum((2, 3)), (_f(dy) * _f(scale_c(x, mc))).sum(1)


def dot_x_s(x: Tensor, u: Tensor, v: Tensor, argc: Tensor) -> Tensor:
    """Σ_hw x·(u[n, h, w] + v[n, h, w]·[c = argc[n, h, w]]), [N, C]."""
    weight = u[:, None] + v[:, None] * _one_hot(argc, x.shape[1], 1)
    return (_f(x) * weight).sum((2, 3))


def grad_cs(dy: Tensor, mc: Tensor, ms: Tensor, u: Tensor, v: Tensor, argc: Tensor,
            a: Tensor, b: Tensor, arghw: Tensor) -> Tensor:
    """dx = mc·(dy·ms + u + v·[c = argc]) + a[n, c] + b[n, c]·[h·W + w = arghw[n, c]]."""
    n, c, h, w = dy.shape
    t = _f(dy) * _round(ms, dy)[:, None] + u[:, None] + v[:, None] * _one_hot(argc, c, 1)
    at_max = _one_hot(arghw, h * w, 2).view(n, c, h, w)
    return (t * _round(mc, dy)[:, :, None, None] + a[:, :, None, None] + b[:, :, None, None] * at_max).to(dy.dtype)


# --- Triplet Attention: Z-pools over H, over W and over C; the mean of three gates ---

def zpool3(x: Tensor, spatial: bool) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
    """For H ([N, C, W]), W ([N, C, H]) and, if `spatial`, C ([N, H, W]): (max, index of the first max, mean)."""
    xf = _f(x)
    pools = []
    for dim in (2, 3, 1)[: 3 if spatial else 2]:
        values, index = torch.max(xf, dim)
        pools.append((values, index, xf.mean(dim)))
    return tuple(pools)


def _mean_gate(a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None) -> Tensor:
    gates = [a_cw[:, :, None, :], a_hc[:, :, :, None]] + ([a_hw[:, None]] if a_hw is not None else [])
    return sum(gates) / len(gates)


def scale_mean3(x: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None) -> Tensor:
    """y = x · (a_cw[n, c, w] + a_hc[n, c, h] (+ a_hw[n, h, w])) / (number of gates)."""
    return x * _mean_gate(a_cw, a_hc, a_hw).to(x.dtype)


def dot3(dy: Tensor, x: Tensor, spatial: bool) -> tuple[Tensor, ...]:
    """Σ_h dy·x [N, C, W], Σ_w dy·x [N, C, H] and, if `spatial`, Σ_c dy·x [N, H, W]."""
    p = _f(dy) * _f(x)
    return tuple(p.sum(dim) for dim in (2, 3, 1)[: 3 if spatial else 2])


def grad_mean3(dy: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None,
               pools: tuple[tuple[Tensor, Tensor, Tensor], ...]) -> Tensor:
    """dx = dy·gate + Σ over the pooled axes d of (u_d + v_d·[position along d = argmax_d]), where each pool is
    (v_d, argmax_d, u_d): the gradient of the max, the max's index and the gradient of the mean, already divided by
    the axis' length."""
    n, c, h, w = dy.shape
    dx = _f(dy) * _round(_mean_gate(a_cw, a_hc, a_hw), dy)
    for dim, (v, index, u) in zip((2, 3, 1), pools):
        dx = dx + u.unsqueeze(dim) + v.unsqueeze(dim) * _one_hot(index, dy.shape[dim], dim)
    return dx.to(dy.dtype)


# --- SimAM: an elementwise gate σ(e), e = (x − m[n, c])² / q[n, c] + ½, from each channel's mean and spread ---

def _energy(x: Tensor, m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """(s = σ(e), d = x − m), in float."""
    d = _f(x) - m[:, :, None, None]
    return torch.sigmoid(d * d / q[:, :, None, None] + 0.5), d


def scale_energy(x: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """y = x · σ((x − m[n, c])² / q[n, c] + ½)."""
    return x * _energy(x, m, q)[0].to(x.dtype)


def dot_energy(dy: Tensor, x: Tensor, m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw t·(x − m), Σ_hw t·(x − m)²), each [N, C], with t = dy·x·s·(1 − s) the gradient of e."""
    s, d = _energy(x, m, q)
    td = _f(dy) * _f(x) * s * (1 - s) * d
    return td.sum((2, 3)), (td * d).sum((2, 3))


def grad_energy(dy: Tensor, x: Tensor, m: Tensor, q: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """dx = dy·s + (x − m)·(2t / q[n, c] + b[n, c]) + a[n, c], t = dy·x·s·(1 − s), rounded to dy's dtype once."""
    s, d = _energy(x, m, q)
    t = _f(dy) * _f(x) * s * (1 - s)
    dx = _f(dy) * _round(s, dy) + d * (2 * t / q[:, :, None, None] + b[:, :, None, None]) + a[:, :, None, None]
    return dx.to(dy.dtype)


# --- scSE: a channel gate s [N, C] and a spatial gate q [N, H, W] from a 1×1 convolution C -> 1, combined ---

def pool_c_weighted(x: Tensor, w: Tensor) -> Tensor:
    """Σ_c w[c]·x, [N, H, W]: the 1×1 convolution from C channels to one, without its bias."""
    return (_f(x) * _f(w)[:, None, None]).sum(1)


def _pair(x: Tensor, s: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    return scale_c(x, s), x * q.to(x.dtype)[:, None]


def _pair_weights(x: Tensor, s: Tensor, q: Tensor, combine: str) -> tuple[Tensor | float, Tensor | float]:
    """∂y/∂(x·s) and ∂y/∂(x·q) for 'max' (torch.maximum's gradient: split evenly on ties) and 'add'."""
    if combine == "add":
        return 1.0, 1.0
    a, b = _pair(x, s, q)
    wa = (a > b).float() + 0.5 * (a == b).float()
    return wa, 1 - wa


def scale_pair(x: Tensor, s: Tensor, q: Tensor, combine: str) -> Tensor:
    """y = max(x·s[n, c], x·q[n, h, w]), x·s + x·q or (x·s)·q, for combine 'max', 'add' or 'mul'."""
    if combine == "mul":
        return scale_cs(x, s, q)
    a, b = _pair(x, s, q)
    return torch.maximum(a, b) if combine == "max" else a + b


def dot_pair(dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str) -> tuple[Tensor, Tensor]:
    """(Σ_hw dy·∂y/∂s [N, C], Σ_c dy·∂y/∂q [N, H, W]), factors as rounded in the forward ('mul': dot_cs)."""
    if combine == "mul":
        return dot_cs(dy, x, s, q)
    wa, wb = _pair_weights(x, s, q, combine)
    p = _f(dy) * _f(x)
    return (p * wa).sum((2, 3)), (p * wb).sum(1)


def grad_pair(dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str, a: Tensor, w: Tensor, dz: Tensor) -> Tensor:
    """dx = dy·∂y/∂x + a[n, c] + w[c]·dz[n, h, w], rounded to dy's dtype once."""
    s_r, q_r = _round(s, dy)[:, :, None, None], _round(q, dy)[:, None]
    if combine == "mul":
        local = _f(dy) * s_r * q_r
    else:
        wa, wb = _pair_weights(x, s, q, combine)
        local = _f(dy) * (wa * s_r + wb * q_r)
    return (local + a[:, :, None, None] + _f(w)[:, None, None] * dz[:, None]).to(dy.dtype)


# --- SGE: a gate per group of channels and position, from the similarity of each position to the group's means ---

def _per_channel(t: Tensor, channels: int) -> Tensor:
    """A per-group map [N, G, H, W] repeated for each of its group's channels, [N, C, H, W]."""
    return t.repeat_interleave(channels // t.shape[1], 1)


def pool_groups(x: Tensor, m: Tensor, groups: int) -> Tensor:
    """Σ over the channels c of group g of m[n, c]·x, [N, G, H, W]."""
    return (_f(x) * m[:, :, None, None]).unflatten(1, (groups, -1)).sum(2)


def scale_groups(x: Tensor, a: Tensor) -> Tensor:
    """y = x · a[n, g, h, w], g the group of x's channel (G = a.shape[1] equal groups)."""
    return x * _per_channel(a.to(x.dtype), x.shape[1])


def dot_groups(dy: Tensor, x: Tensor, groups: int) -> Tensor:
    """Σ over the channels of each group of dy·x, [N, G, H, W]."""
    return (_f(dy) * _f(x)).unflatten(1, (groups, -1)).sum(2)


def dot_x_groups(x: Tensor, u: Tensor) -> Tensor:
    """Σ_hw x·u[n, g, h, w], g the group of x's channel, [N, C]."""
    return (_f(x) * _per_channel(u, x.shape[1])).sum((2, 3))


def grad_groups(dy: Tensor, a: Tensor, m: Tensor, u: Tensor, b: Tensor) -> Tensor:
    """dx = dy·a[n, g, h, w] + u[n, g, h, w]·m[n, c] + b[n, c], rounded to dy's dtype once."""
    c = dy.shape[1]
    dx = _f(dy) * _per_channel(_round(a, dy), c) + _per_channel(u, c) * m[:, :, None, None] + b[:, :, None, None]
    return dx.to(dy.dtype)


# --- Shuffle Attention: a gate σ(α[n, c]·(x − m[n, c]) + β[n, c]) per element, written to permuted channels ---

def _affine_gate(x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor) -> Tensor:
    return torch.sigmoid(alpha[:, :, None, None] * (_f(x) - m[:, :, None, None]) + beta[:, :, None, None])


def scale_affine(x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> Tensor:
    """y[n, perm[c]] = x[n, c] · σ(α[n, c]·(x − m[n, c]) + β[n, c])."""
    y = torch.empty_like(x)
    y[:, perm] = x * _affine_gate(x, alpha, beta, m).to(x.dtype)
    return y


def dot_affine(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_hw t·(x − m), Σ_hw t), each [N, C], with t = dy[n, perm[c]]·x·s·(1 − s) the gradient of the gate's
    argument."""
    s = _affine_gate(x, alpha, beta, m)
    t = _f(dy[:, perm]) * _f(x) * s * (1 - s)
    return (t * (_f(x) - m[:, :, None, None])).sum((2, 3)), t.sum((2, 3))


def grad_affine(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, a: Tensor, b: Tensor,
                perm: Tensor) -> Tensor:
    """dx = dy[n, perm[c]]·s + t·α + a[n, c] + b[n, c]·(x − m[n, c]), t as in dot_affine, rounded to dy's dtype once
    (dx in x's channel order)."""
    s = _affine_gate(x, alpha, beta, m)
    d = _f(dy[:, perm])
    t = d * _f(x) * s * (1 - s)
    dx = d * _round(s, dy) + t * alpha[:, :, None, None] + a[:, :, None, None]
    dx = dx + b[:, :, None, None] * (_f(x) - m[:, :, None, None])
    return torch.empty_like(x, dtype=dy.dtype).copy_(dx)
