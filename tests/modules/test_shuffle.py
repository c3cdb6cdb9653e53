"""Shuffle Attention (Zhang & Yang, ICASSP 2021) against its equations.

Checks: outputs and gradients (input and every parameter) equal the grouped channel and spatial halves and the channel
shuffle written out here (float64); the shuffle puts input channel j·C/2 + k at output channel 2k + j; the official
initialisation (weights 0, biases 1, GroupNorm 1 and 0); the official parameter names; parameter counts (3C/G, and
SA-Net-50's 25.56M); the channel counts the groups cannot split, with clear errors.
"""
from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.modules import ShuffleAttention

from .reference import assert_close, assert_matches_equations, feature_map, n_params, randomize

GN_EPS = 1e-5
RESNET50 = 25_557_032


def shuffled_order(channels: int) -> list[int]:
    """The input channel at each output channel of a 2-group channel shuffle: output 2k + j <- input j·C/2 + k."""
    return [j * channels // 2 + k for k in range(channels // 2) for j in range(2)]


def shuffle_equation(m: ShuffleAttention, x: torch.Tensor) -> torch.Tensor:
    """Per group of C/G channels: the first half x₀ gated by σ(w₁·GAP(x₀) + b₁), the second half x₁ by
    σ(w₂·GN(x₁) + b₂) (GN: each channel over H×W, affine); the groups concatenated back, then shuffled."""
    n, c, h, w = x.shape
    half = c // (2 * m.groups)
    gx = x.reshape(n, m.groups, 2, half, h, w)
    x0, x1 = gx[:, :, 0], gx[:, :, 1]  # N×G×half×H×W

    def per_channel(p: torch.Tensor) -> torch.Tensor:
        return p.reshape(1, 1, half, 1, 1)

    channel_gate = torch.sigmoid(per_channel(m.cweight) * x0.mean((3, 4), keepdim=True) + per_channel(m.cbias))
    mean = x1.mean((3, 4), keepdim=True)
    var = ((x1 - mean) ** 2).mean((3, 4), keepdim=True)
    normalised = (x1 - mean) / torch.sqrt(var + GN_EPS) * per_channel(m.gn.weight) + per_channel(m.gn.bias)
    spatial_gate = torch.sigmoid(per_channel(m.sweight) * normalised + per_channel(m.sbias))
    concatenated = torch.stack([x0 * channel_gate, x1 * spatial_gate], dim=2).reshape(n, c, h, w)
    return concatenated[:, shuffled_order(c)]


@pytest.mark.parametrize(("channels", "groups"), [(16, 4), (24, 2), (16, 8), (12, 1)])
@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 9), (2, 1, 1)], ids=lambda s: f"{s[1]}x{s[2]}")
def test_matches_equations(channels, groups, shape):
    m = randomize(ShuffleAttention(channels, groups), double=True)
    x = feature_map(shape[0], channels, *shape[1:], scale=2.0)
    # on a 1×1 map GN(x₁) is its bias alone (x₁ − mean = 0): the GN's scale has no gradient
    assert_matches_equations(m, lambda v: shuffle_equation(m, v), x,
                             zero_grads=frozenset({"gn.weight"}) if shape[1:] == (1, 1) else frozenset())


def test_the_shuffle_sends_each_channel_where_the_official_code_does():
    m = ShuffleAttention(16, 2).double()
    with torch.no_grad():
        m.cbias.fill_(50.0), m.sbias.fill_(50.0)  # σ(50) rounds to 1 in float64: the gates are the identity
    x = feature_map(2, 16, 5, 4).detach()
    order = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    assert torch.equal(m(x), x[:, order]) and m.input_channel_of_output() == order  # what attnkit prune reads


def test_official_initialisation_and_names():
    m = ShuffleAttention(256)
    assert m.groups == 64
    assert {name: tuple(p.shape) for name, p in m.named_parameters()} == {
        "cweight": (1, 2, 1, 1), "cbias": (1, 2, 1, 1), "sweight": (1, 2, 1, 1), "sbias": (1, 2, 1, 1),
        "gn.weight": (2,), "gn.bias": (2,)}
    assert (m.cweight == 0).all() and (m.cbias == 1).all() and (m.sweight == 0).all() and (m.sbias == 1).all()
    assert (m.gn.weight == 1).all() and (m.gn.bias == 0).all() and m.gn.num_groups == 2
    x = feature_map(2, 256, 5, 4).detach()  # at the start both gates are σ(1) everywhere
    assert_close(m.double()(x), x[:, shuffled_order(256)] / (1 + math.exp(-1)), "initial output")


@pytest.mark.parametrize(("channels", "groups"), [(128, 64), (256, 64), (2048, 64), (48, 4)])
def test_parameter_count(channels, groups):
    assert n_params(ShuffleAttention(channels, groups)) == 6 * channels // (2 * groups) == 3 * channels // groups


def test_sa_resnet50_parameter_count():
    # One SA layer per bottleneck after bn3, G = 64: 3C/64 each; SA-Net-50 has 25.56M parameters (Zhang & Yang, Table 1)
    net = attnkit.create_model("resnet50", attn="shuffle")
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert n_params(net) == RESNET50 + sum(3 * c // 64 for c in widths) == RESNET50 + 708
    assert round(n_params(net) / 1e6, 2) == 25.56
    assert [s for s, m in net.named_modules() if isinstance(m, ShuffleAttention)][0] == "layer1.0.attn"


@pytest.mark.parametrize(("channels", "groups"), [(64, 64), (96, 64), (20, 4), (6, 2)])
def test_a_channel_count_the_groups_cannot_split_in_halves(channels, groups):
    with pytest.raises(ValueError, match=rf"ShuffleAttention: channels = {channels} must be a multiple of "
                                         rf"2·groups = {2 * groups} \(each group splits into two halves\)"):
        ShuffleAttention(channels, groups)


def test_the_default_groups_need_128_channels_in_a_network():
    with pytest.raises(ValueError, match=r"channels = 16 must be a multiple of 2·groups = 128"):
        attnkit.create_model("resnet20", attn="shuffle")
    assert len(attnkit.attach(attnkit.create_model("resnet20"), "shuffle(groups=4)")) == 9


def test_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match=r"ShuffleAttention was built for 16 channels but the input has 8"):
        ShuffleAttention(16, 4)(torch.randn(2, 8, 5, 5))
