"""Non-local block."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from . import _common
from ._common import gate_math, one_of, reduced_width, stat_dtype
from .base import AttentionModule, Probe, output

PAIRWISE = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
SUBSAMPLE = ("before", "after", "none")
INIT_STD = 0.01  # the official convolutions' Gaussian initialisation


@torch.fx.wrap
def subsample(x: Tensor) -> Tensor:
    """2×2 max pooling with stride 2 (floor), as the official code's; a side of length 1 is left as it is (the
    official code fails there). Wrapped for torch.fx, which cannot read a Proxy's size."""
    kernel = (2 if x.shape[2] > 1 else 1, 2 if x.shape[3] > 1 else 1)
    return F.max_pool2d(x, kernel, kernel)


class Pairwise(nn.Module):
    """y_i = Σ_j f(θ_i, φ_j) g_j / C(x) over the positions j of φ and g, in at least float32.

    embedded_gaussian: softmax_j(s·θ_iᵀφ_j);  gaussian: the same with θ = x, φ = x̂ (no embedding);
    dot_product: θ_iᵀφ_j / N;  concatenation: ReLU(w_θᵀθ_i + w_φᵀφ_j) / N   (N: the number of positions j).
    s is the scale of the softmax logits (1/√d, or 1 as in the paper).
    """

    def __init__(self, kind: str, scale: float, inner: int) -> None:
        super().__init__()
        self.kind, self.scale = kind, scale
        # concatenation's w_f = [w_θ; w_φ], a 1×1 convolution of [θ; φ] to one channel without bias
        self.concat_project = nn.Conv2d(2 * inner, 1, 1, bias=False) if kind == "concatenation" else None
        if self.concat_project is not None:
            nn.init.normal_(self.concat_project.weight, std=INIT_STD)

    def weights(self, theta: Tensor, phi: Tensor) -> Tensor:
        """f(θ_i, φ_j) / C(x), N × (H·W) × (h·w), in at least float32."""
        dtype = stat_dtype(theta)
        t, p = theta.flatten(2).to(dtype), phi.flatten(2).to(dtype)
        if self.kind == "concatenation":
            w = self.concat_project.weight.flatten().to(dtype)
            a = torch.einsum("c,ncl->nl", w[: t.shape[1]], t)
            b = torch.einsum("c,ncl->nl", w[t.shape[1]:], p)
            return torch.relu(a[:, :, None] + b[:, None, :]) / p.shape[2]
        logits = torch.bmm(t.transpose(1, 2), p)
        if self.kind == "dot_product":
            return logits / p.shape[2]
        return (logits * self.scale).softmax(2)

    def forward(self, theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
        v = g.flatten(2).to(stat_dtype(g))
        if self.kind == "dot_product":  # (g φᵀ) θ / N: the same sum, without the (H·W) × (h·w) matrix
            t, p = theta.flatten(2).to(v.dtype), phi.flatten(2).to(v.dtype)
            y = torch.bmm(torch.bmm(v, p.transpose(1, 2)), t) / p.shape[2]
        else:
            y = torch.bmm(v, self.weights(theta, phi).transpose(1, 2))
        return y.view(g.shape[0], g.shape[1], theta.shape[2], theta.shape[3])


@register("nonlocal")
class NonLocal(AttentionModule):
    """Non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018).

    Official code: https://github.com/facebookresearch/video-nonlocal-net (lib/models/nonlocal_helper.py, Caffe2);
    a faithful PyTorch port: https://github.com/AlexHex7/Non-local_pytorch

        y_i = (1 / C(x)) Σ_j f(x_i, x̂_j) g(x̂_j),   z = x + BN(W_z y)
        f = exp(s·θ(x_i)ᵀφ(x̂_j)), C(x) = Σ_j f      (embedded Gaussian: a softmax over j)

    θ, φ, g and W_z are 1×1 convolutions with biases (C → C/2 → C); x̂ is x max-pooled 2×2 (the subsampling trick).
    The paper's other pairwise functions are options: 'gaussian' (θ, φ the identity), 'dot_product' (f = θᵀφ,
    C(x) = N, the number of positions j) and 'concatenation' (f = ReLU(w_fᵀ[θ_i; φ_j]), C(x) = N).

    The paper and the official code differ in two places, and the code is the default: the code scales the logits by
    s = 1/√(C/2) (`scale=True`; the paper's f has none: `scale=False`; a number sets s, as timm's C^-1/2), and pools x
    before φ and g (`subsample='before'`; the paper's Fig. 2 pools after them: 'after'; 'none' does not pool). As in
    the official code the convolutions start from N(0, 0.01²) with zero biases and the BN's scale from 0, so the block
    starts as the identity; without the BN (`norm=False`) W_z starts at zero instead (the code's USE_ZERO_INIT_CONV).

    A block goes after whole residual blocks, after every other block of a ResNet's res3 and res4 (stages 2 and 3):
    the paper's 5-block ResNet-50, as the official code builds it.

    Args:
        channels: C.
        reduction: C / inner width (2); hidden_channels: the inner width itself.
        pairwise: f, one of 'embedded_gaussian', 'gaussian', 'dot_product', 'concatenation'.
        subsample: 'before' (code), 'after' (paper) or 'none'.
        scale: True (1/√d), False (1) or the scale itself (in (0, 1]), for the softmax of the Gaussian forms.
        norm: BN after W_z.
        bias: biases on the 1×1 convolutions.
    """

    default_position = "output"
    default_stages = (2, 3)
    default_every = 2
    gate_name = "attention"

    def __init__(
        self,
        channels: int,
        reduction: float = 2,
        *,
        pairwise: str = "embedded_gaussian",
        subsample: str = "before",
        scale: bool | float = True,
        norm: bool = True,
        hidden_channels: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.pairwise = one_of(owner, "pairwise", pairwise, PAIRWISE)
        self.subsample = one_of(owner, "subsample", subsample, SUBSAMPLE)
        inner = reduced_width(owner, channels, reduction, hidden_channels)
        if isinstance(scale, bool):  # 1/√d, d the length of the vectors θ_i, φ_j
            scale = 1 / math.sqrt(channels if self.pairwise == "gaussian" else inner) if scale else 1.0
        elif not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ValueError(f"{owner}: `scale` must be True (1/√d), False (1) or a number in (0, 1], got {scale!r}.")
        bias = bool(bias)

        def conv(cin: int, cout: int) -> nn.Conv2d:
            layer = nn.Conv2d(cin, cout, 1, bias=bias)
            nn.init.normal_(layer.weight, std=INIT_STD)
            if bias:
                nn.init.zeros_(layer.bias)
            return layer

        embedded = self.pairwise != "gaussian"
        self.theta = conv(channels, inner) if embedded else None
        self.phi = conv(channels, inner) if embedded else None
        self.g = conv(channels, inner)
        self.attend = Pairwise(self.pairwise, float(scale), inner)
        self.w_z = conv(inner, channels)
        self.norm: nn.Module = nn.BatchNorm2d(channels) if norm else nn.Identity()
        if norm:
            nn.init.zeros_(self.norm.weight)
            self.batchnorm_views = (((2, 3), 1),)
        else:
            nn.init.zeros_(self.w_z.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        with gate_math(x):
            xs = x.to(self.g.weight.dtype).contiguous()  # the products flatten H×W: channels_last would be copied
            pooled = subsample(xs) if self.subsample == "before" else xs
            theta = xs if self.theta is None else self.theta(xs)
            phi = pooled if self.phi is None else self.phi(pooled)
            g = self.g(pooled)
            if self.subsample == "after":
                phi, g = subsample(phi), subsample(g)
            y = self.attend(theta, phi, g).to(xs.dtype)
            z = self.norm(self.w_z(y))
        return _common.in_format_of(x + z.to(x.dtype), x)  # through the module: fx-wrapped

    def gate_probes(self) -> list[Probe]:
        """"attention": the weights f(x_i, x̂_j)/C(x) that each position j of x̂ receives, averaged over the positions
        i of x, N×1×h×w (h×w: x̂'s size); "response": BN(W_z y), which the block adds to x, N×C×H×W."""
        def attention(inputs: tuple, out: Tensor) -> Tensor:
            theta, phi, _ = inputs
            return self.attend.weights(theta, phi).mean(1).view(phi.shape[0], 1, phi.shape[2], phi.shape[3])

        return [(self.attend, "attention", attention), (self.norm, "response", output)]

    def channel_weights_unavailable(self) -> str | None:
        return "it adds a response to x instead of scaling its channels: it has no gate per channel"

    def spatial_map(self, gates: Mapping[str, Tensor]) -> tuple[str, Tensor]:
        """The attention each position of x̂ receives, averaged over the positions of x."""
        return "attention", gates["attention"].float()[:, 0]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pairwise={self.pairwise!r}, subsample={self.subsample!r}"
