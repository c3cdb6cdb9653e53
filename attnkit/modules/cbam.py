"""Convolutional Block Attention Module."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..kernels.functions import channel_spatial_gate
from ..registry import register
from ._common import (
    autocast_off,
    gate_conv,
    gate_math,
    gate_path,
    make_activation,
    make_gate,
    odd_kernel,
    one_of,
    pointwise,
    reduced_width,
    residual_path,
    stat_dtype,
)
from .base import AttentionModule, Probe, output

POOL_TYPES = ("avg", "max", "lp", "lse")
CHANNEL_POOLS = ("max", "mean")


def _pool_channels(x: Tensor, pool_types: Sequence[str]) -> list[Tensor]:
    """Global pools over H×W, each N×C×1×1 in at least float32."""
    dtype = stat_dtype(x)
    pooled = []
    for kind in pool_types:
        if kind == "avg":
            pooled.append(x.mean((2, 3), keepdim=True, dtype=dtype))
        elif kind == "max":  # max over a dimension: its gradient goes to the first maximum, as the official code's
            pooled.append(x.flatten(2).max(2).values[:, :, None, None].to(dtype))
        elif kind == "lp":  # the L2 norm, as F.lp_pool2d(x, 2, (H, W)) in the official code
            pooled.append(x.to(dtype).square().sum((2, 3), keepdim=True).sqrt())
        else:  # "lse": log-sum-exp over H×W
            pooled.append(torch.logsumexp(x.to(dtype).flatten(2), dim=2)[:, :, None, None])
    return pooled


def _pool_across_channels(x: Tensor, order: Sequence[str]) -> Tensor:
    """Max and mean over C, N×2×H×W in at least float32, concatenated in `order`."""
    maps = {
        "max": x.max(1, keepdim=True).values.to(stat_dtype(x)),
        "mean": x.mean(1, keepdim=True, dtype=stat_dtype(x)),
    }
    return torch.cat([maps[kind] for kind in order], dim=1)


class ChannelGate(nn.Module):
    """CBAM's channel attention: Mc = σ(Σ_p MLP(pool_p(x))), one MLP shared by the pools."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        pool_types: Sequence[str],
        bias: bool,
        act: str | type[nn.Module],
        gate: str | type[nn.Module],
    ) -> None:
        super().__init__()
        self.pool_types = tuple(pool_types)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = make_activation("CBAM", act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        self.gate = make_gate("CBAM", gate)

    def forward(self, x: Tensor) -> Tensor:
        """Mc, N×C×1×1."""
        return self.from_pools(_pool_channels(x, self.pool_types))

    def from_pools(self, pooled: list[Tensor]) -> Tensor:
        """Mc, N×C×1×1, from the pools over H×W (N×C×1×1 each, in `pool_types` order)."""
        with gate_math(pooled[0]):
            dtype = self.fc1.weight.dtype
            logits = sum(self.fc2(self.act(self.fc1(p.to(dtype)))) for p in pooled)
            return self.gate(logits)

    def from_rows(self, mean: Tensor, top: Tensor) -> Tensor:
        """Mc, N×C, from the mean and max over H×W (N×C each; `pool_types` of 'avg' and 'max' only): from_pools with
        the shared MLP run once, as F.linear, on the pools stacked as rows."""
        pools = {"avg": mean, "max": top}
        rows = torch.cat([pools[kind] for kind in self.pool_types])
        with autocast_off(rows):
            logits = pointwise(self.fc2, self.act(pointwise(self.fc1, rows.to(self.fc1.weight.dtype))))
            return self.gate(logits.view(len(self.pool_types), *mean.shape).sum(0))


class SpatialGate(nn.Module):
    """CBAM's spatial attention: Ms = σ(BN(conv_k([max_c(x); mean_c(x)])))."""

    def __init__(self, kernel_size: int, order: Sequence[str], norm: bool, gate: str | type[nn.Module]) -> None:
        super().__init__()
        self.order = tuple(order)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=not norm)
        # momentum 0.01 as in the official BasicConv
        self.bn = nn.BatchNorm2d(1, momentum=0.01) if norm else nn.Identity()
        self.gate = make_gate("CBAM", gate)

    def forward(self, x: Tensor) -> Tensor:
        """Ms, N×1×H×W."""
        return self.from_pools(_pool_across_channels(x, self.order))

    def from_pools(self, pooled: Tensor) -> Tensor:
        """Ms, N×1×H×W, from the pools over C (N×2×H×W, in `order`)."""
        with gate_math(pooled):
            return self.gate(self.bn(gate_conv(self.conv, pooled)))


