"""Spatial Group-wise Enhance."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..kernels.functions import group_gate
from ..registry import register
from ._common import dividing, gate_math, gate_path, make_gate, stat_dtype
from .base import AttentionModule, Probe, output


@torch.fx.wrap
def standardize(t: Tensor, eps: float) -> Tensor:
    """(t − mean) / (std + eps) over the last dimension of an N×G×L tensor, the std with Bessel's correction (n − 1;
    1 for n = 1).

    Where all values are equal the std is 0 and so is t − mean: the result is 0, with the gradient of a std held at 0
    (the square root's derivative at 0 is infinite). Wrapped for torch.fx, which cannot unpack var_mean's pair."""
    var, mean = torch.var_mean(t, dim=-1, keepdim=True, correction=0)
    n = torch.ones_like(t[0, 0]).sum()  # L counted as a tensor, so that export keeps it for every size
    var = var * (n / (n - 1).clamp_min(1))
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return (t - mean) / (std + eps)


@register("sge")
class SpatialGroupEnhance(AttentionModule):
    """Spatial Group-wise Enhance (Li, Hu and Yang, "Spatial Group-wise Enhance: Improving Semantic Feature Learning
    in Convolutional Networks", arXiv:1905.09646, 2019).

    Official code: https://github.com/implus/PytorchInsight (classification/models/imagenet/resnet_sge.py)

    The C channels form G groups; in group g, with x_i the C/G-vector at position i:
        c_i = GAP(x) · x_i                              (similarity of each position to the group's mean feature)
        ĉ_i = (c_i − mean_i c) / (std_i c + ε)          (over the H·W positions; unbiased std, ε = 1e-5)
        y_i = x_i · σ(γ_g ĉ_i + β_g)

    γ and β (`weight`, `bias`, one per group) start at 0 and 1, as in the official code, so every position starts
    gated by σ(1). G = 64 as in the paper's ResNets; it must divide C. A 1×1 map has no spread: ĉ = 0 there (the
    official code's unbiased std of one value is NaN).

    Args:
        channels: C.
        groups: G.
        eps: ε added to the std.
        gate: the gating function.
    """

    gate_name = "spatial"  # σ(γ ĉ + β): one N×G×H×W map, shared by the C/G channels of each group

    def __init__(
        self, channels: int, groups: int = 64, *, eps: float = 1e-5, gate: str | type[nn.Module] = "sigmoid"
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.groups = dividing(owner, "groups", groups, channels)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise ValueError(f"{owner}: `eps` must be a number in (0, 1] (the official code's is 1e-5), got {eps!r}.")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.zeros(1, self.groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, self.groups, 1, 1))
        self.gate = make_gate(owner, gate)

    def attention(self, x: Tensor) -> Tensor:
        """σ(γ ĉ + β), N×G×H×W, in the parameters' dtype."""
        xs = x.to(stat_dtype(x)).unflatten(1, (self.groups, -1))  # N×G×C/G×H×W
        with gate_math(x):
            similarity = (xs * xs.mean((3, 4), keepdim=True)).sum(2)  # N×G×H×W
        return self.excite(similarity)

    def excite(self, similarity: Tensor) -> Tensor:
        """σ(γ ĉ + β), N×G×H×W, from the similarities c, N×G×H×W in at least float32."""
        with gate_math(similarity):
            normalized = standardize(similarity.flatten(2), self.eps).view_as(similarity)
            return self.gate(normalized.to(self.weight.dtype) * self.weight + self.bias)

    def gate_probes(self) -> list[Probe]:
        """σ(γ ĉ + β) as "spatial", N×G×H×W."""
        return [(self.gate, "spatial", output)]

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """Each group's gate averaged over the positions, for each of its C/G channels."""
        return gates["spatial"].float().mean((2, 3)).repeat_interleave(self.channels // self.groups, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, _ = gate_path(self, x)
        if backend is not None:
            return group_gate(backend, x, self.groups, self.excite)
        gate = self.attention(x).to(x.dtype)
        return (x.unflatten(1, (self.groups, -1)) * gate.unsqueeze(2)).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
