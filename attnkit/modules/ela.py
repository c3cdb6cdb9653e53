"""Efficient Local Attention."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register
from ._common import dividing, gate_math, make_activation, make_gate, odd_kernel, one_of, stat_dtype
from .base import Probe, RowColumnAttention

# The paper's four versions: (kernel size, d for a convolution in C/d groups, GroupNorm groups)
VARIANTS = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


def group_norm(norm: nn.GroupNorm, z: Tensor) -> Tensor:
    """`norm` applied to z. Where a group holds a single value (a 1×1 map with one channel per group) this gives the
    shift β, (z − mean) being 0, where nn.GroupNorm refuses the input."""
    return torch.group_norm(z, norm.num_groups, norm.weight, norm.bias, norm.eps, torch.backends.cudnn.enabled)


@register("ela")
class EfficientLocalAttention(RowColumnAttention):
    """Efficient Local Attention (Xu and Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
    arXiv:2403.01123, 2024).

    Official code: the PyTorch listing in the paper (there is no repository of the authors'); timm
    (https://github.com/huggingface/pytorch-image-models, layers/coord_attn.py: EfficientLocalAttn) has a variant.

        zʰ = mean_W(x) (N×C×H),   zʷ = mean_H(x) (N×C×W)
        aʰ = σ(GN(conv1d_k(zʰ))),  aʷ = σ(GN(conv1d_k(zʷ)))      (one convolution and one GroupNorm for both)
        y  = x · aʰ · aʷ

    The 1-D convolution (no bias) keeps the C channels, grouped; the versions of the paper set k, the convolution's
    groups and the GroupNorm's groups: T (5, C, 32), B (7, C, 16), S (5, C/8, 16), L (7, C/8, 16). The paper gives
    no single default; B (a depthwise 7-tap convolution, 16 norm groups) is this module's, and `kernel_size`,
    `conv_groups`, `norm_groups` override a version's numbers. timm's EfficientLocalAttn is
    `shared=False, norm_groups=1, act='silu'`: a convolution and a GroupNorm per direction, then SiLU.

    Args:
        channels: C.
        kernel_size: k (odd); default the version's.
        variant: 'T', 'B', 'S' or 'L'.
        conv_groups: the convolution's groups (dividing C); default the version's (C, or C/8).
        norm_groups: the GroupNorm's groups (dividing C); default the version's.
        shared: one convolution and GroupNorm for both directions (the paper's), else one per direction.
        bias: a bias on the convolution(s).
        act: an activation between the GroupNorm and the gate ('identity': the paper's).
        gate: the gating function.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        *,
        variant: str = "B",
        conv_groups: int | None = None,
        norm_groups: int | None = None,
        shared: bool = True,
        bias: bool = False,
        act: str | type[nn.Module] = "identity",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.variant = one_of(owner, "variant", variant, tuple(VARIANTS))
        k, divisor, groups = VARIANTS[self.variant]
        self.kernel_size = odd_kernel(owner, "kernel_size", k if kernel_size is None else kernel_size)
        if conv_groups is None:
            if channels < divisor:
                raise ValueError(f"{owner}: variant {self.variant!r} groups its convolution in C/{divisor} groups, "
                                 f"which needs at least {divisor} channels, got {channels}; pass conv_groups.")
            conv_groups = channels // divisor
        conv_groups = dividing(owner, "conv_groups", conv_groups, channels)
        norm_groups = dividing(owner, "norm_groups", groups if norm_groups is None else norm_groups, channels)
        self.shared = bool(shared)

        def strip() -> tuple[nn.Conv1d, nn.GroupNorm]:
            conv = nn.Conv1d(channels, channels, self.kernel_size, padding=self.kernel_size // 2, groups=conv_groups,
                             bias=bool(bias))
            return conv, nn.GroupNorm(norm_groups, channels)

        if self.shared:  # named as the paper's listing
            self.conv, self.norm = strip()
        else:  # named as timm's
            self.conv_h, self.norm_h = strip()
            self.conv_w, self.norm_w = strip()
        self.act = make_activation(owner, act)
        self.gate_h = make_gate(owner, gate)
        self.gate_w = make_gate(owner, gate)

    def attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(aʰ, aʷ): N×C×H×1 and N×C×1×W, in the parameters' dtype."""
        dtype = stat_dtype(x)
        z_h, z_w = x.mean(3, dtype=dtype), x.mean(2, dtype=dtype)
        (conv_h, norm_h), (conv_w, norm_w) = self.strips()
        with gate_math(x):
            a_h = self.gate_h(self.act(group_norm(norm_h, conv_h(z_h.to(conv_h.weight.dtype)))))
            a_w = self.gate_w(self.act(group_norm(norm_w, conv_w(z_w.to(conv_w.weight.dtype)))))
            return a_h.unsqueeze(3), a_w.unsqueeze(2)

    def strips(self) -> tuple[tuple[nn.Conv1d, nn.GroupNorm], tuple[nn.Conv1d, nn.GroupNorm]]:
        """(convolution, GroupNorm) along H, then along W (the same pair when shared)."""
        if self.shared:
            return (self.conv, self.norm), (self.conv, self.norm)
        return (self.conv_h, self.norm_h), (self.conv_w, self.norm_w)

    def gate_probes(self) -> list[Probe]:
        """aʰ as "a_h" (N×C×H×1) and aʷ as "a_w" (N×C×1×W)."""
        return [(self.gate_h, "a_h", lambda inputs, out: out.unsqueeze(3)),
                (self.gate_w, "a_w", lambda inputs, out: out.unsqueeze(2))]

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        a_h, a_w = self.attention(x)
        return x * a_h.to(x.dtype) * a_w.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, variant={self.variant!r}, kernel_size={self.kernel_size}"
