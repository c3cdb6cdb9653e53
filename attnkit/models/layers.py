"""Layers the backbones share."""
from __future__ import annotations

from torch import Tensor, nn


class GlobalAvgPool(nn.Module):
    """The mean over H×W, N×C×1×1: nn.AdaptiveAvgPool2d(1) written as a mean, which torch.export keeps dynamic
    for every map size (the adaptive pooling's decomposition branches on a 1×1 map)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3), keepdim=True)
