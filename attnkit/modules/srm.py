"""Style-based Recalibration Module."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..kernels.functions import channel_gate
from ..registry import register
from ._common import autocast_off, gate_math, gate_path, make_gate, stat_dtype
from .base import ChannelGateAttention


@torch.fx.wrap
def style_pool(x: Tensor, eps: float) -> Tensor:
    """SRM's style pooling t = [μ, σ], N×C×2, in at least float32.

    The unbiased variance is Σ(x − μ)² / (HW − 1), with HW − 1 taken as 1 for a 1×1 map. HW is counted as a
    tensor, not read as a Python int, so that torch.export and tracing keep the formula for every map size
    (and fx-wrapped: symbolic tracing cannot count)."""
    flat = x.flatten(2).to(stat_dtype(x))
    var, mean = torch.var_mean(flat, dim=2, correction=0)
    n = torch.ones_like(flat[0, 0]).sum()
    return torch.stack([mean, (var * (n / (n - 1).clamp_min(1)) + eps).sqrt()], dim=2)


@register("srm")
class SRM(ChannelGateAttention):
    """Style-based Recalibration Module (Lee et al., "SRM", ICCV 2019).

    Official code: https://github.com/hyunjaelee410/style-based-recalibration-module

        t = [μ, σ],  μ = mean_HW(x),  σ = sqrt(Var_HW(x) + ε)   (unbiased variance, ε = 1e-5)
        g = σ(BN(w_μ μ + w_σ σ))                                 (channel-wise FC: a C×2 weight, no bias)
        y = x · g

    The channel-wise FC is zero-initialised, as in the official code. The released training script
    excludes SRM's own parameters (the FC and its BN) from weight decay; `no_weight_decay()` names them.
    A 1×1 map has no unbiased variance; there the biased one (0) is used.

    Args:
        channels: C.
        eps: ε inside the square root.
        gate: the gating function.
    """

    fused_forward_pays = True  # the reference forward takes a variance and a mean, then the product

    batchnorm_views = (((), 1),)  # BatchNorm over the per-sample style integration

    gate_name = "channel"

    def __init__(self, channels: int, *, eps: float = 1e-5, gate: str | type[nn.Module] = "sigmoid") -> None:
        super().__init__(channels)
        owner = type(self).__name__
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
            raise ValueError(f"{owner}: `eps` must be a number in [0, 1] (the paper's is 1e-5), got {eps!r}.")
        self.eps = float(eps)
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.register_parameter("bias", None)  # set by fold_batchnorm()
        self.bn: nn.Module = nn.BatchNorm2d(channels)
        self.gate = make_gate(owner, gate)

    def excitation(self, x: Tensor) -> Tensor:
        """The channel weights g, N×C×1×1."""
        return self.excite(style_pool(x, self.eps))

    def excite(self, t: Tensor) -> Tensor:
        """g, N×C×1×1, from the style t, N×C×2."""
        with gate_math(t):
            z = (t.to(self.cfc.dtype) * self.cfc).sum(2)
            if self.bias is not None:
                z = z + self.bias
            return self.gate(self.bn(z[:, :, None, None]))

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the eval-mode BN into the channel-wise FC (the paper's note on inference cost):
        BN(w·t) = (s·w)·t + (β − s·μ) with s = γ / sqrt(σ² + ε); the BN becomes the identity."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        self.cfc.mul_(scale[:, None])
        self.bias = nn.Parameter(shift.to(self.cfc.dtype))
        self.bn = nn.Identity()

    def _excite_stacked(self, mean: Tensor, std: Tensor) -> Tensor:
        """g, N×C, from μ and σ, N×C each, as excite() computes it from the style t = [μ, σ]."""
        return self.excite(torch.stack([mean, std], dim=2)).flatten(1)

    def _excite_rows(self, mean: Tensor, std: Tensor) -> Tensor:
        """g, N×C, from μ and σ, N×C each: excite() with the channel-wise FC as w_μ μ + w_σ σ."""
        with autocast_off(mean):
            w = self.cfc
            z = mean.to(w.dtype) * w[:, 0] + std.to(w.dtype) * w[:, 1]
            if self.bias is not None:
                z = z + self.bias
            return self.gate(self.bn(z[:, :, None, None])).flatten(1)

    def _fused_gate(self, x: Tensor, fast: bool) -> tuple[Callable[[Tensor, Tensor], Tensor], bool]:
        """The gate from (mean, M2), σ from M2 as style_pool takes it: HW − 1 taken as 1 for a 1×1 map."""
        hw = x.shape[2] * x.shape[3]
        excite = self._excite_rows if fast else self._excite_stacked
        return (lambda mean, m2: excite(mean, (m2 / max(hw - 1, 1) + self.eps).sqrt())), True

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x)
        if backend is not None:
            return channel_gate(backend, x, *self._fused_gate(x, fast))
        if fast:
            hw = x.shape[2] * x.shape[3]
            var, mean = torch.var_mean(x.to(stat_dtype(x)), (2, 3), correction=1 if hw > 1 else 0)
            return x * self._excite_rows(mean, (var + self.eps).sqrt()).to(x.dtype).view(*x.shape[:2], 1, 1)
        return x * self.excitation(x).to(x.dtype)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the SRM paper trains without weight decay."""
        return {name for name, _ in self.named_parameters()}
