"""Efficient Channel Attention."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import GateWeights
from ..kernels.cpu import GATES
from ..kernels.functions import GateNetwork, channel_gate
from ..registry import register
from ._common import (DERIVATIVES, autocast_off, derivatives_known, gate_math, gate_path, make_gate, odd_kernel,
                      stat_dtype)
from .base import ChannelGateAttention, Probe


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: t = int(|log₂(C)/γ + b/γ|); k = t if t is odd else t + 1."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


@register("eca")
class ECA(ChannelGateAttention):
    """Efficient Channel Attention (Wang et al., "ECA-Net", CVPR 2020).

    Official code: https://github.com/BangguWu/ECANet

        s = σ(conv1d_k(GAP(x))),    y = x · s

    a 1-D convolution across the channel axis (one input and output channel, padding (k−1)/2, no bias).
    k follows the paper's formula (`eca_kernel_size`) unless `kernel_size` is given: the released
    ResNet checkpoints pass per-stage kernels (ResNet-50: 3, 5, 5, 7), and a fixed k=3 is the common zoo
    variant.

    Args:
        channels: C.
        kernel_size: odd k; None for the adaptive formula.
        gamma, beta: γ and b of the formula.
        gate: 'sigmoid' or 'hard_sigmoid'.
    """

    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        *,
        gamma: float = 2,
        beta: float = 1,
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        if kernel_size is None:
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf:
                raise ValueError(f"{owner}: `gamma` must be a positive finite number, got {gamma!r}.")
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
                raise TypeError(f"{owner}: `beta` must be a finite number, got {beta!r}.")
            t = abs((math.log2(channels) + beta) / gamma)
            if t > 2 * channels + 1:
                raise ValueError(f"{owner}: `gamma`={gamma} and `beta`={beta} give a kernel of {t:.3g} for {channels} "
                                 f"channels; a kernel wider than 2·C+1 = {2 * channels + 1} only reads padding.")
            kernel_size = eca_kernel_size(channels, gamma, beta)
        self.kernel_size = odd_kernel(owner, "kernel_size", kernel_size)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=(self.kernel_size - 1) // 2, bias=False)
        self.gate = make_gate(owner, gate)

    def excite(self, pooled: Tensor) -> Tensor:
        """s, N×C, from the pooled means, N×C."""
        with gate_math(pooled):
            return self.gate(self.conv(pooled.to(self.conv.weight.dtype).unsqueeze(1))).squeeze(1)  # conv over N×1×C

    def excitation(self, x: Tensor) -> Tensor:
        """The channel weights s, N×C×1×1."""
        return self.excite(x.mean((2, 3), dtype=stat_dtype(x)))[:, :, None, None]

    def gate_probes(self) -> list[Probe]:
        """s as "channel", N×C×1×1 (the gate's output is N×1×C)."""
        return [(self.gate, "channel", lambda inputs, out: out[:, 0, :, None, None])]

    def _excite_rows(self, mean: Tensor) -> Tensor:
        """s, N×C, from the pooled means, N×C: excite() with the 1-D convolution as a product of each zero-padded
        window of k channels with the kernel."""
        with autocast_off(mean):
            z = channel_windows(mean, self.conv) @ self.conv.weight.view(-1)
            return self.gate(z if self.conv.bias is None else z + self.conv.bias)

    def _fused_gate(self, x: Tensor, fast: bool) -> tuple[Callable[[Tensor], Tensor], bool]:
        # with a frozen kernel, matmul runs _excite_rows's product batched, not as one matrix-vector product (ATen's
        # should_fold): other sums, so the graph, whose numbers ChannelWindows matches only for a kernel that trains
        if fast and self.conv.weight.requires_grad and self.conv.bias is None and derivatives_known(self.gate):
            return ChannelWindows(self.conv, self.gate), False
        return (self._excite_rows if fast else self.excite), False

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x, forward_pays=False)
        fused = self._fused_path(x, backend, fast)
        if fused is not None:
            return channel_gate(fused[0], x, *fused[1:])
        if fast:
            return x * self._excite_rows(x.mean((2, 3), dtype=stat_dtype(x))).to(x.dtype).view(*x.shape[:2], 1, 1)
        return x * self.excitation(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


def channel_windows(mean: Tensor, conv: nn.Conv1d) -> Tensor:
    """The zero-padded window of k channels around each channel of the means, N×C×k, in the kernel's dtype: what ECA's
    1-D convolution across the channels multiplies by its kernel."""
    pad = conv.padding[0]
    return F.pad(mean.to(conv.weight.dtype), (pad, pad)).unfold(1, conv.kernel_size[0], 1)


class ChannelWindows(GateNetwork):
    """ECA's gate network on the means, N×C: gate(conv1d_k) across the channels as the product of each zero-padded
    window of k channels with the kernel (ECA._excite_rows), with its backward written out, for the channel_gate node.
    The same operations as autograd's through _excite_rows, so the same results bit for bit."""

    def __init__(self, conv: nn.Conv1d, gate: nn.Module) -> None:
        self.conv, self.gate = conv, DERIVATIVES[type(gate)]
        self.params = (conv.weight,)
        if type(gate) in GATES:
            self.weights = GateWeights("windows", conv.weight, gate=type(gate))

    def forward(self, mean: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        weight = self.conv.weight
        with autocast_off(mean):
            windows = channel_windows(mean, self.conv).reshape(-1, weight.shape[-1])
            z = windows.mv(weight.view(-1)).view(mean.shape)
            g = self.gate.forward(z)
        return g, (windows, z, g, weight)

    def backward(self, dg: Tensor, saved: Sequence[Tensor],
                 needs: Sequence[bool]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        windows, z, g, weight = saved
        (n, c), (k,), (pad,) = g.shape, self.conv.kernel_size, self.conv.padding
        dz = self.gate.backward(dg, z, g).reshape(-1)
        dwindows = dz.outer(weight.view(-1)).view(n, c, k)
        dpadded = torch.ops.aten.unfold_backward(dwindows, [n, c + 2 * pad], 1, k, 1)
        return dpadded[:, pad:pad + c], (windows.t().mv(dz).view_as(weight) if needs[0] else None,)
