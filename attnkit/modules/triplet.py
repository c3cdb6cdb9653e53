"""Triplet Attention."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .. import kernels
from ..kernels.functions import triplet_gate
from ..registry import register
from ._common import gate_conv, gate_math, make_gate, odd_kernel, stat_dtype
from .base import AttentionModule, Probe, output


def z_pool(x: Tensor, dim: int) -> Tensor:
    """Z-pool: [max; mean] over `dim`, stacked as a new axis 1, in at least float32. The max's gradient goes to the
    first maximum, as torch.max in the official code."""
    return torch.stack([x.max(dim).values.to(stat_dtype(x)), x.mean(dim, dtype=stat_dtype(x))], dim=1)


class AttentionGate(nn.Module):
    """One branch's gate: σ(BN(conv_k(Z-pool))), conv without bias, BN momentum 0.01 (official BasicConv)."""

    def __init__(self, kernel_size: int, gate: str | type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)
        self.gate = make_gate("TripletAttention", gate)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.gate(self.bn(gate_conv(self.conv, pooled)))


@register("triplet")
class TripletAttention(AttentionModule):
    """Triplet Attention (Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module", WACV 2021).

    Official code: https://github.com/landskape-ai/triplet-attention

    Three branches, each a gate σ(BN(conv7×7(Z-pool))) with Z-pool = [max; mean] over one axis:
        (C, W) plane, pooled over H -> a_cw, N×C×1×W   (official: permute so H is the channel axis)
        (H, C) plane, pooled over W -> a_hc, N×C×H×1
        (H, W) plane, pooled over C -> a_hw, N×1×H×W
        y = x · (a_cw + a_hc + a_hw) / 3             (the mean of the three gated tensors)

    `no_spatial=True` drops the (H, W) branch and averages the other two. The module has 2·(2k² + 2)
    or 3·(2k² + 2) parameters whatever C is.

    Args:
        channels: C (checked against the input; the parameters do not depend on it).
        kernel_size: k (7).
        no_spatial: drop the (H, W) branch.
        gate: the gating function.
    """

    def __init__(
        self, channels: int, kernel_size: int = 7, *, no_spatial: bool = False, gate: str | type[nn.Module] = "sigmoid"
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        kernel_size = odd_kernel(owner, "kernel_size", kernel_size)
        self.cw = AttentionGate(kernel_size, gate)
        self.hc = AttentionGate(kernel_size, gate)
        self.hw = None if no_spatial else AttentionGate(kernel_size, gate)
        # the BatchNorms see N·C·W, N·H·C and N·H·W values
        self.batchnorm_views = (((1, 3), 1), ((2, 1), 1)) + ((((2, 3), 1),) if self.hw is not None else ())

    def attention(self, x: Tensor) -> list[Tensor]:
        """The branch gates [a_cw (N×C×1×W), a_hc (N×C×H×1), a_hw (N×1×H×W)], without a_hw if no_spatial."""
        return self.attention_from_pools(*[z_pool(x, dim) for dim in (2, 3, 1)[: 2 if self.hw is None else 3]])

    def attention_from_pools(self, z_cw: Tensor, z_hc: Tensor, z_hw: Tensor | None = None) -> list[Tensor]:
        """The branch gates from the Z-pools over H (N×2×C×W), over W (N×2×C×H) and over C (N×2×H×W)."""
        with gate_math(z_cw):
            gates = [
                self.cw(z_cw).transpose(1, 2),  # conv over (C, W): N×1×C×W -> N×C×1×W
                self.hc(z_hc.transpose(2, 3)).permute(0, 3, 2, 1),  # conv over (H, C): N×1×H×C -> N×C×H×1
            ]
            if self.hw is not None:
                gates.append(self.hw(z_hw))  # conv over (H, W)
        return gates

    def _gates_from_pools(self, *pools: Tensor) -> list[Tensor]:
        """[a_cw N×C×W, a_hc N×C×H(, a_hw N×H×W)] from (max, mean) over H, over W (and over C)."""
        z = [torch.stack(pools[i: i + 2], dim=1) for i in range(0, len(pools), 2)]
        a_cw, a_hc, *a_hw = self.attention_from_pools(*z)
        return [a_cw.squeeze(2), a_hc.squeeze(3), *(a.squeeze(1) for a in a_hw)]

    def init_in_network(self) -> None:
        """As the official ResNet (MODELS/resnet.py) re-initialises its modules: each branch's convolution
        kaiming-normal (fan_out), in the order (C, W), (H, C), (H, W); the (H, W) branch's BN weight 0 (its key holds
        "SpatialGate"), so that branch's gate starts at σ(0) = 0.5; the other two BNs keep weight 1."""
        for branch in (self.cw, self.hc, self.hw):
            if branch is not None:
                nn.init.kaiming_normal_(branch.conv.weight, mode="fan_out")
        if self.hw is not None:
            self.hw.bn.weight.zero_()
            self.hw.bn.bias.zero_()

    def gate_probes(self) -> list[Probe]:
        """The branch gates as "cw" (N×C×1×W), "hc" (N×C×H×1) and "hw" (N×1×H×W, unless no_spatial)."""
        spatial = [] if self.hw is None else [(self.hw, "hw", output)]
        return [
            (self.cw, "cw", lambda inputs, out: out.transpose(1, 2)),  # N×1×C×W -> N×C×1×W
            (self.hc, "hc", lambda inputs, out: out.permute(0, 3, 2, 1)),  # N×1×H×C -> N×C×H×1
            *spatial,
        ]

    def channel_weights_unavailable(self) -> str:
        return "its gates are C×W, H×C and H×W maps, not one weight per channel"

    def spatial_map(self, gates: Mapping[str, Tensor]) -> tuple[str, Tensor] | None:
        """The (H, W) branch's gate; None with no_spatial."""
        return ("hw", gates["hw"].float().mean(1)) if "hw" in gates else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend = kernels.backend_for(x)
        if backend is not None:
            return triplet_gate(backend, x, self._gates_from_pools, spatial=self.hw is not None)
        gates = self.attention(x)
        return x * (sum(gates) / len(gates)).to(x.dtype)
