"""SimAM, the parameter-free energy-based attention."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels.functions import energy_gate
from ..registry import register
from ._common import gate_path, make_gate, stat_dtype
from .base import AttentionModule


def inverse_energy(x: Tensor, e_lambda: float) -> Tensor:
    """1/e* = (x − μ)² / (4(σ̂² + λ)) + 1/2 at every position, in at least float32, with μ and the unbiased variance σ̂²
    of each channel over H×W. HW − 1 is taken as 1 for a 1×1 map (where (x − μ)² = 0, so 1/e* = 1/2); HW is counted as
    a tensor so that tracing and torch.export keep the formula for every map size."""
    xs = x.to(stat_dtype(x))
    d = (xs - xs.mean((2, 3), keepdim=True)).square()
    n = torch.ones_like(xs[0, 0]).sum()
    variance = d.sum((2, 3), keepdim=True) / (n - 1).clamp_min(1)
    return d / (4 * (variance + e_lambda)) + 0.5


@register("simam")
class SimAM(AttentionModule):
    """SimAM (Yang et al., "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
    ICML 2021).

    Official code: https://github.com/ZjjConan/SimAM (networks/attentions/simam_module.py)

        1/e*_t = (t − μ)² / (4(σ̂² + λ)) + 1/2      μ, σ̂²: mean and unbiased variance of t's channel over H×W
        y      = x · σ(1/e*)                         λ = 1e-4

    The minimal energy e*_t of neuron t (the paper's eq. 5) is lower for a neuron that stands out from its channel;
    1/e* weighs every position of every channel, and the module has no parameters. λ = 1e-4 is the paper's and the
    official module's default (the README's ImageNet commands pass 0.1). In a network SimAM goes on the output of each
    block's last 3×3 convolution, before that convolution's BN (the official ResNets and MobileNetV2), the placement
    "before_norm". A 1×1 map, which has no unbiased variance, gives 1/e* = 1/2 (the official code divides 0 by 0).

    Args:
        channels: C (SimAM has no parameters; the input's channel count is checked against it).
        e_lambda: λ, the regulariser of the energy (> 0).
        gate: the function of 1/e* ('sigmoid', as in the paper).
    """

    placement = "before_norm"
    gate_name = "attention"  # σ(1/e*), N×C×H×W

    def __init__(self, channels: int, e_lambda: float = 1e-4, *, gate: str | type[nn.Module] = "sigmoid") -> None:
        super().__init__(channels)
        owner = type(self).__name__
        if isinstance(e_lambda, bool) or not isinstance(e_lambda, (int, float)) or not 0 < e_lambda < math.inf:
            raise ValueError(f"{owner}: `e_lambda` (λ) must be a positive number (the paper's is 1e-4), got {e_lambda!r}.")
        self.e_lambda = float(e_lambda)
        self.gate = make_gate(owner, gate)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        if type(self.gate) is nn.Sigmoid:  # the fused pass computes σ itself: not where a hook observes the gate
            backend, fast = gate_path(self, x)
            if backend is not None and fast:
                return energy_gate(backend, x, self.e_lambda)
        return x * self.gate(inverse_energy(x, self.e_lambda)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, e_lambda={self.e_lambda:g}"
