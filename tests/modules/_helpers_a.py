"""Helpers for the equation tests of SE, ECA, CBAM, BAM and Coordinate Attention.

The reference equations in the test files are written with plain tensor operations; the pieces they share
(BatchNorm, a stride-1 'same' convolution) are written out here, never by calling a module's layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-5  # PyTorch's and the papers' BatchNorm epsilon
TOL = 1e-10  # relative, elementwise and to the tensor's largest entry


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Float64; every parameter ~ 0.5·N(0, 1); BN running means ~ 0.5·N(0, 1), running variances in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    return module


def feature_map(*shape: int, seed: int = 1, scale: float = 1.0) -> Tensor:
    """A float64 input that requires grad."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-channel vector to broadcast along dim 1 of `like`."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def bn_eval(z: Tensor, bn: nn.Module) -> Tensor:
    """(z − running_mean) / sqrt(running_var + eps) · γ + β, per channel (dim 1)."""
    mean, var = _per_channel(bn.running_mean, z), _per_channel(bn.running_var, z)
    return (z - mean) / torch.sqrt(var + BN_EPS) * _per_channel(bn.weight, z) + _per_channel(bn.bias, z)


def bn_train(z: Tensor, bn: nn.Module) -> Tensor:
    """Batch statistics over every dim but 1, biased variance."""
    dims = [d for d in range(z.dim()) if d != 1]
    mean = z.mean(dims, keepdim=True)
    var = ((z - mean) ** 2).mean(dims, keepdim=True)
    return (z - mean) / torch.sqrt(var + BN_EPS) * _per_channel(bn.weight, z) + _per_channel(bn.bias, z)


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


def assert_same_function(
    module: nn.Module, reference, x: Tensor, grad_tol: float = TOL, zero_grads: frozenset[str] = frozenset()
) -> None:
    """module(x) and reference(x) agree, and so do their gradients w.r.t. x and every parameter of `module`
    (the reference must use every parameter: autograd raises otherwise).

    Elementwise |a − e| <= tol·|e| + tol·scale, scale being the largest entry of the output, or of all the
    gradients together. Every gradient must be non-zero on that scale, except those named in `zero_grads`
    (mathematically zero, such as a bias followed by a BatchNorm in training), which must be ~0 in both.
    """
    named = [("input", x)] + list(module.named_parameters())
    y_mod, y_ref = module(x), reference(x)
    torch.testing.assert_close(y_mod, y_ref, rtol=TOL, atol=TOL * y_ref.abs().max().item())
    upstream = torch.randn(y_mod.shape, generator=torch.Generator().manual_seed(2), dtype=y_mod.dtype)
    grads_mod = torch.autograd.grad(y_mod, [t for _, t in named], upstream)
    grads_ref = torch.autograd.grad(y_ref, [t for _, t in named], upstream)
    atol = grad_tol * max(g.abs().max().item() for g in grads_ref)
    for (name, _), g_mod, g_ref in zip(named, grads_mod, grads_ref):
        vanishes = g_ref.abs().max().item() <= atol
        assert vanishes == (name in zero_grads), f"d/d{name} is {'' if vanishes else 'not '}zero"
        torch.testing.assert_close(g_mod, g_ref, rtol=grad_tol, atol=atol, msg=lambda m, n=name: f"d/d{n}: {m}")
