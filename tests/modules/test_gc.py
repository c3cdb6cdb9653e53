"""Global Context block (Cao et al., 2019) against its equations.

Checks: outputs and gradients equal the attention pooling (or the mean) / 1×1 conv / LayerNorm / ReLU /
1×1 conv transform and the fusion ('add', 'mul' or both, scaling first) written out here; a freshly built
block is exactly the identity; closed-form parameter counts; the error messages.
"""
from __future__ import annotations

import pytest
import torch

from attnkit.modules import GlobalContext

from .reference import assert_matches_equations, conv1x1, feature_map, n_params, randomize

C = 48  # C / 16 = 3 hidden values, so the LayerNorm has something to normalise
SHAPE = (3, C, 7, 5)
LN_EPS = 1e-5
SHIFT_INVARIANT = frozenset({"conv_mask.bias"})  # adds the same logit everywhere: the softmax ignores it


def context(m: GlobalContext, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """c = Σ_j softmax_j(w_k·x_j + b_k) x_j, or the mean of x for 'avg'; N×C×1×1."""
    if pooling == "avg":
        return x.mean((2, 3), keepdim=True)
    logits = torch.einsum("c,nchw->nhw", m.conv_mask.weight[0, :, 0, 0], x) + m.conv_mask.bias[0]
    weights = torch.softmax(logits.flatten(1), dim=1).view_as(logits)
    return torch.einsum("nhw,nchw->nc", weights, x)[:, :, None, None]


def transform(seq: torch.nn.Sequential, c: torch.Tensor) -> torch.Tensor:
    """W2 ReLU(LN(W1 c + b1)) + b2, LayerNorm (affine) over the C/r hidden values of each sample."""
    conv1, ln, _, conv2 = seq
    v = conv1x1(c, conv1)
    mean = v.mean(1, keepdim=True)
    var = ((v - mean) ** 2).mean(1, keepdim=True)
    v = (v - mean) / torch.sqrt(var + LN_EPS) * ln.weight + ln.bias
    return conv1x1(torch.relu(v), conv2)


def gc_equation(m: GlobalContext, x: torch.Tensor, pooling: str, fusion: tuple[str, ...]) -> torch.Tensor:
    c = context(m, x, pooling)
    y = x * torch.sigmoid(transform(m.channel_mul_conv, c)) if "mul" in fusion else x
    return y + transform(m.channel_add_conv, c) if "add" in fusion else y


@pytest.mark.parametrize(
    ("pooling", "fusion"),
    [("att", ("add",)), ("att", ("mul",)), ("att", ("add", "mul")), ("avg", ("add",)), ("avg", ("mul", "add"))],
)
def test_matches_equations(pooling, fusion):
    m = randomize(GlobalContext(C, pooling=pooling, fusion=fusion), double=True).eval()
    zero_grads = SHIFT_INVARIANT if pooling == "att" else frozenset()  # 'avg' has no conv_mask
    x = feature_map(*SHAPE)
    assert_matches_equations(m, lambda v: gc_equation(m, v, pooling, fusion), x, zero_grads=zero_grads)


def test_fusion_add_is_the_default():
    m = randomize(GlobalContext(C), double=True).eval()
    x = feature_map(*SHAPE)
    assert_matches_equations(m, lambda v: gc_equation(m, v, "att", ("add",)), x, zero_grads=SHIFT_INVARIANT)


@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_fresh_block_is_exactly_the_identity(pooling):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 5)
    assert torch.equal(GlobalContext(32, pooling=pooling)(x), x)


@pytest.mark.parametrize("channels", [16, 64, 256, 2048])
@pytest.mark.parametrize(
    ("pooling", "fusion", "transforms"),
    [("att", "add", 1), ("att", ("add", "mul"), 2), ("avg", "add", 1), ("avg", "mul", 1)],
)
def test_parameter_count(channels, pooling, fusion, transforms):
    hidden = channels // 16
    mask = channels + 1 if pooling == "att" else 0  # 1×1 conv C → 1 with bias
    per_transform = (channels * hidden + hidden) + 2 * hidden + (hidden * channels + channels)  # conv, LN, conv
    m = GlobalContext(channels, pooling=pooling, fusion=fusion)
    assert n_params(m) == mask + transforms * per_transform


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pooling": "max"}, ValueError, r"`pooling` must be one of \['att', 'avg'\], got 'max'"),
        ({"fusion": "sum"}, ValueError, r"`fusion` must be one of \['add', 'mul'\], got 'sum'"),
        ({"fusion": ()}, ValueError, r"`fusion` must be 'add', 'mul' or both, got \(\)"),
        ({"fusion": ("add", "add")}, ValueError, r"`fusion` must be 'add', 'mul' or both"),
        ({"reduction": 0}, ValueError, r"`reduction` is the divisor r of C/r and must be >= 1, got 0"),
        ({"act": "bogus"}, ValueError, r"`act` must be one of"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        GlobalContext(32, **kwargs)
