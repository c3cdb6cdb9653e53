"""Global Context block."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..registry import register
from ._common import gate_math, make_activation, one_of, reduced_width, stat_dtype
from .base import AttentionModule, Probe, output

FUSIONS = ("add", "mul")


@register("gc")
class GlobalContext(AttentionModule):
    """Global Context block (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    ICCVW 2019).

    Official code: https://github.com/xvjiarui/GCNet (mmcv's ContextBlock)

        c = Σ_j softmax_j(W_k x_j) x_j                               (attention pooling; W_k: 1×1 conv C → 1)
        y = x + W_v2 ReLU(LN(W_v1 c))                                 (C → C/r → C, r = 16, LN over [C/r, 1, 1])

    Fusion by addition is the default; 'mul' scales x by σ(transform(c)) instead, and both may be used
    (scale first). The last convolution of each transform is zero-initialised, so the block starts as the
    identity (fusion by addition). Parameter names follow mmcv's ContextBlock.

    Args:
        channels: C.
        reduction: r; hidden_channels: explicit C/r.
        pooling: 'att' (attention pooling) or 'avg' (global average).
        fusion: one or both of 'add', 'mul'.
        act: the transform's activation.
    """

    first_stage = 2  # attach(): stages c3-c5 of a ResNet, as in the paper
    gate_name = "mul"

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        pooling: str = "att",
        fusion: str | Sequence[str] = ("add",),
        hidden_channels: int | None = None,
        act: str | type[nn.Module] = "relu",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.pooling = one_of(owner, "pooling", pooling, ("att", "avg"))
        fusion = (fusion,) if isinstance(fusion, str) else fusion
        if not isinstance(fusion, (tuple, list)) or not fusion or len(set(fusion)) != len(fusion):
            raise ValueError(f"{owner}: `fusion` must be 'add', 'mul' or both, got {fusion!r}.")
        self.fusion = tuple(one_of(owner, "fusion", f, FUSIONS) for f in fusion)
        hidden = reduced_width(owner, channels, reduction, hidden_channels)
        self.conv_mask: nn.Conv2d | None = None
        if self.pooling == "att":
            self.conv_mask = nn.Conv2d(channels, 1, 1)
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)

        def transform() -> nn.Sequential:
            last = nn.Conv2d(hidden, channels, 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]), make_activation(owner, act), last)

        self.channel_mul_conv = transform() if "mul" in self.fusion else None
        self.channel_add_conv = transform() if "add" in self.fusion else None

    def context(self, x: Tensor) -> Tensor:
        """c, N×C×1×1, in at least float32."""
        if self.conv_mask is None:
            return x.mean((2, 3), keepdim=True, dtype=stat_dtype(x))
        with gate_math(x):
            xs = x.to(torch.promote_types(self.conv_mask.weight.dtype, stat_dtype(x)))
            weights = self.conv_mask(xs.to(self.conv_mask.weight.dtype)).to(xs.dtype).flatten(1).softmax(dim=1)
            return torch.bmm(xs.flatten(2), weights.unsqueeze(2)).unsqueeze(3)

    def gate_probes(self) -> list[Probe]:
        """"weights": the attention pooling's softmax over the H·W positions (N×1×H×W, pooling 'att'); "context": c
        (N×C×1×1); "mul": σ(transform(c)) and "add": transform(c) (N×C×1×1), for the fusions used. Channel weights
        are "mul"."""
        probes: list[Probe] = []
        if self.conv_mask is not None:  # as context(): the mask logits' softmax over the positions
            probes.append((self.conv_mask, "weights", lambda inputs, out: out.to(torch.promote_types(out.dtype, torch.float32))
                           .flatten(1).softmax(1).view(out.shape)))
        transforms = [(self.channel_mul_conv, "mul", lambda inputs, out: torch.sigmoid(out)),
                      (self.channel_add_conv, "add", output)]
        transforms = [(t, name, f) for t, name, f in transforms if t is not None]
        probes.append((transforms[0][0], "context", lambda inputs, out: inputs[0]))  # each transform's input is c
        return probes + transforms

    def channel_weights_unavailable(self) -> str | None:
        if self.channel_mul_conv is None:
            return f"fusion {self.fusion!r} has no multiplicative channel gate; build it with fusion 'mul'"
        return None

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        c = self.context(x)
        out = x
        with gate_math(x):
            dtype = next(self.parameters()).dtype
            if self.channel_mul_conv is not None:
                out = out * torch.sigmoid(self.channel_mul_conv(c.to(dtype))).to(x.dtype)
            if self.channel_add_conv is not None:
                out = out + self.channel_add_conv(c.to(dtype)).to(x.dtype)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pooling={self.pooling!r}, fusion={self.fusion!r}"
