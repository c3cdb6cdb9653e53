"""What the module tests share: random parameters and inputs, BatchNorm and convolutions written out plainly,
and the check that a module computes its equations.

The equations in the test files are written with plain tensor operations; the pieces several of them need
(BatchNorm, a stride-1 'same' convolution, a 1×1 convolution) are written out here, never by calling a
module's layers. `assert_matches_equations` compares a module with such equations: the outputs and the
gradients with respect to the input and to every parameter (the equations read the same parameter tensors,
so autograd differentiates both with respect to the same leaves).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-5  # the papers' (and PyTorch's) BatchNorm epsilon
TOL = 1e-10  # relative, elementwise, with an absolute floor of TOL times the tensor's largest entry
ZERO, NONZERO = 1e-12, 1e-6  # |gradient| bounds for "zero in exact arithmetic" and "clearly non-zero"

TRAIN_MODES = pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])


def randomize(module: nn.Module, seed: int = 0, *, double: bool = False) -> nn.Module:
    """Every parameter ~ 0.5·N(0, 1); BatchNorm running means ~ 0.5·N(0, 1), running variances in [0.5, 1.5),
    batch counts 3; so no zero-initialised layer hides anything. With `double`, the module is float64 first."""
    gen = torch.Generator().manual_seed(seed)
    if double:
        module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                mean, var = m.running_mean, m.running_var
                mean.copy_(torch.randn(mean.shape, generator=gen, dtype=mean.dtype) * 0.5)
                var.copy_(torch.rand(var.shape, generator=gen, dtype=var.dtype) + 0.5)
                m.num_batches_tracked.fill_(3)
    return module


def feature_map(*shape: int, seed: int = 1, scale: float = 1.0) -> Tensor:
    """A float64 scale·N(0, 1) input that requires grad."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-channel vector to broadcast along dim 1 of `like`."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def batch_norm(z: Tensor, bn: nn.Module, train: bool) -> Tensor:
    """(z − mean) / sqrt(var + eps) · γ + β per channel (dim 1): the batch mean and biased variance over every
    other dim when training, else the running ones."""
    if train:
        dims = [d for d in range(z.dim()) if d != 1]
        mean = z.mean(dims, keepdim=True)
        var = ((z - mean) ** 2).mean(dims, keepdim=True)
    else:
        mean, var = _per_channel(bn.running_mean, z), _per_channel(bn.running_var, z)
    return (z - mean) / torch.sqrt(var + BN_EPS) * _per_channel(bn.weight, z) + _per_channel(bn.bias, z)


def conv1x1(z: Tensor, conv: nn.Module) -> Tensor:
    """A 1×1 convolution (or a Linear) as a matrix product over the channel axis of an N×C(×…) tensor:
    out[n, o, …] = Σ_c W[o, c]·z[n, c, …] (+ b[o])."""
    out = torch.einsum("oc,nc...->no...", conv.weight.reshape(conv.weight.shape[:2]), z)
    return out if conv.bias is None else out + _per_channel(conv.bias, out)


def conv2d_same(z: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1) -> Tensor:
    """Stride-1 zero-padded 'same' convolution as a sum of shifted maps:
    out[n, o, i, j] = Σ_{c,u,v} w[o, c, u, v] · z_pad[n, c, i + u·d, j + v·d] (+ b[o])."""
    kh, kw = weight.shape[2:]
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    h, w = z.shape[2:]
    padded = F.pad(z, (pw, pw, ph, ph))
    out = 0
    for u in range(kh):
        for v in range(kw):
            shifted = padded[:, :, u * dilation : u * dilation + h, v * dilation : v * dilation + w]
            out = out + torch.einsum("oc,nchw->nohw", weight[:, :, u, v], shifted)
    return out if bias is None else out + bias[None, :, None, None]


def assert_close(actual: Tensor, expected: Tensor, what: str, tol: float = TOL) -> None:
    """Same shape, and elementwise |a − e| <= tol·|e| + tol·max|e|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = tol * float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_matches_equations(
    module: nn.Module,
    equations: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    grad_tol: float = TOL,
    zero_grads: frozenset[str] = frozenset(),
) -> None:
    """module(x) == equations(x), and so are their gradients w.r.t. x and every parameter of `module` (the
    equations must use every parameter: autograd raises otherwise). The module runs in the mode it is in.

    Outputs agree to TOL and each gradient to `grad_tol`, relative with a floor of that tolerance times the
    largest entry of the expected tensor (`assert_close`). Every expected gradient must be clearly non-zero,
    above NONZERO and above `grad_tol` times the largest gradient entry, so that comparing it means
    something; except the gradients named in `zero_grads` ('input' or a parameter name), which are zero in
    exact arithmetic (a bias followed by a BatchNorm in training, a shift the softmax ignores): on both sides
    they must then be rounding noise, below ZERO and below `grad_tol` times the largest gradient entry.
    """
    named = [("input", x), *module.named_parameters()]
    unknown = set(zero_grads) - {name for name, _ in named}
    assert not unknown, f"zero_grads names no input or parameter: {sorted(unknown)}"
    out, expected = module(x), equations(x)
    assert_close(out, expected, "output")
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=expected.dtype)
    leaves = [t for _, t in named]
    grads = torch.autograd.grad((out * cotangent).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), leaves)
    scale = max(float(g.abs().max()) for g in expected_grads)
    for (name, _), grad, expected_grad in zip(named, grads, expected_grads):
        largest = float(expected_grad.abs().max())
        if name in zero_grads:
            bound = min(ZERO, grad_tol * scale)
            assert largest < bound and float(grad.abs().max()) < bound, f"gradient w.r.t. {name} is not 0"
        else:
            assert largest > max(NONZERO, grad_tol * scale), f"gradient w.r.t. {name} is ~0: a vacuous check"
            assert_close(grad, expected_grad, f"gradient w.r.t. {name}", grad_tol)
