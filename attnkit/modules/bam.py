"""Bottleneck Attention Module."""
from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from ._common import gate_math, make_activation, make_gate, one_of, positive_int, reduced_width, stat_dtype
from .base import AttentionModule


@register("bam")
class BAM(AttentionModule):
    """Bottleneck Attention Module (Park et al., BMVC 2018).

    Official code: https://github.com/Jongchan/attention-module (MODELS/bam.py)

        Mc = FC(ReLU(BN(FC(GAP(x)))))                             C → C/r → C
        Ms = conv1×1(ReLU(BN(conv3×3,d(… ReLU(BN(conv1×1(x)))))))  C → C/r → (two 3×3, dilation 4) → 1
        y  = x · (1 + σ(Mc + Ms))                                  (Mc and Ms broadcast to C×H×W)

    The paper sums the two maps (`combine='sum'`, the default); the released code multiplies them inside
    the sigmoid (`combine='product'`). One BAM goes at the end of each of a network's first three stages.

    Args:
        channels: C.
        reduction: r (16).
        dilation: dilation of the 3×3 convolutions (4).
        num_dilated: number of dilated 3×3 convolutions (2).
        combine: 'sum' (paper) or 'product' (released code).
        hidden_channels: explicit width C/r of both branches.
        act: activation inside both branches; gate: the gating function.
    """

    batchnorm_views = (((), 1),)  # BatchNorm1d over the pooled channel descriptor
    placement = "stage"  # attach(): one per network bottleneck, before each downsampling
    gate_name = "attention"  # σ(Mc + Ms) (or σ(Mc·Ms)); the module returns x·(1 + this)

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        dilation: int = 4,
        num_dilated: int = 2,
        combine: str = "sum",
        hidden_channels: int | None = None,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        dilation = positive_int(owner, "dilation", dilation)
        num_dilated = positive_int(owner, "num_dilated", num_dilated, minimum=0)
        self.combine = one_of(owner, "combine", combine, ("sum", "product"))
        self.channel_gate = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), make_activation(owner, act), nn.Linear(hidden, channels)
        )
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), make_activation(owner, act)]
        for _ in range(num_dilated):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                make_activation(owner, act),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.spatial_gate = nn.Sequential(*layers)
        self.gate = make_gate(owner, gate)

    def init_in_network(self) -> None:
        """As the official ResNet (MODELS/model_resnet.py) re-initialises its BAM modules: the spatial branch's
        convolutions kaiming-normal (fan_out), every bias 0; the BNs keep weight 1 and the channel branch's Linear
        weights PyTorch's initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) and m.bias is not None:
                m.bias.zero_()

    def attention(self, x: Tensor) -> Tensor:
        """σ(Mc ∘ Ms), N×C×H×W, in the parameters' dtype (the module returns x · (1 + this))."""
        pooled = x.mean((2, 3), dtype=stat_dtype(x))
        with gate_math(x):
            dtype = self.channel_gate[0].weight.dtype
            mc = self.channel_gate(pooled.to(dtype))[:, :, None, None]
            ms = self.spatial_gate(x.to(dtype))
            return self.gate(mc + ms if self.combine == "sum" else mc * ms)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        return x * (1 + self.attention(x)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"
