"""Coordinate Attention."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels.functions import row_column_gate
from ..registry import register
from ._common import (
    autocast_off,
    gate_math,
    gate_path,
    make_activation,
    make_gate,
    pointwise,
    positive_int,
    reduced_width,
    residual_path,
    stat_dtype,
)
from .base import Probe, RowColumnAttention

# The gate network as F.linear over N×(H+W) rows (`_gates_from_rows`) pays from this batch size; below, its more
# numerous small operations cost more than the 1×1 convolutions over the pooled N×C×(H+W)×1 maps save (CPU, forward
# and backward: 0.55 against 0.48 ms at batch 2, equal at 8, 1.0 against 1.8 ms at 64×64 channels, 5×5 maps)
ROWS_FROM_BATCH = 16


@register("coord")
class CoordAttention(RowColumnAttention):
    """Coordinate Attention (Hou et al., "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021).

    Official code: https://github.com/houqb/CoordAttention

        zʰ = mean_W(x) (N×C×H×1),   zʷ = mean_H(x) (N×C×1×W)
        f  = h_swish(BN(conv1×1([zʰ; zʷ])))          C → mip = max(8, C // 32), along the joined spatial axis
        aʰ = σ(conv1×1(fʰ)),  aʷ = σ(conv1×1(fʷ))    mip → C each
        y  = x · aʰ · aʷ

    All three 1×1 convolutions have biases (official code; timm's CoordAttn drops them: `bias=False`).
    The README of the official repository says SiLU; its code uses h_swish, which is the default here.

    Args:
        channels: C.
        reduction: 32; mip = max(min_hidden, C // reduction) unless `hidden_channels` is given.
        min_hidden: lower bound of mip (8).
        hidden_channels: explicit mip.
        bias: biases on the 1×1 convolutions.
        act: activation after the BN ('hard_swish'); gate: the gating function.
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 32,
        *,
        min_hidden: int = 8,
        hidden_channels: int | None = None,
        bias: bool = True,
        act: str | type[nn.Module] = "hard_swish",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        min_hidden = positive_int(owner, "min_hidden", min_hidden)
        mip = reduced_width(owner, channels, reduction, hidden_channels, minimum=min_hidden)
        self.conv1 = nn.Conv2d(channels, mip, 1, bias=bool(bias))
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = make_activation(owner, act)
        self.conv_h = nn.Conv2d(mip, channels, 1, bias=bool(bias))
        self.conv_w = nn.Conv2d(mip, channels, 1, bias=bool(bias))
        self.gate = make_gate(owner, gate)

    def init_in_network(self) -> None:
        """As the official MobileNetV2 (mbv2_ca.py, _initialize_weights) re-initialises every convolution: weights
        N(0, 2/n) with n = k·k·out_channels (kaiming-normal, fan_out), biases 0; the BN keeps weight 1, bias 0."""
        for conv in (self.conv1, self.conv_h, self.conv_w):
            n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            conv.weight.normal_(0, math.sqrt(2.0 / n))
            if conv.bias is not None:
                conv.bias.zero_()

    def attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(aʰ, aʷ): N×C×H×1 and N×C×1×W."""
        dtype = stat_dtype(x)
        return self.attention_from_pools(x.mean(3, dtype=dtype), x.mean(2, dtype=dtype))

    def attention_from_pools(self, z_h: Tensor, z_w: Tensor) -> tuple[Tensor, Tensor]:
        """(aʰ N×C×H×1, aʷ N×C×1×W) from zʰ (mean over W, N×C×H) and zʷ (mean over H, N×C×W)."""
        h, w = z_h.shape[2], z_w.shape[2]
        z = torch.cat([z_h, z_w], dim=2)[..., None]
        with gate_math(z):
            f = self.act(self.bn1(self.conv1(z.to(self.conv1.weight.dtype))))
            f_h, f_w = torch.split(f, [h, w], dim=2)
            return self.gate(self.conv_h(f_h)), self.gate(self.conv_w(f_w.transpose(2, 3)))

    def _gates_from_pools(self, z_h: Tensor, z_w: Tensor) -> tuple[Tensor, Tensor]:
        a_h, a_w = self.attention_from_pools(z_h, z_w)
        return a_h.squeeze(3), a_w.squeeze(2)

    def _gates_from_rows(self, z_h: Tensor, z_w: Tensor) -> tuple[Tensor, Tensor]:
        """(aʰ N×C×H, aʷ N×C×W) from zʰ (N×C×H) and zʷ (N×C×W): attention_from_pools with the 1×1 convolutions as
        F.linear over the channels of each position of the joined axis (N×(H+W)×C rows)."""
        h, w = z_h.shape[2], z_w.shape[2]
        with autocast_off(z_h):
            rows = torch.cat([z_h, z_w], dim=2).transpose(1, 2).to(self.conv1.weight.dtype)
            # N×mip×(H+W)×1 for the BatchNorm, contiguous: torch's CPU BatchNorm backward is wrong for the
            # channels_last strides the transposed view would have (its last dimension is 1)
            f = pointwise(self.conv1, rows).transpose(1, 2).contiguous()[..., None]
            f_h, f_w = torch.split(self.act(self.bn1(f))[..., 0].transpose(1, 2), [h, w], dim=1)
            return (self.gate(pointwise(self.conv_h, f_h)).transpose(1, 2),
                    self.gate(pointwise(self.conv_w, f_w)).transpose(1, 2))

    def gate_probes(self) -> list[Probe]:
        """aʰ as "a_h" (N×C×H×1) and aʷ as "a_w" (N×C×1×W)."""
        return [(self.conv_h, "a_h", lambda inputs, out: self.gate(out)), (self.conv_w, "a_w", lambda inputs, out: self.gate(out))]

    def forward_residual(self, x: Tensor, residual: Tensor, relu: bool = True) -> Tensor:
        x = self.check_input(x)
        backend, fast = residual_path(self, x, residual)
        if backend is None:
            return super().forward_residual(x, residual, relu)
        gates = self._gates_from_rows if fast and x.shape[0] >= ROWS_FROM_BATCH else self._gates_from_pools
        return row_column_gate(backend, x, gates, residual, relu)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x)
        fast = fast and x.shape[0] >= ROWS_FROM_BATCH
        if backend is not None:
            return row_column_gate(backend, x, self._gates_from_rows if fast else self._gates_from_pools)
        if fast:
            dtype = stat_dtype(x)
            a_h, a_w = self._gates_from_rows(x.mean(3, dtype=dtype), x.mean(2, dtype=dtype))
            return x * a_w.to(x.dtype)[:, :, None, :] * a_h.to(x.dtype)[:, :, :, None]
        a_h, a_w = self.attention(x)
        return x * a_w.to(x.dtype) * a_h.to(x.dtype)