@register("cbam")
class CBAM(AttentionModule):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018).

    Official code: https://github.com/Jongchan/attention-module (MODELS/cbam.py)

        x' = x · Mc(x),   Mc = σ(MLP(AvgPool(x)) + MLP(MaxPool(x)))            (one shared MLP, r = 16)
        y  = x' · Ms(x'), Ms = σ(BN(conv7×7([MaxPool_c(x'); AvgPool_c(x')])))  (conv without bias)

    Channel gate first, then spatial; no residual inside the module.

    Args:
        channels: C.
        reduction: r of the shared MLP (hidden width max(1, C // r)).
        kernel_size: k of the spatial convolution (odd).
        pool_types: channel-gate pools, any of 'avg', 'max', 'lp' (L2), 'lse' (log-sum-exp).
        no_spatial: drop the spatial gate (the paper's channel-only ablation).
        hidden_channels: explicit MLP width.
        bias: biases in the MLP (the official Linear layers have them).
        spatial_pools: order of the pooled maps fed to the spatial conv; ('mean', 'max') matches timm.
        spatial_norm: BatchNorm after the spatial conv (official); False gives the zoo's biased conv.
        residual: return y + x (a zoo variant, not the paper's).
        act, gate: the MLP's activation and the gating function of both gates.
    """

    gate_name = "channel"  # Mc, for the channel weights; the spatial gate is left out there

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        kernel_size: int = 7,
        *,
        pool_types: Sequence[str] = ("avg", "max"),
        no_spatial: bool = False,
        hidden_channels: int | None = None,
        bias: bool = True,
        spatial_pools: Sequence[str] = CHANNEL_POOLS,
        spatial_norm: bool = True,
        residual: bool = False,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        pool_types = self._pool_list(owner, "pool_types", pool_types, POOL_TYPES)
        spatial_pools = self._pool_list(owner, "spatial_pools", spatial_pools, CHANNEL_POOLS)
        if sorted(spatial_pools) != sorted(CHANNEL_POOLS):
            raise ValueError(f"{owner}: `spatial_pools` must order 'max' and 'mean', got {spatial_pools!r}.")
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        self.residual = bool(residual)
        self.channel_gate = ChannelGate(channels, hidden, pool_types, bool(bias), act, gate)
        self.spatial_gate = None
        if not no_spatial:
            kernel_size = odd_kernel(owner, "kernel_size", kernel_size)
            self.spatial_gate = SpatialGate(kernel_size, spatial_pools, bool(spatial_norm), gate)
            if spatial_norm:
                self.batchnorm_views = (((2, 3), 1),)

    @staticmethod
    def _pool_list(owner: str, name: str, value: object, valid: Sequence[str]) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
            raise TypeError(f"{owner}: `{name}` must be a non-empty tuple of names from {list(valid)}, got {value!r}.")
        if len(set(value)) != len(value):
            raise ValueError(f"{owner}: `{name}` has a repeated entry: {value!r}.")
        return tuple(one_of(owner, name, v, valid) for v in value)

    @property
    def _fusable(self) -> bool:
        """Whether the fused path computes this configuration: both gates, the channel gate's pools avg and max."""
        return self.spatial_gate is not None and set(self.channel_gate.pool_types) <= {"avg", "max"}

    def forward_residual(self, x: Tensor, residual: Tensor, relu: bool = True) -> Tensor:
        x = self.check_input(x)
        backend, fast = residual_path(self, x, residual) if self._fusable and not self.residual else (None, False)
        if backend is None:
            return super().forward_residual(x, residual, relu)
        return self._fused(backend, x, fast, residual, relu)

    def _fused(self, backend, x: Tensor, fast: bool, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        channel, spatial = self.channel_gate, self.spatial_gate

        def channel_weights(mean: Tensor, top: Tensor) -> Tensor:
            pools = {"avg": mean, "max": top}
            return channel.from_pools([pools[kind][:, :, None, None] for kind in channel.pool_types]).flatten(1)

        def spatial_weights(mean: Tensor, top: Tensor) -> Tensor:
            pools = {"mean": mean, "max": top}
            return spatial.from_pools(torch.stack([pools[kind] for kind in spatial.order], dim=1)).squeeze(1)

        return channel_spatial_gate(backend, x, channel.from_rows if fast else channel_weights, spatial_weights,
                                    residual, relu)

    def _fast(self, x: Tensor) -> Tensor:
        """The reference formulas with the channel gate's MLP as in the fused path (ChannelGate.from_rows)."""
        dtype = stat_dtype(x)
        mc = self.channel_gate.from_rows(x.mean((2, 3), dtype=dtype), x.flatten(2).max(2).values.to(dtype))
        y = x * mc.to(x.dtype).view(*x.shape[:2], 1, 1)
        return y * self.spatial_gate(y).to(x.dtype)

    def init_in_network(self) -> None:
        """As the official ResNet (MODELS/model_resnet.py) re-initialises its CBAM modules: every bias 0, the spatial
        convolution kaiming-normal (fan_out), and the spatial gate's BN weight 0 (its key holds "SpatialGate"), so
        that Ms starts at σ(0) = 0.5 everywhere. The MLP's weights keep PyTorch's initialisation, as there."""
        convs = [self.channel_gate.fc1, self.channel_gate.fc2]
        if self.spatial_gate is not None:
            nn.init.kaiming_normal_(self.spatial_gate.conv.weight, mode="fan_out")
            convs.append(self.spatial_gate.conv)
            if isinstance(self.spatial_gate.bn, nn.BatchNorm2d):
                self.spatial_gate.bn.weight.zero_()
                self.spatial_gate.bn.bias.zero_()
        for conv in convs:
            if conv.bias is not None:
                conv.bias.zero_()

    def gate_probes(self) -> list[Probe]:
        """Mc as "channel" (N×C×1×1) and Ms as "spatial" (N×1×H×W, unless no_spatial); channel weights are Mc."""
        spatial = [] if self.spatial_gate is None else [(self.spatial_gate, "spatial", output)]
        return [(self.channel_gate, "channel", output), *spatial]

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x) if self._fusable else (None, False)
        if backend is not None:
            y = self._fused(backend, x, fast)
        elif fast:
            y = self._fast(x)
        else:
            y = x * self.channel_gate(x).to(x.dtype)
            if self.spatial_gate is not None:
                y = y * self.spatial_gate(y).to(x.dtype)
        return y + x if self.residual else y
