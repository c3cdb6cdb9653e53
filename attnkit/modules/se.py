"""Squeeze-and-Excitation."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from ..kernels.backend import GateWeights
from ..kernels.cpu import ACTS, GATES
from ..kernels.functions import GateNetwork, channel_gate
from ..registry import register
from ._common import (DERIVATIVES, autocast_off, derivatives_known, gate_math, gate_path, make_activation, make_gate,
                      pointwise, reduced_width, stat_dtype)
from .base import ChannelGateAttention


@register("se")
class SqueezeExcite(ChannelGateAttention):
    """Squeeze-and-Excitation block (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2019).

    Official code: https://github.com/hujie-frank/SENet

        s = σ(W₂ δ(W₁ GAP(x) + b₁) + b₂),    y = x · s

    with W₁: C → C/r, δ = ReLU, r = 16. The released models have biases on both FCs (`bias=True`); the
    TPAMI ablations drop them (`bias=False`). The FCs are 1×1 convolutions named `fc1`/`fc2`, as in
    torchvision and timm, so their weights load directly.

    Args:
        channels: C, the input's channel count.
        reduction: r; the hidden width is max(1, C // r) unless `hidden_channels` is given.
        hidden_channels: explicit hidden width (overrides `reduction`).
        bias: biases on the two FCs.
        act: hidden activation (name or nn.Module class).
        gate: 'sigmoid' or 'hard_sigmoid' (or an nn.Module class).
    """

    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bool(bias))
        self.act = make_activation(owner, act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bool(bias))
        self.gate = make_gate(owner, gate)

    def excite(self, pooled: Tensor) -> Tensor:
        """s from the pooled means (N×C×1×1), in the parameters' dtype."""
        with gate_math(pooled):
            return self.gate(self.fc2(self.act(self.fc1(pooled.to(self.fc1.weight.dtype)))))

    def excitation(self, x: Tensor) -> Tensor:
        """The channel weights s, N×C×1×1, in the parameters' dtype."""
        return self.excite(x.mean((2, 3), keepdim=True, dtype=stat_dtype(x)))

    def _excite_rows(self, mean: Tensor) -> Tensor:
        """s, N×C, from the pooled means, N×C: excite() with the FCs as F.linear."""
        with autocast_off(mean):
            return self.gate(pointwise(self.fc2, self.act(pointwise(self.fc1, mean.to(self.fc1.weight.dtype)))))

    def _excite_submodules(self, mean: Tensor) -> Tensor:
        return self.excite(mean[:, :, None, None]).flatten(1)

    def _fused_gate(self, x: Tensor, fast: bool) -> tuple[Callable[[Tensor], Tensor], bool]:
        if fast and derivatives_known(self.act, self.gate):
            return PointwiseMLP(self.fc1, self.act, self.fc2, self.gate), False
        return (self._excite_rows if fast else self._excite_submodules), False

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x, forward_pays=False)
        fused = self._fused_path(x, backend, fast)
        if fused is not None:
            return channel_gate(fused[0], x, *fused[1:])
        if fast:
            return x * self._excite_rows(x.mean((2, 3), dtype=stat_dtype(x))).to(x.dtype).view(*x.shape[:2], 1, 1)
        return x * self.excitation(x).to(x.dtype)


class PointwiseMLP(GateNetwork):
    """SE's excitation gate(fc2(act(fc1(s)))) on the means, N×C, the 1×1 convolutions as products (`pointwise`), with
    its backward written out, for the channel_gate node; for an `act` and a `gate` whose derivatives_known. The same
    operations as autograd's through SqueezeExcite._excite_rows, so the same results bit for bit."""

    def __init__(self, fc1: nn.Conv2d, act: nn.Module, fc2: nn.Conv2d, gate: nn.Module) -> None:
        self.fc1, self.fc2, self.act, self.gate = fc1, fc2, DERIVATIVES[type(act)], DERIVATIVES[type(gate)]
        self.params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if type(act) in ACTS and type(gate) in GATES:
            self.weights = GateWeights("mlp", *self.params, type(act), type(gate))

    def forward(self, s: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        with autocast_off(s):
            s = s.to(self.fc1.weight.dtype)
            z1 = pointwise(self.fc1, s)
            h = self.act.forward(z1)
            z2 = pointwise(self.fc2, h)
            g = self.gate.forward(z2)
        return g, (s, z1, h, z2, g, self.fc1.weight, self.fc2.weight)

    def backward(self, dg: Tensor, saved: Sequence[Tensor],
                 needs: Sequence[bool]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        s, z1, h, z2, g, w1, w2 = saved
        dz2 = self.gate.backward(dg, z2, g)
        dz1 = self.act.backward(_linear_input_grad(dz2, h, w2.flatten(1)), z1, h)
        return _linear_input_grad(dz1, s, w1.flatten(1)), (dz1.t().mm(s).view_as(w1) if needs[0] else None,
                                                           dz1.sum(0) if needs[1] else None,
                                                           dz2.t().mm(h).view_as(w2) if needs[2] else None,
                                                           dz2.sum(0) if needs[3] else None)


def _linear_input_grad(grad: Tensor, rows: Tensor, weight: Tensor) -> Tensor:
    """The gradient of F.linear's input `rows` (N×C_in) from its output's, as autograd's addmm backward computes it:
    grad·W, but (Wᵀ·gradᵀ)ᵀ where `rows` has the strides of a column-major matrix (one row of one value)."""
    if rows.stride(0) == 1 and rows.stride(1) == rows.shape[0]:
        return weight.t().mm(grad.t()).t()
    return grad.mm(weight)
