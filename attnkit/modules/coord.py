"""Coordinate Attention."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels.functions import row_column_gate
from ..registry import register
from ._common import (
    autocast_off,
    batched_pointwise,
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

# The fast gate network runs the 1×1 convolutions as products batched over the samples (`batched_pointwise`) up to this
# width, and as F.linear over the N·(H+W) rows of channels (`pointwise`) above it, where the batched weight gradient
# (one C×mip product per sample, then their sum) costs more than the rows' transposed copies. CPU, 2 threads, gate
# network forward and backward: 1.0 against 1.2 ms at 64×64×8×8, 1.9 against 2.1 at 16×512×16×16, 3.3 each at
# 16×1024×8×8, 8.9 against 3.9 at 16×2048×4×4 (the 1×1 convolutions themselves: 1.9 to 5.6 ms)
BATCHED_UP_TO_CHANNELS = 512


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
        a_h, a_w = self._gates_from_maps(torch.cat([z_h, z_w], dim=2), z_h.shape[2])
        return a_h[..., None], a_w[:, :, None, :]

    def _gates_from_maps(self, z: Tensor, height: int) -> tuple[Tensor, Tensor]:
        """(aʰ N×C×H, aʷ N×C×W) from the joined pools z (N×C×(H+W): zʰ, then zʷ), by the module's own layers over z
        as an N×C×(H+W)×1 map; conv_w sees fʷ as N×mip×1×W, as in the official code."""
        with gate_math(z):
            f = self.act(self.bn1(self.conv1(z[..., None].to(self.conv1.weight.dtype))))
            f_h, f_w = torch.split(f, [height, z.shape[2] - height], dim=2)
            return self.gate(self.conv_h(f_h))[..., 0], self.gate(self.conv_w(f_w.transpose(2, 3)))[:, :, 0]

    def _gates_fast(self, z: Tensor, height: int) -> tuple[Tensor, Tensor]:
        """_gates_from_maps with the 1×1 convolutions as products: batched over the samples up to
        BATCHED_UP_TO_CHANNELS channels, as F.linear over the rows of channels above."""
        with autocast_off(z):
            z = z.to(self.conv1.weight.dtype)
            if self.channels <= BATCHED_UP_TO_CHANNELS:
                f = self.act(self.bn1(batched_pointwise(self.conv1, z)[..., None]))[..., 0]
                f_h, f_w = torch.split(f, [height, z.shape[2] - height], dim=2)
                return self.gate(batched_pointwise(self.conv_h, f_h)), self.gate(batched_pointwise(self.conv_w, f_w))
            # N×mip×(H+W)×1 for the BatchNorm, contiguous: torch's CPU BatchNorm backward is wrong for the
            # channels_last strides the transposed view would have (its last dimension is 1)
            f = pointwise(self.conv1, z.transpose(1, 2)).transpose(1, 2).contiguous()[..., None]
            f_h, f_w = torch.split(self.act(self.bn1(f))[..., 0].transpose(1, 2), [height, z.shape[2] - height], dim=1)
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
        return row_column_gate(backend, x, self._gates_fast if fast else self._gates_from_maps, residual, relu)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x)
        if backend is not None:
            return row_column_gate(backend, x, self._gates_fast if fast else self._gates_from_maps)
        if fast:
            dtype = stat_dtype(x)
            a_h, a_w = self._gates_fast(torch.cat([x.mean(3, dtype=dtype), x.mean(2, dtype=dtype)], 2), x.shape[2])
            return x * a_w.to(x.dtype)[:, :, None, :] * a_h.to(x.dtype)[:, :, :, None]
        a_h, a_w = self.attention(x)
        return x * a_w.to(x.dtype) * a_h.to(x.dtype)
