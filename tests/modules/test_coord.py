"""Coordinate Attention: the module against its equations (outputs and gradients, float64, eval and train
BatchNorm) with H != W and with bias=False, the width mip = max(8, C // 32), closed-form parameter counts,
and the error messages."""
from __future__ import annotations

import pytest
import torch

from attnkit.modules import CoordAttention

from .reference import TRAIN_MODES, assert_matches_equations, batch_norm, conv1x1, feature_map, n_params, randomize

C = 48  # mip = max(8, 48 // 32) = 8


def h_swish(z):
    return z * torch.clamp(z + 3, 0, 6) / 6


def coord_reference(m, train=False):
    """z = [mean_W(x); mean_H(x)] along the spatial axis; f = h_swish(BN(conv1(z))); split into f_h, f_w;
    a_h = σ(conv_h(f_h)), a_w = σ(conv_w(f_w)); y = x·a_h·a_w."""
    def forward(x):
        h = x.shape[2]
        z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # N×C×(H+W)
        f = h_swish(batch_norm(conv1x1(z, m.conv1), m.bn1, train))
        a_h = torch.sigmoid(conv1x1(f[:, :, :h], m.conv_h))  # N×C×H
        a_w = torch.sigmoid(conv1x1(f[:, :, h:], m.conv_w))  # N×C×W
        return x * a_h[:, :, :, None] * a_w[:, :, None, :]

    return forward


@pytest.mark.parametrize("shape", [(3, C, 7, 5), (2, C, 4, 9), (3, C, 1, 6)], ids=lambda s: f"{s[2]}x{s[3]}")
@TRAIN_MODES
def test_matches_equations(train, shape):
    m = randomize(CoordAttention(C), double=True).train(train)
    x = feature_map(*shape, scale=3.0)  # the BN output then reaches all three pieces of h_swish
    # conv1's bias is followed by the BatchNorm: its gradient vanishes in training.
    zero_grads = frozenset({"conv1.bias"}) if train else frozenset()
    assert_matches_equations(m, coord_reference(m, train), x, zero_grads=zero_grads)


@TRAIN_MODES
def test_no_bias_matches_equations(train):
    m = randomize(CoordAttention(C, bias=False), double=True).train(train)
    assert m.conv1.bias is None and m.conv_h.bias is None and m.conv_w.bias is None
    assert_matches_equations(m, coord_reference(m, train), feature_map(3, C, 7, 5))


def test_mip_width():
    expected = {16: 8, 64: 8, 256: 8, 288: 9, 512: 16, 2048: 64}  # max(8, C // 32)
    assert {c: CoordAttention(c).conv1.out_channels for c in expected} == expected
    assert CoordAttention(64, reduction=4, min_hidden=2).conv1.out_channels == 16
    assert CoordAttention(64, hidden_channels=5).conv1.out_channels == 5


@pytest.mark.parametrize("c", [16, 64, 256, 2048])
def test_parameter_count(c):
    mip = max(8, c // 32)
    # conv1 C→mip (+bias), BN γ, β, conv_h and conv_w mip→C (+bias)
    assert n_params(CoordAttention(c)) == (c * mip + mip) + 2 * mip + 2 * (mip * c + c)
    assert n_params(CoordAttention(c, bias=False)) == c * mip + 2 * mip + 2 * mip * c


def test_bad_options():
    with pytest.raises(ValueError, match=r"`min_hidden` must be an integer >= 1, got 0"):
        CoordAttention(C, min_hidden=0)
    with pytest.raises(ValueError, match=r"`reduction` is the divisor r of C/r and must be >= 1, got -2"):
        CoordAttention(C, reduction=-2)
    with pytest.raises(ValueError, match=r"`act` must be one of \[.*'hard_swish'.*\], got 'h_swish'"):
        CoordAttention(C, act="h_swish")
