"""Gated Channel Transformation."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..kernels.functions import abs_channel_gate, channel_gate
from ..registry import register
from ._common import gate_math, gate_path, one_of, stat_dtype
from .base import AttentionModule, Probe

MODES = ("l2", "l1")


@register("gct")
class GatedChannelTransformation(AttentionModule):
    """Gated Channel Transformation (Yang et al., "Gated Channel Transformation for Visual Recognition", CVPR 2020).

    Official code: https://github.com/z-x-yang/GCT (PyTorch/GCT.py; TensorFlow/convnet_builder.py)

        s_c = α_c · sqrt(Σ_hw x_c² + ε)                  (global context embedding, mode 'l2')
        ŝ_c = γ_c · s_c / sqrt(mean_c s² + ε)            (channel normalization)
        y   = x · (1 + tanh(ŝ + β))                      (gating adaptation)

    Mode 'l1' embeds s_c = α_c · Σ_hw |x_c| (Σ x_c with `after_relu`, for inputs known to be non-negative) and
    normalizes by mean_c |s| + ε. α, γ, β start at 1, 0, 0 (the official code's and the paper's), so the module
    starts as the identity. They keep the official (1, C, 1, 1) shapes, so that the trainer's rule "no weight decay
    for 1-D parameters" leaves them alone: the paper trains α and γ with weight decay and β without
    (`no_weight_decay()` names β; `beta_weight_decay=True` decays it too, which the released TensorFlow README
    reports slightly better on ResNet-50).

    Args:
        channels: C.
        mode: 'l2' (the paper's) or 'l1'.
        eps: ε.
        after_relu: with mode 'l1', skip the absolute value (the input is non-negative).
        beta_weight_decay: leave β under weight decay.
    """

    placement = "before_conv"  # attach(): on the input of every convolution, as the paper's and the official networks
    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "l2",
        eps: float = 1e-5,
        after_relu: bool = False,
        beta_weight_decay: bool = False,
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.mode = one_of(owner, "mode", mode, MODES)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
            raise ValueError(f"{owner}: `eps` must be a number in (0, 1] (the paper's is 1e-5), got {eps!r}.")
        if after_relu and self.mode != "l1":
            raise ValueError(f"{owner}: `after_relu` only changes mode 'l1' (it drops the absolute value); got mode "
                             f"{self.mode!r}.")
        self.eps = float(eps)
        self.after_relu = bool(after_relu)
        self.beta_weight_decay = bool(beta_weight_decay)
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gate = nn.Tanh()

    def embedding(self, x: Tensor) -> Tensor:
        """Σ_hw x² (mode 'l2') or Σ_hw |x| (Σ_hw x after ReLU), N×C×1×1, in at least float32."""
        xs = x.to(stat_dtype(x))
        if self.mode == "l2":
            return xs.square().sum((2, 3), keepdim=True)
        return (xs if self.after_relu else xs.abs()).sum((2, 3), keepdim=True)

    def excitation(self, x: Tensor) -> Tensor:
        """The channel weights 1 + tanh(ŝ + β), N×C×1×1, computed in at least float32 (also in a float16 module: a sum
        of squares over the map leaves float16's range for activations of a few dozen)."""
        return self.excite(self.embedding(x))

    def excite(self, pooled: Tensor) -> Tensor:
        """1 + tanh(ŝ + β), N×C×1×1, from the embedding (N×C×1×1, at least float32)."""
        with gate_math(pooled):
            dtype = torch.promote_types(self.alpha.dtype, pooled.dtype)
            alpha, gamma, beta = (p.to(dtype) for p in (self.alpha, self.gamma, self.beta))
            if self.mode == "l2":
                s = (pooled + self.eps).sqrt() * alpha
                normalized = s * (gamma / (s.square().mean(1, keepdim=True) + self.eps).sqrt())
            else:
                s = pooled * alpha
                normalized = s * (gamma / (s.abs().mean(1, keepdim=True) + self.eps))
            return 1 + self.gate(normalized + beta)

    def gate_probes(self) -> list[Probe]:
        """1 + tanh(ŝ + β) as "channel", N×C×1×1."""
        return [(self.gate, "channel", lambda inputs, out: 1 + out)]

    def no_weight_decay(self) -> set[str]:
        """β, which the paper trains without weight decay (unless `beta_weight_decay`)."""
        return set() if self.beta_weight_decay else {"beta"}

    def _excite_pooled(self, hw: int, mean: Tensor, m2: Tensor | None = None) -> Tensor:
        """The gate, N×C, from the fused pass's mean (of x, or of |x|) and, for mode 'l2', the sum of squared
        deviations M2 over the hw positions: Σ x² = M2 + hw·mean², Σ x = hw·mean."""
        pooled = hw * mean if m2 is None else m2 + hw * mean.square()
        return self.excite(pooled[:, :, None, None]).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, _ = gate_path(self, x)
        if backend is not None:
            gate = functools.partial(self._excite_pooled, x.shape[2] * x.shape[3])
            if self.mode == "l1" and not self.after_relu:
                return abs_channel_gate(backend, x, gate)
            return channel_gate(backend, x, gate, with_m2=self.mode == "l2")
        return x * self.excitation(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}"
