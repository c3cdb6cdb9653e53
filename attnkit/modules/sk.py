"""Selective Kernel convolution."""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor, nn

from ..registry import register
from ._common import (
    CAFFE_BN_MOMENTUM,
    caffe_msra_,
    gate_math,
    make_activation,
    odd_kernel,
    positive_int,
    reduced_width,
    stat_dtype,
)
from .base import AttentionModule, Probe


@register("sk")
class SelectiveKernel(AttentionModule):
    """Selective Kernel convolution (Li et al., "Selective Kernel Networks", CVPR 2019).

    Official code: https://github.com/implus/SKNet

    Not a gate on x: it replaces a 3×3 convolution. M paths (3×3, and 3×3 with dilation 2, i.e. a 5×5
    field) are grouped convolutions, each with BN and ReLU:
        U = Σ_m U_m,   z = ReLU(BN(W_z GAP(U)))            (W_z: C_out → d, d = max(C_out / r, L), no bias)
        a = softmax_m(W_m z)                               (per channel, across the M paths; no bias)
        y = Σ_m a_m · U_m

    Args:
        channels: input channels.
        out_channels: output channels (default: `channels`).
        stride: stride of every path.
        kernel_size: the paths' kernel (3); `dilations` gives one path per dilation ((1, 2)).
        groups: groups of the path convolutions (32 as in SKNet-50); must divide both channel counts.
        reduction: r (16); min_hidden: L (32); hidden_channels: explicit d.
        bias: biases on the two FCs of the attention.
        act: activation of the paths and of z.
    """

    batchnorm_views = (((), 1),)  # BatchNorm over z = W_z GAP(U)
    placement = "conv"  # attach(): in place of each block's 3×3 convolution
    gate_name = "paths"

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2),
        groups: int = 32,
        reduction: float = 16,
        min_hidden: int = 32,
        hidden_channels: int | None = None,
        bias: bool = False,
        act: str | type[nn.Module] = "relu",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        out_channels = channels if out_channels is None else positive_int(owner, "out_channels", out_channels)
        stride = positive_int(owner, "stride", stride)
        kernel_size = odd_kernel(owner, "kernel_size", kernel_size)
        groups = positive_int(owner, "groups", groups)
        if channels % groups or out_channels % groups:
            raise ValueError(
                f"{owner}: `groups`={groups} must divide both channels={channels} and out_channels={out_channels}; "
                f"pass groups=1 (or a common divisor) for narrow layers."
            )
        if isinstance(dilations, (str, bytes)) or not isinstance(dilations, (tuple, list)) or len(dilations) < 2:
            raise ValueError(f"{owner}: `dilations` must list two or more dilations, one per path, got {dilations!r}.")
        dilations = [positive_int(owner, "dilations", d) for d in dilations]
        self.out_channels = out_channels
        self.paths = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    channels, out_channels, kernel_size, stride, padding=d * (kernel_size - 1) // 2,
                    dilation=d, groups=groups, bias=False,
                ),
                nn.BatchNorm2d(out_channels),
                make_activation(owner, act),
            )
            for d in dilations
        )
        hidden = reduced_width(owner, out_channels, reduction, hidden_channels, minimum=positive_int(owner, "min_hidden", min_hidden))
        self.fc_reduce = nn.Conv2d(out_channels, hidden, 1, bias=bool(bias))
        self.bn = nn.BatchNorm2d(hidden)
        self.act = make_activation(owner, act)
        self.fc_select = nn.Conv2d(hidden, out_channels * len(dilations), 1, bias=bool(bias))

    def init_in_network(self) -> None:
        """As the official Caffe definition (models/sknet50.prototxt) fills the module: the path convolutions "msra"
        (N(0, 2/fan_in)), every BN scale 1, shift 0 and momentum 0.95 in Caffe's sense (CAFFE_BN_MOMENTUM in
        PyTorch's), the two FCs of the selection N(0, 0.01²) (biases, where `bias=True` adds them, 0)."""
        for path in self.paths:
            caffe_msra_(path[0].weight)
        for fc in (self.fc_reduce, self.fc_select):
            fc.weight.normal_(0, 0.01)
            if fc.bias is not None:
                fc.bias.zero_()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = CAFFE_BN_MOMENTUM
                m.weight.fill_(1)
                m.bias.zero_()

    def selection(self, feats: list[Tensor]) -> Tensor:
        """The path weights a, N×M×C_out×1×1 (softmax over M), from the M path outputs."""
        fused = sum(feats)
        pooled = fused.mean((2, 3), keepdim=True, dtype=stat_dtype(fused))
        with gate_math(fused):
            z = self.act(self.bn(self.fc_reduce(pooled.to(self.fc_reduce.weight.dtype))))
            logits = self.fc_select(z)
            return logits.unflatten(1, (len(self.paths), self.out_channels)).softmax(dim=1)

    def gate_probes(self) -> list[Probe]:
        """"paths": the softmax over the M paths, N×M×C×1×1."""
        return [(self.fc_select, "paths",
                 lambda inputs, out: out.unflatten(1, (len(self.paths), self.out_channels)).softmax(dim=1))]

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """The first path's weight per channel."""
        return gates["paths"][:, 0].float().flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        feats = [path(x) for path in self.paths]
        weights = self.selection(feats).to(feats[0].dtype)
        return sum(f * weights[:, m] for m, f in enumerate(feats))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out_channels={self.out_channels}"
