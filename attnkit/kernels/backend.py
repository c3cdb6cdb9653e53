"""The interface every backend implements: the primitives the fused paths (functions.py) are built from.

reference.py states each primitive as plain torch ops, the specification; cpu.py and triton.py implement the same
functions with the same parameters (tests/kernels/test_backend.py checks all three against this Protocol). A new
backend is a module with these functions, plus `unavailable()` saying why it cannot run (None when it can).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

Pools = tuple[tuple[Tensor, Tensor, Tensor], ...]


class GateWeights(NamedTuple):
    """A gate network as a backend's whole-module kernel takes it (cpu.channel_gate_module): SE's, kind 'mlp',
    gate(W₂ act(W₁ s + b₁) + b₂) with the 1×1 convolutions' weights ([Hd, C, 1, 1], [C, Hd, 1, 1]) and biases (or
    None); or ECA's, kind 'windows', gate(conv1d_k(s)) across the channels, w1 the kernel [1, 1, k]. The activation and
    the gate by their module classes (those of cpu.ACTS, cpu.GATES)."""

    kind: str
    w1: Tensor
    b1: Tensor | None = None
    w2: Tensor | None = None
    b2: Tensor | None = None
    act: type[nn.Module] = nn.ReLU
    gate: type[nn.Module] = nn.Sigmoid

    @property
    def weights(self) -> tuple[Tensor | None, ...]:
        return self.w1, self.b1, self.w2, self.b2


class Backend(Protocol):
    """The primitives, as reference.py specifies them (shapes in brackets; x, dy: N×C×H×W)."""

    # one gate per channel: SE, ECA, SRM, Gather-Excite, GCT, FcaNet
    def pool_hw(self, x: Tensor, with_m2: bool) -> tuple[Tensor, Tensor | None]: ...  # mean [N, C] (and M2)
    def scale_c(self, x: Tensor, g: Tensor) -> Tensor: ...  # x·g[n, c]
    def dot_hw(self, dy: Tensor, x: Tensor) -> Tensor: ...  # Σ_hw dy·x [N, C]
    def scale_c_add(self, x: Tensor, g: Tensor, r: Tensor, relu: bool) -> Tensor: ...  # + r, ReLU
    def dot_hw_relu(self, dy: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]: ...  # Σ dy·[y>0]·x, dy·[y>0]
    def grad_c(self, dy: Tensor, g: Tensor, a: Tensor, x: Tensor | None = None, b: Tensor | None = None,
               m: Tensor | None = None) -> Tensor: ...
    def pool_abs_hw(self, x: Tensor) -> Tensor: ...  # mean of |x| [N, C] (GCT 'l1')
    def grad_c_sign(self, dy: Tensor, g: Tensor, a: Tensor, x: Tensor) -> Tensor: ...  # dy·g + a·sign(x)
    def pool_k(self, x: Tensor, k: Tensor) -> Tensor: ...  # Σ_hw x·k[c, h, w] [N, C]
    def grad_k(self, dy: Tensor, g: Tensor, a: Tensor, x: Tensor, k: Tensor, with_dx: bool,
               with_dk: bool) -> tuple[Tensor | None, Tensor | None]: ...

    # Coordinate Attention: a gate per row and one per column
    def pool_h_w(self, x: Tensor) -> Tensor: ...  # [N, C, H + W]: means over W of the rows, then over H
    def scale_hw(self, x: Tensor, ah: Tensor, aw: Tensor) -> Tensor: ...
    def scale_hw_add(self, x: Tensor, ah: Tensor, aw: Tensor, r: Tensor, relu: bool) -> Tensor: ...  # + r, ReLU
    def dot_h_w(self, dy: Tensor, x: Tensor, ah: Tensor, aw: Tensor) -> tuple[Tensor, Tensor]: ...
    def grad_hw(self, dy: Tensor, ah: Tensor, aw: Tensor, bh: Tensor, bw: Tensor) -> Tensor: ...

    # CBAM: a channel gate, then a spatial gate pooled from the channel-gated map
    def pool_hw_avgmax(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...
    def pool_c_gated(self, x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...
    def scale_cs(self, x: Tensor, mc: Tensor, ms: Tensor) -> Tensor: ...
    def scale_cs_add(self, x: Tensor, mc: Tensor, ms: Tensor, r: Tensor, relu: bool) -> Tensor: ...  # + r, ReLU
    def dot_cs(self, dy: Tensor, x: Tensor, mc: Tensor, ms: Tensor) -> tuple[Tensor, Tensor]: ...
    def dot_x_s(self, x: Tensor, u: Tensor, v: Tensor, argc: Tensor) -> Tensor: ...
    def grad_cs(self, dy: Tensor, mc: Tensor, ms: Tensor, u: Tensor, v: Tensor, argc: Tensor, a: Tensor, b: Tensor,
                arghw: Tensor) -> Tensor: ...

    # Triplet Attention: Z-pools over H, W and C; the mean of three gates
    def zpool3(self, x: Tensor, spatial: bool) -> Pools: ...
    def scale_mean3(self, x: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None) -> Tensor: ...
    def dot3(self, dy: Tensor, x: Tensor, spatial: bool) -> tuple[Tensor, ...]: ...
    def grad_mean3(self, dy: Tensor, a_cw: Tensor, a_hc: Tensor, a_hw: Tensor | None, pools: Pools) -> Tensor: ...

    # SimAM: an elementwise gate σ((x − m)² / q + ½) from per-channel statistics m, q
    def scale_energy(self, x: Tensor, m: Tensor, q: Tensor) -> Tensor: ...
    def dot_energy(self, dy: Tensor, x: Tensor, m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]: ...
    def grad_energy(self, dy: Tensor, x: Tensor, m: Tensor, q: Tensor, a: Tensor, b: Tensor) -> Tensor: ...

    # scSE: a channel gate s [N, C] and a spatial gate q [N, H, W] from Σ_c w·x, combined by 'max', 'add' or 'mul'
    def pool_c_weighted(self, x: Tensor, w: Tensor) -> Tensor: ...
    def scale_pair(self, x: Tensor, s: Tensor, q: Tensor, combine: str) -> Tensor: ...
    def dot_pair(self, dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str) -> tuple[Tensor, Tensor]: ...
    def grad_pair(self, dy: Tensor, x: Tensor, s: Tensor, q: Tensor, combine: str, a: Tensor, w: Tensor,
                  dz: Tensor) -> Tensor: ...

    # SGE: a gate per group and position ([N, G, H, W]) from Σ over the group's channels of m[n, c]·x
    def pool_groups(self, x: Tensor, m: Tensor, groups: int) -> Tensor: ...
    def scale_groups(self, x: Tensor, a: Tensor) -> Tensor: ...
    def dot_groups(self, dy: Tensor, x: Tensor, groups: int) -> Tensor: ...
    def dot_x_groups(self, x: Tensor, u: Tensor) -> Tensor: ...
    def grad_groups(self, dy: Tensor, a: Tensor, m: Tensor, u: Tensor, b: Tensor) -> Tensor: ...

    # Shuffle Attention: a gate σ(α·(x − m) + β) per element, per-channel α, β, m; output channels permuted
    def scale_affine(self, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, perm: Tensor) -> Tensor: ...
    def dot_affine(self, dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor,
                   perm: Tensor) -> tuple[Tensor, Tensor]: ...
    def grad_affine(self, dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor, a: Tensor, b: Tensor,
                    perm: Tensor) -> Tensor: ...


PRIMITIVES = tuple(name for name in vars(Backend) if not name.startswith("_"))


def in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """t in the memory layout of x (contiguous NCHW or channels_last, as the backends serve), for the kernels that
    read both with x's strides: a residual, an incoming gradient."""
    return t.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last)
