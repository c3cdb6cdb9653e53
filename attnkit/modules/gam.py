"""Global Attention Mechanism."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from ..registry import register
from ._common import gate_math, make_activation, make_gate, odd_kernel, positive_int, reduced_width
from .base import AttentionModule, Probe, output
from .shuffle import channel_shuffle


@register("gam")
class GAM(AttentionModule):
    """Global Attention Mechanism (Liu, Shao & Hoffmann, "Global Attention Mechanism: Retain Information to Enhance
    Channel-Spatial Interactions", arXiv 2112.05561, 2021).

    No official code was released; this follows the paper (https://arxiv.org/abs/2112.05561, Sec. 3, Figs. 2-3), with
    the BatchNorms of a widely copied implementation (https://github.com/z1069614715/objectdetection_script,
    cv-attention/GAM.py):

        Mc = σ(W₂ ReLU(W₁ x_ij + b₁) + b₂)      the channel MLP (C → C/r → C) at every position (i, j): no pooling
        F₂ = x · Mc
        Ms = σ(BN(conv_k(ReLU(BN(conv_k(F₂))))))  two k×k convolutions, C → C/r → C, k = 7: no pooling either
        y  = F₂ · Ms

    The channel submodule is the paper's "3D permutation + two-layer MLP + reverse permutation": an MLP over the
    channels of each position, written here as 1×1 convolutions. The paper takes the reduction ratio from BAM, r = 16
    (which gives the 149.5M parameters listed for a CIFAR-100 ResNet-50 with GAM). `spatial_norm=False` drops the BNs
    (convolution, ReLU, convolution). For ResNet-50 on ImageNet the paper makes the spatial convolutions grouped, with
    a channel shuffle, without giving the group count: `groups` > 1 groups both convolutions and shuffles the hidden
    channels between them.

    Args:
        channels: C.
        reduction: r of both submodules.
        kernel_size: k of the spatial convolutions (odd).
        groups: groups of the spatial convolutions (1: dense).
        spatial_norm: BN after each spatial convolution.
        hidden_channels: explicit C/r.
        bias: biases on the MLP and the convolutions.
        act: the activation of both submodules; gate: their gating function.
    """

    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        kernel_size: int = 7,
        *,
        groups: int = 1,
        spatial_norm: bool = True,
        hidden_channels: int | None = None,
        bias: bool = True,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        kernel_size = odd_kernel(owner, "kernel_size", kernel_size)
        self.groups = positive_int(owner, "groups", groups)
        if channels % self.groups or hidden % self.groups:
            raise ValueError(f"{owner}: `groups` = {self.groups} must divide both the channels ({channels}) and the "
                             f"hidden width C/r ({hidden}) of the grouped spatial convolutions.")
        bias = bool(bias)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = make_activation(owner, act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        self.channel_gate = make_gate(owner, gate)
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size, padding=padding, groups=self.groups, bias=bias)
        self.bn1: nn.Module = nn.BatchNorm2d(hidden) if spatial_norm else nn.Identity()
        self.spatial_act = make_activation(owner, act)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size, padding=padding, groups=self.groups, bias=bias)
        self.bn2: nn.Module = nn.BatchNorm2d(channels) if spatial_norm else nn.Identity()
        self.spatial_gate = make_gate(owner, gate)
        if spatial_norm:
            self.batchnorm_views = (((2, 3), 1),)

    def spatial_logits(self, f2: Tensor) -> Tensor:
        """BN(conv_k(ReLU(BN(conv_k(F₂))))), with the hidden channels shuffled between grouped convolutions."""
        hidden = self.spatial_act(self.bn1(self.conv1(f2)))
        if self.groups > 1:
            hidden = channel_shuffle(hidden, self.groups)
        return self.bn2(self.conv2(hidden))

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        with gate_math(x):
            xs = x.to(self.fc1.weight.dtype)
            f2 = xs * self.channel_gate(self.fc2(self.act(self.fc1(xs))))
            y = f2 * self.spatial_gate(self.spatial_logits(f2))
        return y.to(x.dtype)

    def gate_probes(self) -> list[Probe]:
        """Mc as "channel" and Ms as "spatial", each N×C×H×W."""
        return [(self.channel_gate, "channel", output), (self.spatial_gate, "spatial", output)]

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """The mean over positions of Mc·Ms, by which x is scaled."""
        return (gates["channel"].float() * gates["spatial"].float()).mean((2, 3))

    def spatial_map(self, gates: Mapping[str, Tensor]) -> tuple[str, Tensor]:
        """Mc·Ms, averaged over the channels."""
        return "channel·spatial", (gates["channel"].float() * gates["spatial"].float()).mean(1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
