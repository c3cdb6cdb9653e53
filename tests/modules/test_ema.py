"""EMA (Ouyang et al., ICASSP 2023) against its equations.

Checks: outputs and gradients (input and every parameter) equal the grouped 1×1 and 3×3 branches, GroupNorm,
channel softmaxes and cross-spatial sum written out here (float64), for several group counts, odd sizes and H ≠ W;
the softmaxes run over the channels of each group; closed-form parameter counts; the channel-count errors.
"""
from __future__ import annotations

import pytest
import torch

from attnkit.modules import EMA

from .reference import assert_matches_equations, conv2d_same, feature_map, n_params, randomize

GN_EPS = 1e-5


def group_norm_per_channel(v: torch.Tensor, gn: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm with one group per channel: each channel of each sample normalised over H×W (biased variance)."""
    mean = v.mean((2, 3), keepdim=True)
    var = ((v - mean) ** 2).mean((2, 3), keepdim=True)
    return (v - mean) / torch.sqrt(var + GN_EPS) * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def ema_equation(m: EMA, x: torch.Tensor) -> torch.Tensor:
    """Per group x (c = C/G channels): a_h, a_w from a 1×1 convolution of the means along W and along H, joined along
    the spatial axis; x₁ = GN(x·σ(a_h)·σ(a_w)); x₂ = conv3×3(x); w = softmax_c(GAP(x₁))·x₂ + softmax_c(GAP(x₂))·x₁;
    y = x·σ(w)."""
    n, c, h, w = x.shape
    groups = m.groups
    gx = x.reshape(n * groups, c // groups, h, w)
    joined = torch.cat([gx.mean(3), gx.mean(2)], dim=2)  # (N·G)×c×(H+W)
    a = torch.einsum("oc,bcl->bol", m.conv1x1.weight[:, :, 0, 0], joined) + m.conv1x1.bias[None, :, None]
    a_h, a_w = a[:, :, :h], a[:, :, h:]
    x1 = group_norm_per_channel(gx * torch.sigmoid(a_h)[:, :, :, None] * torch.sigmoid(a_w)[:, :, None, :], m.gn)
    x2 = conv2d_same(gx, m.conv3x3.weight, m.conv3x3.bias)

    def softmax_over_channels(v: torch.Tensor) -> torch.Tensor:
        e = torch.exp(v.mean((2, 3)))
        return e / e.sum(1, keepdim=True)

    weights = (torch.einsum("bc,bchw->bhw", softmax_over_channels(x1), x2)
               + torch.einsum("bc,bchw->bhw", softmax_over_channels(x2), x1))
    return (gx * torch.sigmoid(weights)[:, None]).reshape(n, c, h, w)


@pytest.mark.parametrize(("channels", "groups"), [(16, 4), (24, 8), (12, 1), (8, 8)])
@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 9), (2, 1, 6)], ids=lambda s: f"{s[1]}x{s[2]}")
def test_matches_equations(channels, groups, shape):
    m = randomize(EMA(channels, groups), double=True)
    x = feature_map(shape[0], channels, *shape[1:], scale=2.0)
    assert_matches_equations(m, lambda v: ema_equation(m, v), x)


def test_the_softmax_runs_over_the_channels_of_each_group():
    """Scaling one group's input leaves the other groups' outputs unchanged: the groups are samples of their own."""
    m = randomize(EMA(16, 4), double=True)
    x = feature_map(2, 16, 6, 5).detach()
    y = m(x)
    x2 = x.clone()
    x2[:, 4:8] *= 3
    y2 = m(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and torch.equal(y[:, 8:], y2[:, 8:])
    assert not torch.allclose(y[:, 4:8], y2[:, 4:8] / 3)


def test_the_default_groups_are_the_officials():
    m = EMA(64)
    assert m.groups == 32 and m.conv1x1.in_channels == 2 and m.gn.num_groups == 2


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (256, 32), (2048, 32), (48, 4)])
def test_parameter_count(channels, groups):
    c = channels // groups  # conv1×1 (c² + c), conv3×3 (9c² + c), GroupNorm (2c)
    assert n_params(EMA(channels, groups)) == 10 * c * c + 4 * c


def test_resnet50_added_parameters():
    # One EMA per bottleneck before the residual addition, on its output width, G = 32.
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert sum(n_params(EMA(c)) for c in widths) == sum(10 * (c // 32) ** 2 + 4 * (c // 32) for c in widths) == 198_368


@pytest.mark.parametrize(("channels", "groups"), [(20, 8), (16, 32), (7, 2)])
def test_a_channel_count_the_groups_do_not_divide(channels, groups):
    with pytest.raises(ValueError, match=rf"EMA: channels = {channels} must be a multiple of groups = {groups}"):
        EMA(channels, groups)


@pytest.mark.parametrize("groups", [0, -2, 2.5, True])
def test_bad_groups(groups):
    with pytest.raises((TypeError, ValueError), match=r"`groups` must be an integer >= 1"):
        EMA(16, groups)


def test_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match=r"EMA was built for 16 channels but the input has 8"):
        EMA(16, 4)(torch.randn(2, 8, 5, 5))
