"""Normalization-based Attention Module."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register
from ._common import gate_math, make_gate, positive_int
from .base import AttentionModule, Probe, output


@torch.fx.wrap
def check_pixel_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """NAM's pixel normalisation has one BatchNorm feature per position: the map must have the size it was built for."""
    if tuple(x.shape[2:]) != size:
        raise ValueError(
            f"NAM with the spatial (pixel-normalisation) submodule was built for {size[0]}×{size[1]} maps (one "
            f"BatchNorm feature per position), got {x.shape[2]}×{x.shape[3]}. Build it with "
            f"spatial_size={tuple(x.shape[2:])}, or leave spatial_size=None for the channel submodule alone."
        )
    return x


def _map_size(owner: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{owner}: `spatial_size` must be the (H, W) of the maps the spatial submodule takes (or None), "
                        f"got {value!r}.")
    return positive_int(owner, "spatial_size", value[0]), positive_int(owner, "spatial_size", value[1])


def _scale_weights(scale: Tensor, detach: bool, absolute: bool) -> Tensor:
    """w = |γ| / Σ|γ| (or γ / Σγ), detached from γ's gradient with `detach`."""
    if detach:
        scale = scale.detach()
    if absolute:
        scale = scale.abs()
    return scale / scale.sum()


@register("nam")
class NAM(AttentionModule):
    """Normalization-based Attention Module (Liu et al., "NAM: Normalization-based Attention Module", NeurIPS 2021
    Workshop ImageNet PPF).

    Official code: https://github.com/Christian-lyc/NAM (MODELS/attention.py)

        Mc = σ(w_γ ⊙ BN(x)),  w_γ = |γ| / Σ_j |γ_j|     γ: the BN's scale, one per channel
        y  = x · Mc

    The BN's scales measure how much each channel varies, and their share weighs its normalised response. The official
    code reads w_γ from `.data`, so no gradient flows through the weights (`detach_weights=True`), and takes |γ|
    (`abs_weights=True`); the paper's eq. 2 writes γ_i / Σγ_j with neither (`detach_weights=False, abs_weights=False`).
    The released module is the channel submodule alone (the default). The paper's spatial submodule, which the first
    release had, follows with `spatial_size=(H, W)`: a BatchNorm with one feature per position, normalising each
    position over N×C, and Ms = σ(w_λ ⊙ BN_s(y)), w_λ = |λ| / Σ|λ| over its H·W scales; it takes maps of that size only.

    The paper trains with an L1 penalty p·Σ|γ| (p = 1e-4, the official `--s`) added to the loss: `sparsity_penalty()`
    returns Σ|γ| (and Σ|λ|) for it. `attnkit.fuse` folds the BatchNorms into per-channel (per-position) affine maps.
    The official ResNets put NAM after each block's last BN, before the residual addition; they re-initialise its BN
    to γ = 1, β = 0, as PyTorch does.

    Args:
        channels: C.
        spatial_size: (H, W) for the spatial submodule; None: the channel submodule alone (released code).
        detach_weights: no gradient through w_γ (released code), or through it (paper).
        abs_weights: |γ| / Σ|γ| (released code), or γ / Σγ (paper).
        gate: the gating function.
    """

    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        *,
        spatial_size: int | tuple[int, int] | None = None,
        detach_weights: bool = True,
        abs_weights: bool = True,
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.detach_weights, self.abs_weights = bool(detach_weights), bool(abs_weights)
        self.bn: nn.Module = nn.BatchNorm2d(channels)
        self.channel_gate = make_gate(owner, gate)
        self.spatial_size: tuple[int, int] | None = None
        self.pixel_bn: nn.Module | None = None
        self.spatial_gate: nn.Module | None = None
        views: list = [((2, 3), 1)]  # the channel BN sees N·H·W values per channel
        if spatial_size is not None:
            self.spatial_size = _map_size(owner, spatial_size)
            self.pixel_bn = nn.BatchNorm1d(self.spatial_size[0] * self.spatial_size[1])
            self.spatial_gate = make_gate(owner, gate)
            views.append(((1,), 1))  # the pixel BN sees N·C values per position
        self.batchnorm_views = tuple(views)
        # the BatchNorms folded into affine maps by fold_batchnorm(): w ⊙ BN(v) = scale·v + shift
        self.register_buffer("channel_scale", None)
        self.register_buffer("channel_shift", None)
        self.register_buffer("pixel_scale", None)
        self.register_buffer("pixel_shift", None)

    def channel_logits(self, x: Tensor) -> Tensor:
        """w_γ ⊙ BN(x), N×C×H×W."""
        if self.channel_scale is not None:
            return x * self.channel_scale + self.channel_shift
        w = _scale_weights(self.bn.weight, self.detach_weights, self.abs_weights)
        return self.bn(x) * w[:, None, None]

    def pixel_logits(self, y: Tensor) -> Tensor:
        """w_λ ⊙ BN_s(y), N×C×H×W, BN_s normalising each position over N×C."""
        if self.pixel_scale is not None:
            return y * self.pixel_scale + self.pixel_shift
        w = _scale_weights(self.pixel_bn.weight, self.detach_weights, self.abs_weights)
        return (self.pixel_bn(y.flatten(2).transpose(1, 2)) * w[:, None]).transpose(1, 2).reshape(y.shape)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        if self.spatial_size is not None:
            x = check_pixel_size(x, self.spatial_size)
        dtype = self.bn.weight.dtype if isinstance(self.bn, nn.BatchNorm2d) else self.channel_scale.dtype
        with gate_math(x):
            y = x * self.channel_gate(self.channel_logits(x.to(dtype))).to(x.dtype)
            if self.spatial_gate is not None:
                y = y * self.spatial_gate(self.pixel_logits(y.to(dtype))).to(x.dtype)
        return y

    def gate_probes(self) -> list[Probe]:
        """Mc as "channel" and, with the spatial submodule, Ms as "spatial" (each N×C×H×W)."""
        spatial = [] if self.spatial_gate is None else [(self.spatial_gate, "spatial", output)]
        return [(self.channel_gate, "channel", output), *spatial]

    def sparsity_penalty(self) -> Tensor:
        """Σ|γ| (+ Σ|λ| with the spatial submodule): the paper's L1 term, added to the loss times p = 1e-4."""
        penalty = self.bn.weight.abs().sum()
        return penalty + self.pixel_bn.weight.abs().sum() if self.pixel_bn is not None else penalty

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the eval-mode BatchNorms and their weights into affine maps: w ⊙ BN(v) = (w·s)·v + w·(β − s·μ) with
        s = γ / sqrt(σ² + ε), stored as buffers; the BatchNorms become the identity."""
        def folded(bn: nn.Module) -> tuple[Tensor, Tensor]:
            w = _scale_weights(bn.weight, True, self.abs_weights)
            s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            return w * s, w * (bn.bias - bn.running_mean * s)

        if isinstance(self.bn, nn.BatchNorm2d):
            scale, shift = folded(self.bn)
            self.channel_scale, self.channel_shift = scale[:, None, None], shift[:, None, None]
            self.bn = nn.Identity()
        if isinstance(self.pixel_bn, nn.BatchNorm1d):
            scale, shift = folded(self.pixel_bn)
            h, w = self.spatial_size
            self.pixel_scale, self.pixel_shift = scale.view(1, h, w), shift.view(1, h, w)
            self.pixel_bn = nn.Identity()

    @property
    def fixed_spatial_size(self) -> tuple[int, int] | None:
        """With the spatial submodule, the one map size its pixel BatchNorm takes."""
        return self.spatial_size

    def extra_repr(self) -> str:
        spatial = f", spatial_size={self.spatial_size}" if self.spatial_size else ""
        return f"channels={self.channels}{spatial}"
