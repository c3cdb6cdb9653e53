"""Attention modules as a user writes them: registered with attnkit.register, not subclasses of attnkit's base."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit import registry


class SpatialGate(nn.Module):
    """Spatial only: y = x · σ(conv7×7([mean_c x; max_c x])), one gate per position."""

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Sigmoid()

    def channel_weights_unavailable(self) -> str:  # a declaration attnkit stats and prune read
        return "one gate per position, none per channel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * self.gate(self.conv(pooled))


class ChannelGate(nn.Module):
    """Channel only, as SE without the bottleneck: y = x · σ(W·GAP(x) + b)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


@pytest.fixture
def user_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """'user_spatial' and 'user_channel' registered for one test."""
    monkeypatch.setitem(registry.MODULES.entries, "user_spatial", SpatialGate)
    monkeypatch.setitem(registry.MODULES.entries, "user_channel", ChannelGate)
