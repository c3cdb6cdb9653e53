"""Modules run on a fused path and on the reference path, and how far apart the results are."""
from __future__ import annotations

import torch

import attnkit
from attnkit import kernels


def create(spec: str, shape: tuple[int, ...]) -> torch.nn.Module:
    """The module of `spec` for input `shape`, {hw} in the spec standing for the map's (H, W) and {parts} for the
    largest of 8, 4, 2 and 1 that divides the channel count (FcaNet's frequency count)."""
    parts = next(k for k in (8, 4, 2, 1) if shape[1] % k == 0)
    return attnkit.create(spec.format(hw=tuple(shape[2:]), parts=parts), shape[1])


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random parameters (zero-initialised ones such as SRM's would hide mistakes) and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.8 + 0.2)
    return module


def run_in_mode(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str):
    xg = x.detach().requires_grad_()
    with kernels.use(mode):
        y = module(xg)
    y.backward(dy)
    grads = [xg.grad] + [p.grad for p in module.parameters()]
    buffers = [b.clone() for b in module.buffers() if b.is_floating_point()]
    return y, grads, buffers


def errors(got, want) -> list[float]:
    """For the output and each gradient, max |got − want| over the larger of max |want| and a tenth of the run's
    largest gradient (a gradient that is zero but for rounding, as a bias's before a BatchNorm, has no scale of
    its own)."""
    (y, grads, buffers), (y_want, grads_want, buffers_want) = got, want
    floor = 0.1 * max(g.abs().max().item() for g in grads_want if g is not None)
    errors = []
    for a, b in zip([y, *grads, *buffers], [y_want, *grads_want, *buffers_want]):
        assert (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype))
        if b is not None:
            scale = max(b.abs().max().item(), floor)
            errors.append((a.double() - b.double()).abs().max().item() / scale)
    return errors
