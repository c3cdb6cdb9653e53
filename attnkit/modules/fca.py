"""Frequency Channel Attention (FcaNet)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.functions import gathered_channel_gate
from ..registry import register
from ._common import (autocast_off, gate_math, gate_path, make_activation, make_gate, one_of, positive_int,
                      reduced_width, stat_dtype)
from .base import AttentionModule

# The paper's frequency selections in the 7×7 DCT space (u along H, v along W), in the order the official code ranks
# them: 'top' by the single-frequency ablation's accuracy, 'bot' the worst first, 'low' by zig-zag from (0, 0).
SELECTIONS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "top": ((0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1),
            (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3)),
    "bot": ((6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5, 6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6),
            (6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1, 4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3)),
    "low": ((0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4),
            (0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3)),
}
FREQUENCIES = tuple(f"{kind}{n}" for kind in SELECTIONS for n in (1, 2, 4, 8, 16, 32))


def dct_basis(frequencies: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """The orthonormal DCT-II basis on `size` points for each frequency f, F×size: cos(π·f·(p + ½)/L)/√L, times √2
    for f > 0."""
    p = torch.arange(size, device=frequencies.device, dtype=dtype)
    f = frequencies.to(dtype)[:, None]
    scale = torch.where(f > 0, torch.full_like(f, math.sqrt(2)), torch.ones_like(f)) / math.sqrt(size)
    return torch.cos(math.pi * f * (p + 0.5) / size) * scale


def pooling_matrix(size: int, out: int, like: Tensor) -> Tensor:
    """The out×size matrix of adaptive average pooling along one axis, in `like`'s dtype and device: row i averages
    positions [⌊i·size/out⌋, ⌈(i+1)·size/out⌉), torch's windows. Built from tensor operations on `size`, so that
    tracing and export keep it for every map size."""
    i, j = torch.arange(out, device=like.device), torch.arange(size, device=like.device)
    start = torch.div(i * size, out, rounding_mode="floor")[:, None]
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")[:, None]
    return ((j >= start) & (j < end)).to(like.dtype) / (end - start).to(like.dtype)


def _conv1x1(layer: nn.Conv2d, z: Tensor) -> Tensor:
    """`layer` applied to z in z's dtype (its parameters cast to it)."""
    bias = None if layer.bias is None else layer.bias.to(z.dtype)
    return F.conv2d(z, layer.weight.to(z.dtype), bias)


