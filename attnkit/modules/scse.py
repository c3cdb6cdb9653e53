"""Concurrent spatial and channel squeeze-and-excitation."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.functions import pair_gate
from ..registry import register
from ._common import (autocast_off, gate_math, gate_path, make_activation, make_gate, one_of, pointwise,
                      reduced_width, stat_dtype)
from .base import AttentionModule, Probe, output

COMBINES = ("max", "add", "mul")


@register("scse")
class SCSE(AttentionModule):
    """Concurrent spatial and channel squeeze & excitation (Roy, Navab and Wachinger, "Concurrent Spatial and Channel
    'Squeeze & Excitation' in Fully Convolutional Networks", MICCAI 2018; "Recalibrating Fully Convolutional Networks
    with Spatial and Channel 'Squeeze and Excitation' Blocks", IEEE TMI 2019).

    Official code: https://github.com/ai-med/squeeze_and_excitation (ChannelSpatialSELayer)

        s = σ(W₂ δ(W₁ GAP(x) + b₁) + b₂)      cSE: spatial squeeze, channel excitation (W₁: C → C/r, r = 2)
        q = σ(w · x + b)                       sSE: channel squeeze (1×1 convolution C → 1), spatial excitation
        y = max(x·s, x·q)                      (element-wise)

    The official code combines the two recalibrated maps by their element-wise maximum, the TMI paper's best
    aggregation (`combine='max'`, the default); the MICCAI paper adds them (`combine='add'`); 'mul' is the TMI
    paper's multiplication, x·s·q. All layers have biases, as in the official code. The FCs are 1×1 convolutions
    named `fc1`/`fc2`, as SE's, and the cSE branch alone is torchvision's SqueezeExcitation(C, C // r).

    Args:
        channels: C.
        reduction: r; hidden_channels: explicit C/r.
        combine: 'max', 'add' or 'mul'.
        bias: biases on the FCs and the spatial convolution.
        act, gate: the hidden activation and the gating function of both gates.
    """

    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        reduction: float = 2,
        *,
        combine: str = "max",
        hidden_channels: int | None = None,
        bias: bool = True,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.combine = one_of(owner, "combine", combine, COMBINES)
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bool(bias))
        self.act = make_activation(owner, act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bool(bias))
        self.channel_gate = make_gate(owner, gate)
        self.conv = nn.Conv2d(channels, 1, 1, bias=bool(bias))
        self.spatial_gate = make_gate(owner, gate)

    def channel_excitation(self, x: Tensor) -> Tensor:
        """s, N×C×1×1, in the parameters' dtype."""
        pooled = x.mean((2, 3), keepdim=True, dtype=stat_dtype(x))
        with gate_math(x):
            return self.channel_gate(self.fc2(self.act(self.fc1(pooled.to(self.fc1.weight.dtype)))))

    def spatial_excitation(self, x: Tensor) -> Tensor:
        """q, N×1×H×W, in the parameters' dtype (the 1×1 convolution runs in their dtype, also under autocast)."""
        with gate_math(x):
            return self.spatial_gate(self.conv(x.to(self.conv.weight.dtype)))

    def gate_probes(self) -> list[Probe]:
        """s as "channel" (N×C×1×1) and q as "spatial" (N×1×H×W)."""
        return [(self.channel_gate, "channel", output), (self.spatial_gate, "spatial", output)]

    def _channel_rows(self, mean: Tensor) -> Tensor:
        """s, N×C, from the means, N×C: channel_excitation() with the FCs as F.linear."""
        with autocast_off(mean):
            hidden = self.act(pointwise(self.fc1, mean.to(self.fc1.weight.dtype)))
            return self.channel_gate(pointwise(self.fc2, hidden))

    def _spatial_rows(self, z: Tensor) -> Tensor:
        """q, N×H×W, from Σ_c w·x, N×H×W (float32): spatial_excitation() given its convolution's weighted sum, the
        bias added before rounding to the parameters' dtype, as the convolution rounds its output once."""
        with autocast_off(z):
            z = z if self.conv.bias is None else z + self.conv.bias.to(z.dtype)
            return self.spatial_gate(z.to(self.conv.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x)
        if backend is not None and fast:  # the spatial squeeze as one weighted sum over the channels
            return pair_gate(backend, x, self.conv.weight.flatten(), self._channel_rows, self._spatial_rows,
                             self.combine)
        s = self.channel_excitation(x).to(x.dtype)
        q = self.spatial_excitation(x).to(x.dtype)
        if self.combine == "mul":
            return x * s * q
        channel, spatial = x * s, x * q
        return torch.maximum(channel, spatial) if self.combine == "max" else channel + spatial

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"
