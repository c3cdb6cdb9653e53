"""Efficient Multi-scale Attention."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..kernels.functions import row_column_gate, scale_by_groups
from ..registry import register
from . import _common
from ._common import autocast_off, check_groups, gate_math, gate_path, pointwise
from .base import AttentionModule, Probe


@register("ema")
class EMA(AttentionModule):
    """Efficient Multi-scale Attention with cross-spatial learning (Ouyang et al., "Efficient Multi-Scale Attention
    Module with Cross-Spatial Learning", ICASSP 2023).

    Official code: https://github.com/YOLOonMe/EMA-attention-module (EMA_attention_module)

    The channels are split into G groups of c = C/G (a group is a sample of its own below); for each group x:

        a_h, a_w = split(conv1×1([mean_W(x); mean_H(x)]))         1×1 branch: c → c, with bias, along H + W
        x₁ = GN(x · σ(a_h) · σ(a_w))                               GroupNorm with c groups (each channel over H×W)
        x₂ = conv3×3(x)                                            3×3 branch: c → c, with bias
        w  = softmax_c(GAP(x₁))ᵀ x₂ + softmax_c(GAP(x₂))ᵀ x₁        cross-spatial: two 1×H·W maps, summed
        y  = x · σ(w)                                              G = 32 ("factor")

    The softmaxes run over the c channels of each group, as in the official code. The attention runs in the
    parameters' dtype with autocast off (float32 under fp16/bf16 autocast). On the fused path (attnkit.kernels) the
    two pools and x · σ(a_h) · σ(a_w) are Coordinate Attention's passes and the final x · σ(w) is SGE's; the 3×3
    branch, the GroupNorm and the cross-spatial sum stay PyTorch's. The repository has no network code: in
    a network EMA goes where the modules its tables compare with go, after a block's last BN, before the residual
    addition.

    Args:
        channels: C, a multiple of `groups`.
        groups: G, the official code's `factor`.
    """

    gate_name = "attention"  # σ(w), N×G×H×W

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__(channels)
        self.groups = check_groups(type(self).__name__, channels, groups)
        width = channels // self.groups
        self.gn = nn.GroupNorm(width, width)
        self.conv1x1 = nn.Conv2d(width, width, 1)
        self.conv3x3 = nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Sigmoid()

    def attention(self, x: Tensor) -> Tensor:
        """w (before the sigmoid) for the grouped input x ((N·G)×c×H×W, in the parameters' dtype): (N·G)×1×H×W."""
        a_h, a_w = self._row_column_gates(torch.cat([x.mean(3), x.mean(2)], 2), x.shape[2])
        x1 = self.gn(x * a_h[..., None] * a_w[:, :, None, :])
        return self.cross_spatial(x1, self.conv3x3(x))

    def cross_spatial(self, x1: Tensor, x2: Tensor) -> Tensor:
        """w = softmax_c(GAP(x₁))ᵀ x₂ + softmax_c(GAP(x₂))ᵀ x₁, (N·G)×1×H×W."""
        w1 = x1.mean((2, 3)).softmax(1)  # (N·G)×c
        w2 = x2.mean((2, 3)).softmax(1)
        return (torch.einsum("bc,bchw->bhw", w1, x2) + torch.einsum("bc,bchw->bhw", w2, x1)).unsqueeze(1)

    def _row_column_gates(self, z: Tensor, height: int) -> tuple[Tensor, Tensor]:
        """(σ(a_h) (N·G)×c×H, σ(a_w) (N·G)×c×W) by the 1×1 convolution, from the joined means z ((N·G)×c×(H+W): over
        W for each of the H rows, then over H for each of the W columns)."""
        joined = self.conv1x1(z[..., None].to(self.conv1x1.weight.dtype))[..., 0]
        a_h, a_w = torch.split(joined, [height, z.shape[2] - height], dim=2)
        return torch.sigmoid(a_h), torch.sigmoid(a_w)

    def _row_column_gates_as_rows(self, z: Tensor, height: int) -> tuple[Tensor, Tensor]:
        """_row_column_gates with the 1×1 convolution as F.linear over the (N·G)·(H+W) rows of c channels."""
        gates = torch.sigmoid(pointwise(self.conv1x1, z.transpose(1, 2).to(self.conv1x1.weight.dtype))).transpose(1, 2)
        return tuple(torch.split(gates, [height, z.shape[2] - height], dim=2))

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        grouped = x.reshape(-1, self.channels // self.groups, x.shape[2], x.shape[3])  # (N·G)×c×H×W
        backend, fast = gate_path(self, x)
        if backend is not None:
            grouped = grouped.to(self.conv1x1.weight.dtype)
            gates = self._row_column_gates_as_rows if fast else self._row_column_gates
            with autocast_off(x):
                x1 = self.gn(row_column_gate(backend, grouped, gates))
                g = self.gate(self.cross_spatial(x1, self.conv3x3(grouped)))
            return scale_by_groups(backend, x, g.view(x.shape[0], self.groups, *x.shape[2:]))
        with gate_math(x):
            g = self.gate(self.attention(grouped.to(self.conv1x1.weight.dtype)))
        return _common.in_format_of((grouped * g.to(x.dtype)).view(x.shape), x)  # through the module: fx-wrapped

    def gate_probes(self) -> list[Probe]:
        """σ(w) as "attention", one H×W map per group: N×G×H×W."""
        return [(self.gate, "attention", lambda inputs, out: out.reshape(-1, self.groups, *out.shape[2:]))]

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """Each channel's weight: the mean over positions of its group's map σ(w), by which it is scaled."""
        per_group = gates["attention"].float().mean((2, 3))
        return per_group.repeat_interleave(self.channels // self.groups, dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
