"""Squeeze-and-Excitation: the module against its equations (outputs and gradients, float64), the `bias` and
`gate` options, closed-form parameter counts including the SE-ResNet-50 total, and the error messages."""
from __future__ import annotations

import re

import pytest
import torch

from attnkit.modules import SqueezeExcite

from .reference import assert_matches_equations, conv1x1, feature_map, n_params, randomize

C = 48  # hidden width C // 16 = 3
SHAPE = (3, C, 7, 5)


def se_logits(x, m):
    """W₂ δ(W₁ GAP(x) + b₁) + b₂, N×C, with the module's weights read from its parameters."""
    return conv1x1(torch.relu(conv1x1(x.mean((2, 3)), m.fc1)), m.fc2)


def sigmoid(z):
    return 1 / (1 + torch.exp(-z))


def hard_sigmoid(z):
    return torch.clamp(z / 6 + 0.5, 0, 1)


def se_reference(m, gate=sigmoid):
    return lambda x: x * gate(se_logits(x, m))[:, :, None, None]


def test_matches_equations():
    m = randomize(SqueezeExcite(C), double=True)
    assert_matches_equations(m, se_reference(m), feature_map(*SHAPE))


def test_no_bias_matches_equations():
    m = randomize(SqueezeExcite(C, bias=False), double=True)
    assert m.fc1.bias is None and m.fc2.bias is None
    assert [name for name, _ in m.named_parameters()] == ["fc1.weight", "fc2.weight"]
    assert_matches_equations(m, se_reference(m), feature_map(*SHAPE))


def test_hard_sigmoid_gate_matches_equations():
    m = randomize(SqueezeExcite(C, gate="hard_sigmoid"), double=True)
    x = feature_map(*SHAPE, scale=12.0)
    logits = se_logits(x, m)
    assert (logits.abs() > 3).any() and (logits.abs() < 3).any(), "want both saturated and linear gates"
    # PyTorch's Hardsigmoid backward multiplies by 1/6 rounded to float32 even in float64 (relative error 3e-8).
    assert_matches_equations(m, se_reference(m, hard_sigmoid), x, grad_tol=1e-6)


def test_hidden_width_is_c_floor_r():
    expected = {(64, 16): 4, (72, 16): 4, (64, 4): 16, (8, 16): 1}  # max(1, C // r)
    assert {(c, r): SqueezeExcite(c, r).fc1.out_channels for c, r in expected} == expected
    assert SqueezeExcite(64, hidden_channels=10).fc1.out_channels == 10


@pytest.mark.parametrize("c", [16, 64, 256, 2048])
@pytest.mark.parametrize("r", [4, 16])
def test_parameter_count(c, r):
    h = c // r
    assert n_params(SqueezeExcite(c, r)) == 2 * c * h + h + c  # W1, b1, W2, b2
    assert n_params(SqueezeExcite(c, r, bias=False)) == 2 * c * h


def test_se_resnet50_added_parameters():
    # One SE per ResNet-50 bottleneck, on the block's output width, r = 16.
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    closed_form = sum(2 * c * (c // 16) + c // 16 + c for c in widths)
    assert sum(n_params(SqueezeExcite(c)) for c in widths) == closed_form
    # 2,530,992 ≈ 2.53M: the "about 2.5M" SE adds to ResNet-50's 25.56M (SE-ResNet-50: 28.09M).
    assert closed_form == 2_530_992


def test_bad_options():
    with pytest.raises(ValueError, match=re.escape("`gate` must be one of ['hard_sigmoid', 'sigmoid'], got 'bogus'")):
        SqueezeExcite(C, gate="bogus")
    with pytest.raises(ValueError, match=r"`act` must be one of \[.*'relu'.*\], got 'rleu'\. Did you mean 'relu'\?"):
        SqueezeExcite(C, act="rleu")
    with pytest.raises(ValueError, match=r"`reduction` is the divisor r of C/r and must be >= 1, got 0"):
        SqueezeExcite(C, reduction=0)
    with pytest.raises(ValueError, match=r"got 0.0625\. For timm's rd_ratio=1/16 pass reduction=16"):
        SqueezeExcite(C, reduction=1 / 16)
    with pytest.raises(ValueError, match=r"`hidden_channels` must be an integer >= 1, got 0"):
        SqueezeExcite(C, hidden_channels=0)
