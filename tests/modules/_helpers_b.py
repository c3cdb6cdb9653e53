"""Helpers for the equation tests of SRM, Gather-Excite, Global Context, Triplet Attention and SK.

`randomize_` makes every parameter and BatchNorm statistic non-trivial, `batch_norm` is BatchNorm written
out plainly, and `assert_agrees` compares a module with its equations written in a test: the outputs and
the gradients with respect to the input and to every parameter (the equations use the same parameter
tensors, so autograd differentiates both with respect to the same leaves).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

BN_EPS = 1e-5  # the papers' (and PyTorch's) BatchNorm epsilon
RTOL = 1e-10
ZERO, NONZERO = 1e-12, 1e-6  # |gradient| bounds for "zero in exact arithmetic" and "clearly non-zero"


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Float64; every parameter ~ 0.5·N(0, 1); BN running means ~ 0.5·N(0, 1), running variances in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    return module


def feature_map(*shape: int, seed: int = 1) -> Tensor:
    """A float64 N(0, 1) input that requires grad."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()


def batch_norm(z: Tensor, bn: nn.BatchNorm2d, train: bool) -> Tensor:
    """BatchNorm over every axis but 1: batch mean and biased variance when training, else the running ones."""
    dims = [d for d in range(z.dim()) if d != 1]
    shape = [1, -1] + [1] * (z.dim() - 2)
    if train:
        mean = z.mean(dims, keepdim=True)
        var = ((z - mean) ** 2).mean(dims, keepdim=True)
    else:
        mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (z - mean) / torch.sqrt(var + BN_EPS) * bn.weight.view(shape) + bn.bias.view(shape)


def conv1x1(z: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1×1 convolution as a matrix product over the channel axis (plus the bias, if any)."""
    out = torch.einsum("oi,nihw->nohw", conv.weight[:, :, 0, 0], z)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """Relative agreement to RTOL, with an absolute floor of RTOL times the largest |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = RTOL * float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_agrees(
    module: nn.Module,
    equation: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    train: bool = False,
    zero_grads: frozenset[str] = frozenset(),
) -> None:
    """module(x) == equation(x), and so are their gradients w.r.t. x and every parameter.

    Every gradient must be clearly non-zero (so that comparing it means something), except for the parameters
    named in `zero_grads`, whose gradient is zero in exact arithmetic: both sides must then be rounding noise.
    """
    module.train(train)
    names = [name for name, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    out, expected = module(x), equation(x)
    assert_close(out, expected, "output")
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=expected.dtype)
    grads = torch.autograd.grad((out * cotangent).sum(), [x, *params])
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), [x, *params])
    for name, grad, expected_grad in zip(("input", *names), grads, expected_grads):
        if name in zero_grads:
            assert grad.abs().max() < ZERO and expected_grad.abs().max() < ZERO, f"gradient w.r.t. {name} is not 0"
        else:
            assert expected_grad.abs().max() > NONZERO, f"gradient w.r.t. {name} is ~0: the check would be vacuous"
            assert_close(grad, expected_grad, f"gradient w.r.t. {name}")
