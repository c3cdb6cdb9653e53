"""Inputs for every primitive of attnkit/kernels/reference.py, to compare a backend with the reference."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

COMBINES = ("max", "add", "mul")  # scSE's
GROUP_MAPS = ("pool_groups", "dot_groups")  # [N, G, H, W] statistics, x's shape where each group has one channel
# rows shorter and longer than the C kernels' SHORT_ROW, of widths they specialise (BY_WIDTH: 7, 5, 2, 16, 28, 32) and
# not
SHAPES = [(2, 5, 3, 7), (1, 3, 1, 1), (3, 17, 6, 5), (2, 70, 4, 9), (1, 1, 5, 2), (2, 3, 5, 19), (1, 2, 3, 16),
          (1, 2, 2, 28), (1, 2, 2, 32)]


def feature_map(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, ties: bool, seed: int) -> Tensor:
    """x with ties (small integers, so maxima repeat) or without, in the given dtype and memory format."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def calls(x: Tensor, dy: Tensor, spatial: bool = True) -> dict[str, Callable]:
    """name -> function(ops) calling that primitive of the backend `ops` on inputs made from x and dy."""
    n, c, h, w = x.shape
    g = torch.Generator().manual_seed(1)

    def f(*shape: int) -> Tensor:
        return torch.rand(shape, generator=g) + 0.5

    def index(size: int, *shape: int) -> Tensor:
        return torch.randint(0, size, shape, generator=g)

    gc, a, b, m, q = f(n, c), f(n, c), f(n, c), f(n, c), f(n, c)
    k = f(c, h, w) - 1.0
    wc = f(c) - 1.0
    groups = next(k for k in (5, 3, 2, 1) if c % k == 0)  # SGE's: groups of one and of several channels
    a_g, u_g = f(n, groups, h, w), f(n, groups, h, w) - 1.0
    alpha, perm = f(n, c) - 1.0, torch.randperm(c, generator=g)  # Shuffle Attention's
    ah, aw, bh, bw = f(n, c, h), f(n, c, w), f(n, c, h), f(n, c, w)
    ms, u, v, argc, arghw = f(n, h, w), f(n, h, w), f(n, h, w), index(c, n, h, w), index(h * w, n, c)
    a_cw, a_hc, a_hw = f(n, c, w), f(n, c, h), f(n, h, w) if spatial else None
    pools = ((f(n, c, w), index(h, n, c, w), f(n, c, w)), (f(n, c, h), index(w, n, c, h), f(n, c, h)))
    pools += ((f(n, h, w), index(c, n, h, w), f(n, h, w)),) if spatial else ()
    return {
        "pool_hw": lambda ops: ops.pool_hw(x, False)[:1],
        "pool_hw m2": lambda ops: ops.pool_hw(x, True),
        "scale_c": lambda ops: ops.scale_c(x, gc),
        "dot_hw": lambda ops: ops.dot_hw(dy, x),
        "scale_c_add": lambda ops: ops.scale_c_add(x, gc, dy, False),
        "scale_c_add relu": lambda ops: ops.scale_c_add(x, gc, dy, True),
        "dot_hw_relu": lambda ops: ops.dot_hw_relu(dy, x, x),  # x as the output: negative, zero (ties) and positive
        "grad_c": lambda ops: ops.grad_c(dy, gc, a),
        "grad_c x": lambda ops: ops.grad_c(dy, gc, a, x, b, m),
        "pool_abs_hw": lambda ops: ops.pool_abs_hw(x),
        "grad_c_sign": lambda ops: ops.grad_c_sign(dy, gc, a, x),
        "pool_k": lambda ops: ops.pool_k(x, k),
        "grad_k": lambda ops: ops.grad_k(dy, gc, a, x, k, True, True),
        "grad_k dx": lambda ops: ops.grad_k(dy, gc, a, x, k, True, False),
        "grad_k dk": lambda ops: ops.grad_k(dy, gc, a, x, k, False, True),
        "pool_h_w": lambda ops: ops.pool_h_w(x),
        "scale_hw": lambda ops: ops.scale_hw(x, ah, aw),
        "scale_hw_add": lambda ops: ops.scale_hw_add(x, ah, aw, dy, False),
        "scale_hw_add relu": lambda ops: ops.scale_hw_add(x, ah, aw, dy, True),
        "dot_h_w": lambda ops: ops.dot_h_w(dy, x, ah, aw),
        "grad_hw": lambda ops: ops.grad_hw(dy, ah, aw, bh, bw),
        "pool_hw_avgmax": lambda ops: ops.pool_hw_avgmax(x),
        "pool_c_gated": lambda ops: ops.pool_c_gated(x, gc),
        "scale_cs": lambda ops: ops.scale_cs(x, gc, ms),
        "scale_cs_add": lambda ops: ops.scale_cs_add(x, gc, ms, dy, False),
        "scale_cs_add relu": lambda ops: ops.scale_cs_add(x, gc, ms, dy, True),
        "dot_cs": lambda ops: ops.dot_cs(dy, x, gc, ms),
        "dot_x_s": lambda ops: ops.dot_x_s(x, u, v, argc),
        "grad_cs": lambda ops: ops.grad_cs(dy, gc, ms, u, v, argc, a, b, arghw),
        "zpool3": lambda ops: [t for pool in ops.zpool3(x, spatial) for t in pool],
        "scale_mean3": lambda ops: ops.scale_mean3(x, a_cw, a_hc, a_hw),
        "dot3": lambda ops: ops.dot3(dy, x, spatial),
        "grad_mean3": lambda ops: ops.grad_mean3(dy, a_cw, a_hc, a_hw, pools),
        "scale_energy": lambda ops: ops.scale_energy(x, m, q),
        "dot_energy": lambda ops: ops.dot_energy(dy, x, m, q),
        "grad_energy": lambda ops: ops.grad_energy(dy, x, m, q, a, b),
        "pool_c_weighted": lambda ops: ops.pool_c_weighted(x, wc),
        "pool_groups": lambda ops: ops.pool_groups(x, m, groups),
        "scale_groups": lambda ops: ops.scale_groups(x, a_g),
        "dot_groups": lambda ops: ops.dot_groups(dy, x, groups),
        "dot_x_groups": lambda ops: ops.dot_x_groups(x, u_g),
        "grad_groups": lambda ops: ops.grad_groups(dy, a_g, m, u_g, b),
        "scale_affine": lambda ops: ops.scale_affine(x, alpha, b, m, perm),
        "dot_affine": lambda ops: ops.dot_affine(dy, x, alpha, b, m, perm),
        "grad_affine": lambda ops: ops.grad_affine(dy, x, alpha, b, m, a, gc, perm),
        **{f"scale_pair {combine}": lambda ops, combine=combine: ops.scale_pair(x, gc, ms, combine) for combine in COMBINES},
        **{f"dot_pair {combine}": lambda ops, combine=combine: ops.dot_pair(dy, x, gc, ms, combine)
           for combine in COMBINES},
        **{f"grad_pair {combine}": lambda ops, combine=combine: ops.grad_pair(dy, x, gc, ms, combine, a, wc, u)
           for combine in COMBINES},
    }


def outputs(result: object) -> list[Tensor]:
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if t is not None]


def assert_close(got: Tensor, want: Tensor, rtol: float, what: str) -> None:
    """Equal shapes and dtypes; integer tensors exactly; floats within rtol of the reference's largest value (both
    below 1e-6 where the reference is zero but for rounding)."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{what}: indices differ at {(got != want).nonzero()[:5].tolist()}"
        return
    scale = want.float().abs().max()
    if scale < 1e-6:  # zero but for rounding (e.g. the gradient of a bias followed by BatchNorm): both must be
        assert got.float().abs().max() < 1e-6, f"{what}: {got.float().abs().max():.2e} where the reference is 0"
        return
    error = (got.float() - want.float()).abs().max() / scale
    assert error <= rtol, f"{what}: max error {error:.2e} of the largest value, tolerance {rtol:.0e}"
