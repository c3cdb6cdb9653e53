"""Shuffle Attention (SA-Net)."""
from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import Tensor, nn

from ..kernels.functions import affine_gate
from ..registry import register
from . import _common
from ._common import autocast_off, check_groups, gate_math, gate_path, make_gate, stat_dtype
from .base import AttentionModule, Probe


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: channels viewed as groups × (C/groups), transposed and flattened, so that output
    channel k·groups + j is input channel j·C/groups + k."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


@register("shuffle")
class ShuffleAttention(AttentionModule):
    """Shuffle Attention (Zhang & Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks", ICASSP 2021).

    Official code: https://github.com/wofmanaf/SA-Net (models/sa_resnet.py, sa_layer)

    The channels are split into G groups, each group into two halves x₀ and x₁ of C/2G channels:

        x₀' = x₀ · σ(W₁ · GAP(x₀) + b₁)           channel attention, W₁, b₁ ∈ R^(C/2G) per channel
        x₁' = x₁ · σ(W₂ · GN(x₁) + b₂)            spatial attention, GN normalises each channel over H×W (affine)
        y   = channel_shuffle([x₀'; x₁'] per group, 2)

    G = 64. W₁, W₂ start at 0 and b₁, b₂ at 1 (official); the GN's affine weight and bias start at 1 and 0 (the
    official network re-initialises them so, as PyTorch does). Parameter names are the official code's (`cweight`,
    `cbias`, `sweight`, `sbias`, `gn`), so its checkpoints load. The output channels are the input's, gated, in the
    shuffled order: output channel 2k + j is channel j·C/2 + k of the concatenated groups. In SA-Net the layer follows
    each bottleneck's bn3, before the residual addition.

    Args:
        channels: C, a multiple of 2G.
        groups: G.
        gate: the gating function of both halves.
    """

    gate_name = "channel"

    def __init__(self, channels: int, groups: int = 64, *, gate: str | type[nn.Module] = "sigmoid") -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.groups = check_groups(owner, channels, groups, halves=True)
        half = channels // (2 * self.groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)
        self.channel_gate = make_gate(owner, gate)
        self.spatial_gate = make_gate(owner, gate)

    def _affine_rows(self, hw: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
        """(α, β), N×C in the input's channel order, of each channel's gate σ(α·(x − μ) + β): α = 0 and β = W₁·μ + b₁
        for the channel halves; for the spatial halves the GroupNorm (biased variance) and the affine W₂·GN + b₂ as
        α = W₂·γ / √(σ² + ε), β = W₂·δ + b₂."""
        with autocast_off(mean):
            half = self.channels // (2 * self.groups)
            mean0 = mean.unflatten(1, (self.groups, 2, half))[:, :, 0]
            m2_1 = m2.unflatten(1, (self.groups, 2, half))[:, :, 1]
            dtype = torch.promote_types(self.cweight.dtype, mean.dtype)
            cw, cb, sw, sb, gamma, delta = (p.to(dtype).flatten() for p in (self.cweight, self.cbias, self.sweight,
                                                                            self.sbias, self.gn.weight, self.gn.bias))
            beta0 = cw * mean0 + cb
            alpha1 = sw * gamma * torch.rsqrt(m2_1 / hw + self.gn.eps)
            beta1 = (sw * delta + sb).expand_as(alpha1)
            alpha = torch.stack([torch.zeros_like(alpha1), alpha1], 2).flatten(1)
            return alpha, torch.stack([beta0, beta1], 2).flatten(1)

    def _fusable(self) -> bool:
        """Whether the fused pass computes this module's gates: σ, after an affine GroupNorm."""
        return (type(self.channel_gate) is nn.Sigmoid and type(self.spatial_gate) is nn.Sigmoid
                and type(self.gn) is nn.GroupNorm and self.gn.affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        if self._fusable():
            backend, fast = gate_path(self, x)
            if backend is not None and fast:
                c = torch.arange(self.channels, device=x.device)
                perm = 2 * (c % (self.channels // 2)) + c // (self.channels // 2)  # the channel shuffle's output
                return affine_gate(backend, x, perm, functools.partial(self._affine_rows, x.shape[2] * x.shape[3]))
        grouped = x.reshape(-1, self.channels // self.groups, x.shape[2], x.shape[3])  # (N·G)×(C/G)×H×W
        x0, x1 = grouped.chunk(2, dim=1)
        with gate_math(x):
            dtype = self.cweight.dtype
            pooled = x0.mean((2, 3), keepdim=True, dtype=stat_dtype(x)).to(dtype)
            channel = self.channel_gate(self.cweight * pooled + self.cbias)
            spatial = self.spatial_gate(self.sweight * self.gn(x1.to(dtype)) + self.sbias)
            out = torch.cat([x0 * channel.to(x.dtype), x1 * spatial.to(x.dtype)], dim=1).view(x.shape)
        return _common.in_format_of(channel_shuffle(out, 2), x)  # through the module: fx-wrapped

    def gate_probes(self) -> list[Probe]:
        """The channel halves' gate as "channel" (N×C/2×1×1) and the spatial halves' as "spatial" (N×C/2×H×W), each
        group's C/2G gates after the previous group's."""
        def per_sample(inputs: tuple, out: Tensor) -> Tensor:
            return out.reshape(-1, self.channels // 2, out.shape[2], out.shape[3])

        return [(self.channel_gate, "channel", per_sample), (self.spatial_gate, "spatial", per_sample)]

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """The mean over positions of the gate of each output channel, in the output's (shuffled) order."""
        n, half = gates["channel"].shape[0], self.channels // (2 * self.groups)
        channel = gates["channel"].float().reshape(n, self.groups, half)
        spatial = gates["spatial"].float().mean((2, 3)).reshape(n, self.groups, half)
        return channel_shuffle(torch.cat([channel, spatial], dim=2).reshape(n, self.channels, 1, 1), 2).flatten(1)

    def input_channel_of_output(self) -> list[int]:
        """The input channel each output channel carries: output 2k + j is input j·C/2 + k (the shuffle), which attnkit
        prune reads to rank the output channels by the filters that produce them."""
        half = self.channels // 2
        return [j * half + k for k in range(half) for j in range(2)]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