def _linear(layer: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The weight and bias of a 1×1 convolution as F.linear takes them, in `dtype`."""
    return layer.weight.flatten(1).to(dtype), None if layer.bias is None else layer.bias.to(dtype)


@register("fca")
class FrequencyChannelAttention(AttentionModule):
    """Frequency Channel Attention (Qin et al., "FcaNet: Frequency Channel Attention Networks", ICCV 2021).

    Official code: https://github.com/cfzd/FcaNet (model/layer.py: MultiSpectralAttentionLayer)

        Freq_k  = Σ_{i,j} X_k[i, j] · B_{u_k, v_k}[i, j]      (channel part k of C/K channels, k = 1..K)
        s       = σ(W₂ δ(W₁ [Freq_1, …, Freq_K]))               (W₁: C → C/r, δ = ReLU, r = 16, no biases)
        y       = x · s

    B_{u,v} is the 2-D DCT basis of frequency (u, v) on an h×w grid (`dct_size`), the K frequencies a selection of
    the paper's ('top16' by default: the 16 best of the single-frequency ablation, in the 7×7 frequency space, scaled
    by h // 7). K must divide C. A map of another size is first average-pooled to h×w (torch's adaptive windows), as
    the official layer does for sizes it was not built for; pooling and filter combine into one filter on the input's
    grid, computed for each input size. The official FcaNets build each stage's layer for its map size at 224×224
    (dct_size 56, 28, 14, 7) and so never pool there; 7 is this module's default, the frequency space itself.
    The FCs have no biases (official code; FcaNet-50 then has SE-ResNet-50's bias-free count, 28.07M).

    Args:
        channels: C.
        reduction: r; hidden_channels: explicit C/r.
        frequencies: 'top', 'bot' or 'low' followed by K in 1, 2, 4, 8, 16, 32.
        dct_size: h (or (h, w)), a multiple of 7.
        bias: biases on the FCs.
        act, gate: the hidden activation and the gating function.
    """

    gate_name = "channel"

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        frequencies: str = "top16",
        dct_size: int | tuple[int, int] = 7,
        hidden_channels: int | None = None,
        bias: bool = False,
        act: str | type[nn.Module] = "relu",
        gate: str | type[nn.Module] = "sigmoid",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.frequencies = one_of(owner, "frequencies", frequencies, FREQUENCIES)
        count = int(self.frequencies[3:])
        if channels % count:
            fits = [n for n in (32, 16, 8, 4, 2, 1) if channels % n == 0 and n < count]
            raise ValueError(f"{owner}: `frequencies`={self.frequencies!r} gives each of {count} frequencies an equal part "
                             f"of the channels, but {count} does not divide the channel count {channels}; pick a "
                             f"selection of {fits[0]} (e.g. {self.frequencies[:3] + str(fits[0])!r}).")
        self.dct_size = self._size(owner, dct_size)
        kind = SELECTIONS[self.frequencies[:3]]
        # (u, v) per frequency, scaled so that (2, 2) on a 14×14 grid is (1, 1) on the 7×7 one, as in the official code
        index = torch.tensor(list(zip(kind[0][:count], kind[1][:count]))) * torch.tensor([s // 7 for s in self.dct_size])
        self.register_buffer("frequency_index", index, persistent=False)
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bool(bias))
        self.act = make_activation(owner, act)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bool(bias))
        self.gate = make_gate(owner, gate)

    @staticmethod
    def _size(owner: str, value: object) -> tuple[int, int]:
        sides = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not (isinstance(sides, (tuple, list)) and len(sides) == 2):
            raise TypeError(f"{owner}: `dct_size` must be an int or a pair (h, w), multiples of 7, got {value!r}.")
        sides = tuple(positive_int(owner, "dct_size", s) for s in sides)
        if any(s % 7 for s in sides):
            raise ValueError(f"{owner}: `dct_size` must be a multiple of 7 (the paper's frequencies are those of a 7×7 "
                             f"DCT, scaled by size // 7), got {value!r}.")
        return sides

    def dct_filters(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The K DCT filters B_{u_k, v_k} on the dct_size grid, K×h×w."""
        (h, w), (u, v) = self.dct_size, self.frequency_index.unbind(1)
        return dct_basis(u, h, dtype)[:, :, None] * dct_basis(v, w, dtype)[:, None, :]

    def filters(self, x: Tensor) -> Tensor:
        """The K filters on x's H×W grid, K×H×W in at least float32: each DCT filter read through the adaptive
        average pooling to dct_size, Pₕᵀ B P_w (the identity where x has that size)."""
        with gate_math(x):
            basis = self.dct_filters(stat_dtype(x))
            rows = pooling_matrix(x.shape[2], self.dct_size[0], basis)
            cols = pooling_matrix(x.shape[3], self.dct_size[1], basis)
            return torch.einsum("ih,kij,jw->khw", rows, basis, cols)

    def spectrum(self, x: Tensor) -> Tensor:
        """[Freq_1, …, Freq_K] per channel part, N×C, in at least float32."""
        filters = self.filters(x)
        with gate_math(x):
            parts = x.to(filters.dtype).unflatten(1, (filters.shape[0], -1))  # N×K×C/K×H×W
            return torch.einsum("nkchw,khw->nkc", parts, filters).flatten(1)

    def excitation(self, x: Tensor) -> Tensor:
        """The channel weights s, N×C×1×1, computed in at least float32 (also in a float16 module: a DCT coefficient
        of an h×w grid is up to √(hw) times the map's values)."""
        return self.excite(self.spectrum(x)[:, :, None, None])

    def excite(self, freq: Tensor) -> Tensor:
        """s, N×C×1×1, from the spectrum (N×C×1×1, at least float32)."""
        with gate_math(freq):
            dtype = torch.promote_types(self.fc1.weight.dtype, freq.dtype)
            return self.gate(_conv1x1(self.fc2, self.act(_conv1x1(self.fc1, freq.to(dtype)))))

    def _excite_rows(self, freq: Tensor) -> Tensor:
        """s, N×C, from the spectrum, N×C: excite() with the FCs as F.linear."""
        with autocast_off(freq):
            dtype = torch.promote_types(self.fc1.weight.dtype, freq.dtype)
            hidden = self.act(F.linear(freq.to(dtype), *_linear(self.fc1, dtype)))
            return self.gate(F.linear(hidden, *_linear(self.fc2, dtype)))

    def _excite_submodules(self, freq: Tensor) -> Tensor:
        return self.excite(freq[:, :, None, None]).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        backend, fast = gate_path(self, x)
        if backend is not None:  # the spectrum as a depthwise filter covering the map: each channel its part's
            filters = self.filters(x)
            kernel = filters.repeat_interleave(self.channels // filters.shape[0], 0)[:, None]
            return gathered_channel_gate(backend, x, kernel, self._excite_rows if fast else self._excite_submodules)
        return x * self.excitation(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, frequencies={self.frequencies!r}, dct_size={self.dct_size}"
