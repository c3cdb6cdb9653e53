"""Gather-Excite."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.functions import channel_gate, gathered_channel_gate
from ..registry import register
from ._common import (
    CAFFE_BN_MOMENTUM,
    autocast_off,
    caffe_msra_,
    gate_math,
    gate_path,
    make_activation,
    make_gate,
    one_of,
    positive_int,
    reduced_width,
    stat_dtype,
)
from .base import ChannelGateAttention

VARIANTS = ("minus", "theta", "plus")


@torch.fx.wrap
def check_gather_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A global-extent θ gather is a convolution whose kernel covers the map: the map must have that size."""
    if tuple(x.shape[2:]) != size:
        raise ValueError(
            f"GatherExcite(variant θ/θ⁺, extent=0) was built for {size[0]}×{size[1]} maps (its gather kernel covers "
            f"the whole map), got {x.shape[2]}×{x.shape[3]}. Build it with spatial_size={tuple(x.shape[2:])}, or "
            f"use a strided extent (2, 4, 8), which takes any size."
        )
    return x


def _spatial_size(owner: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(
            f"{owner}: variants 'theta' and 'plus' with extent=0 need `spatial_size` (H, W) of the feature map their "
            f"gather covers, got {value!r}."
        )
    return (positive_int(owner, "spatial_size", value[0]), positive_int(owner, "spatial_size", value[1]))


@register("ge")
class GatherExcite(ChannelGateAttention):
    """Gather-Excite (Hu et al., "Gather-Excite: Exploiting Feature Context in CNNs", NeurIPS 2018).

    Official code: https://github.com/hujie-frank/GENet

        y = x · σ(upsample(ξ_E(ξ_G(x))))

    Variants (`variant`):
      'minus' (θ⁻): ξ_G averages over the extent, ξ_E is the identity; no parameters.
      'theta' (θ):  ξ_G is depthwise convolution + BN: one kernel covering the map for the global extent
                    (needs `spatial_size`), or log₂(e) stride-2 3×3 depthwise convolutions (BN, ReLU between).
      'plus'  (θ⁺): θ's gather, BN, ReLU, then ξ_E = conv1×1 (C → C/16, bias), ReLU, conv1×1 (C/16 → C).
    `extent` 0 is global; 2, 4, 8 gather over local windows with stride e (θ⁻: average pooling with kernel
    2e−1 and padding e−1, excluding padding) and the gate is upsampled back by nearest neighbour.

    Args:
        channels: C.
        extent: 0 (global) or a power of two.
        variant: 'minus', 'theta' or 'plus'.
        spatial_size: (H, W) of the maps, for 'theta'/'plus' with extent 0.
        reduction: r of θ⁺'s excite MLP (16); hidden_channels: its explicit width.
        act: θ⁺'s activation; gate: the gating function.
    """

    def __init__(
        self,
        channels: int,
        extent: int = 0,
        *,
        variant: str = "minus",
        spatial_size: int | tuple[int, int] | None = None,
        reduction: float = 16,
        hidden_channels: int | None = None,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.variant = one_of(owner, "variant", variant, VARIANTS)
        self.extent = positive_int(owner, "extent", extent, minimum=0)
        if self.extent == 1 or self.extent & (self.extent - 1):
            raise ValueError(f"{owner}: `extent` must be 0 (global) or a power of two (2, 4, 8, ...), got {extent}.")
        self.spatial_size: tuple[int, int] | None = None
        self.gather: nn.Module | None = None
        if self.variant != "minus":
            self.batchnorm_views = (((2, 3), self.extent),) if self.extent else (((), 1),)
            if self.extent == 0:
                self.spatial_size = _spatial_size(owner, spatial_size)
                self.gather = nn.Sequential(
                    nn.Conv2d(channels, channels, self.spatial_size, groups=channels, bias=False),
                    nn.BatchNorm2d(channels),
                )
            else:
                layers: list[nn.Module] = []
                for i in range(int(math.log2(self.extent))):
                    if i:
                        layers.append(make_activation(owner, act))
                    layers += [nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False), nn.BatchNorm2d(channels)]
                self.gather = nn.Sequential(*layers)
        elif spatial_size is not None:
            raise ValueError(f"{owner}: `spatial_size` is only used by variants 'theta' and 'plus', got it with 'minus'.")
        self.excite: nn.Module = nn.Identity()
        if self.variant == "plus":
            hidden = reduced_width(owner, channels, reduction, hidden_channels)
            self.excite = nn.Sequential(
                make_activation(owner, act),
                nn.Conv2d(channels, hidden, 1),
                make_activation(owner, act),
                nn.Conv2d(hidden, channels, 1),
            )
        self.gate = make_gate(owner, gate)

    def init_in_network(self) -> None:
        """As the official Caffe definitions (models/RN50-GEP.prototxt, RN50-GEPP.prototxt) fill the module: the
        gather's depthwise convolutions "msra" (N(0, 2/fan_in)), its BNs scale 1, shift 0 and momentum 0.95 in Caffe's
        sense (CAFFE_BN_MOMENTUM in PyTorch's); θ⁺'s excite convolutions N(0, 0.01²) with biases 0. The definitions
        give the global extent only; the strided gathers' convolutions and BNs are filled the same way. θ⁻ has no
        parameters."""
        for m in self.gather.modules() if self.gather is not None else ():
            if isinstance(m, nn.Conv2d):
                caffe_msra_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                m.momentum = CAFFE_BN_MOMENTUM
                m.weight.fill_(1)
                m.bias.zero_()
        for m in self.excite.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.01)
                m.bias.zero_()

    def gathered(self, x: Tensor) -> Tensor:
        """ξ_G(x): N×C×1×1 for the global extent, N×C×⌈H/e⌉×⌈W/e⌉ otherwise."""
        if self.gather is None:
            if self.extent == 0:
                return x.mean((2, 3), keepdim=True, dtype=stat_dtype(x))
            e = self.extent
            return F.avg_pool2d(x.to(stat_dtype(x)), 2 * e - 1, e, e - 1, count_include_pad=False)
        if self.spatial_size is not None:
            x = check_gather_size(x, self.spatial_size)
        return self.gather(x.to(self.gather[0].weight.dtype))

    def attention(self, x: Tensor) -> Tensor:
        """The gate σ(ξ_E(ξ_G(x))) before upsampling."""
        with gate_math(x):
            return self.gate(self.excite(self.gathered(x)))

    def _excite_means(self, mean: Tensor) -> Tensor:
        with gate_math(mean):
            return self.gate(self.excite(mean[:, :, None, None])).flatten(1)

    def _gate_of_means(self, mean: Tensor) -> Tensor:
        """θ⁻'s gate from the means (float [N, C]), without the identity ξ_E."""
        with autocast_off(mean):
            return self.gate(mean)

    def _excite_gathered(self, gathered: Tensor) -> Tensor:
        """The gate from the global gather's depthwise sums (float [N, C]): the convolution's bias if it has one
        (once attnkit.fuse has folded the BN into it), the rest of ξ_G (BN), ξ_E and the gate."""
        conv, rest = self.gather[0], self.gather[1:]
        z = gathered.to(conv.weight.dtype)[:, :, None, None]
        with gate_math(gathered):
            return self.gate(self.excite(rest(z if conv.bias is None else z + conv.bias[:, None, None]))).flatten(1)

    @property
    def fixed_spatial_size(self) -> tuple[int, int] | None:
        """θ and θ⁺ with the global extent gather with a kernel the size of the map: they take that size only."""
        return self.spatial_size

    def _fused_gate(self, x: Tensor, fast: bool) -> tuple[Callable[[Tensor], Tensor], bool] | None:
        """θ⁻ over the whole map: the gate from the means; the other configurations have no channel_gate path."""
        if self.extent or self.gather is not None:
            return None
        return (self._gate_of_means if fast else self._excite_means), False

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x, forward_pays=self.gather is not None) if self.extent == 0 else (None, False)
        minus_global = self.extent == 0 and self.gather is None
        if backend is not None and minus_global:  # θ⁻: a gate per channel from the means
            return channel_gate(backend, x, *self._fused_gate(x, fast))
        if backend is not None:  # θ, θ⁺: from the depthwise kernel covering the map
            check_gather_size(x, self.spatial_size)
            return gathered_channel_gate(backend, x, self.gather[0].weight, self._excite_gathered)
        if minus_global and fast:
            return x * self._gate_of_means(x.mean((2, 3), keepdim=True, dtype=stat_dtype(x))).to(x.dtype)
        g = self.attention(x)
        if self.extent:
            g = F.interpolate(g, size=x.shape[2:], mode="nearest")
        return x * g.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, extent={self.extent}, variant={self.variant!r}"
