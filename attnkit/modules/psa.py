"""Polarized Self-Attention."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register
from ._common import gate_math, make_gate, one_of
from .base import AttentionModule, Probe, output

LAYOUTS = ("parallel", "sequential")
VARIANTS = ("code", "paper")
INITS = ("network", "module")


@register("psa")
class PolarizedSelfAttention(AttentionModule):
    """Polarized Self-Attention (Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    arXiv:2107.00782, 2021).

    Official code: https://github.com/DeLightCMU/PSA (semantic-segmentation/network/PSA.py: PSA_p, PSA_s)

    Two branches, each a 1×1-convolution query Wq and value Wv (no biases, C/2 wide), as in the paper:
        channel-only:  Aᶜʰ = σ(Wz(Wv(x) · softmax_HW(Wq(x))ᵀ))               (Wq: C → 1; Wz: C/2 → C; N×C×1×1)
        spatial-only:  Aˢᵖ = σ(q · Wv(x)),  q = GAP(Wq(x))                    (N×1×H×W)
    composed in the 'parallel' layout as y = x·Aᶜʰ(x) + x·Aˢᵖ(x), or 'sequential' as z = x·Aᶜʰ(x), y = z·Aˢᵖ(z).

    The paper and the released code differ, and the code differs between its two layouts; `variant` picks:
      'code' (default), the released PSA_p / PSA_s:
         parallel:    Wz is one convolution; Aˢᵖ = σ(softmax_HW(q · Wv(x))) (a softmax over the positions, then σ);
         sequential:  Wz is conv C/2 → C/8 (bias), LayerNorm, ReLU, conv C/8 → C (bias);
                      Aˢᵖ = σ(q · softmax_HW(Wv(x))).
      'paper', the paper's equations for both layouts: Wz is a convolution followed by LayerNorm over C, and
         Aˢᵖ = σ(softmax_C/2(q) · Wv(x)).
    With 'code' and 'parallel', Aˢᵖ is σ of values that sum to 1 over the H·W positions, so close to ½ on large maps.

    The network code the authors released (HRNet, network/hrnetv2.py) re-initialises every convolution weight with
    N(0, 0.001²) after building the blocks, PSA's included; that is the default here (`init='network'`), which
    starts PSA near x·½ + x·½ in the parallel layout; `init='module'` keeps PSA.py's own: Kaiming normal (fan-in)
    queries and values, torch's default elsewhere. There, PSA follows each block's first 3×3 convolution.

    Args:
        channels: C.
        layout: 'parallel' or 'sequential'.
        variant: 'code' or 'paper'.
        init: 'network' or 'module'.
        gate: the gating function of both branches.
    """

    placement = "after_conv"  # attach(): after each block's 3×3 convolution and its BN, as in the released HRNet
    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        *,
        layout: str = "parallel",
        variant: str = "code",
        init: str = "network",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.layout = one_of(owner, "layout", layout, LAYOUTS)
        self.variant = one_of(owner, "variant", variant, VARIANTS)
        init = one_of(owner, "init", init, INITS)
        inner = max(1, channels // 2)
        self.channel_v = nn.Conv2d(channels, inner, 1, bias=False)
        self.channel_q = nn.Conv2d(channels, 1, 1, bias=False)
        if self.variant == "paper":
            self.channel_z: nn.Module = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False),
                                                      nn.LayerNorm([channels, 1, 1]))
        elif self.layout == "sequential":
            hidden = max(1, inner // 4)
            self.channel_z = nn.Sequential(nn.Conv2d(inner, hidden, 1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(),
                                           nn.Conv2d(hidden, channels, 1))
        else:
            self.channel_z = nn.Conv2d(inner, channels, 1, bias=False)
        self.channel_gate = make_gate(owner, gate)
        self.spatial_q = nn.Conv2d(channels, inner, 1, bias=False)
        self.spatial_v = nn.Conv2d(channels, inner, 1, bias=False)
        self.spatial_gate = make_gate(owner, gate)
        with torch.no_grad():
            if init == "network":
                for m in self.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.normal_(m.weight, std=0.001)
            else:
                for conv in (self.channel_q, self.channel_v, self.spatial_q, self.spatial_v):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def channel_attention(self, x: Tensor) -> Tensor:
        """Aᶜʰ, N×C×1×1, in the parameters' dtype."""
        with gate_math(x):
            xs = x.to(self.channel_v.weight.dtype)
            values = self.channel_v(xs).flatten(2)  # N×C/2×HW
            weights = self.channel_q(xs).flatten(2).softmax(2)  # N×1×HW
            context = torch.bmm(values, weights.transpose(1, 2)).unsqueeze(3)  # N×C/2×1×1
            return self.channel_gate(self.channel_z(context))

    def spatial_attention(self, x: Tensor) -> Tensor:
        """Aˢᵖ, N×1×H×W, in the parameters' dtype."""
        with gate_math(x):
            xs = x.to(self.spatial_q.weight.dtype)
            query = self.spatial_q(xs).mean((2, 3)).unsqueeze(1)  # N×1×C/2
            values = self.spatial_v(xs).flatten(2)  # N×C/2×HW
            if self.variant == "paper":
                logits = torch.bmm(query.softmax(2), values)
            elif self.layout == "sequential":
                logits = torch.bmm(query, values.softmax(2))
            else:
                logits = torch.bmm(query, values).softmax(2)
            return self.spatial_gate(logits.unflatten(2, (x.shape[2], x.shape[3])))

    def gate_probes(self) -> list[Probe]:
        """Aᶜʰ as "channel" (N×C×1×1) and Aˢᵖ as "spatial" (N×1×H×W)."""
        return [(self.channel_gate, "channel", output), (self.spatial_gate, "spatial", output)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        channel = x * self.channel_attention(x).to(x.dtype)
        if self.layout == "sequential":
            return channel * self.spatial_attention(channel).to(x.dtype)
        return channel + x * self.spatial_attention(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}, variant={self.variant!r}"
