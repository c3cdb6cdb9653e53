"""Triplet Attention (Misra et al., WACV 2021) against the official code's equations.

Checks: outputs and gradients equal the three branches written the official way (permute, Z-pool =
[max; mean] over axis 1, k×k conv without bias, BN, sigmoid, scale, permute back; the mean of the three,
or of two with no_spatial=True), in eval and train mode, for k = 7 and 3; the parameter count 3·(2k² + 2)
(2·(2k² + 2) without the spatial branch) whatever C is; the error messages.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.modules import TripletAttention

from .reference import TRAIN_MODES, assert_matches_equations, batch_norm, feature_map, n_params, randomize

SHAPE = (3, 6, 7, 5)


def z_pool(v: torch.Tensor) -> torch.Tensor:
    """Official ZPool: cat(max over dim 1, mean over dim 1)."""
    return torch.cat([v.max(1, keepdim=True).values, v.mean(1, keepdim=True)], dim=1)


def gated(v: torch.Tensor, gate: torch.nn.Module, train: bool) -> torch.Tensor:
    """Official AttentionGate: v · sigmoid(BN(conv_k×k(ZPool(v)))), 'same' padding, no conv bias."""
    k = gate.conv.weight.shape[-1]
    return v * torch.sigmoid(batch_norm(F.conv2d(z_pool(v), gate.conv.weight, padding=(k - 1) // 2), gate.bn, train))


def triplet_equation(m: TripletAttention, x: torch.Tensor, no_spatial: bool, train: bool) -> torch.Tensor:
    out_cw = gated(x.permute(0, 2, 1, 3), m.cw, train).permute(0, 2, 1, 3)  # H as channels: conv over (C, W)
    out_hc = gated(x.permute(0, 3, 2, 1), m.hc, train).permute(0, 3, 2, 1)  # W as channels: conv over (H, C)
    if no_spatial:
        return (out_cw + out_hc) / 2
    return (out_cw + out_hc + gated(x, m.hw, train)) / 3


@TRAIN_MODES
@pytest.mark.parametrize("no_spatial", [False, True], ids=["three", "no_spatial"])
@pytest.mark.parametrize("kernel_size", [7, 3])
def test_matches_equations(kernel_size, no_spatial, train):
    m = randomize(TripletAttention(SHAPE[1], kernel_size, no_spatial=no_spatial), double=True).train(train)
    assert_matches_equations(m, lambda x: triplet_equation(m, x, no_spatial, train), feature_map(*SHAPE))


@pytest.mark.parametrize("channels", [1, 8, 64, 2048])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_parameter_count_does_not_depend_on_channels(channels, kernel_size):
    per_branch = 2 * kernel_size**2 + 2  # conv 2 → 1 without bias, BN(1)
    three = TripletAttention(channels, kernel_size)
    two = TripletAttention(channels, kernel_size, no_spatial=True)
    assert n_params(three) == 3 * per_branch
    assert n_params(two) == 2 * per_branch


def test_train_on_a_single_pixel_says_batchnorm_cannot_train():
    with pytest.raises(ValueError, match="BatchNorm cannot train on one value"):
        TripletAttention(8).train()(torch.randn(1, 8, 1, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kernel_size": 6}, ValueError, r"`kernel_size` must be odd so the padding is symmetric, got 6"),
        ({"kernel_size": 0}, ValueError, r"`kernel_size` must be an integer >= 1, got 0"),
        ({"gate": "relu"}, ValueError, r"`gate` must be one of \['hard_sigmoid', 'sigmoid'\], got 'relu'"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        TripletAttention(8, **kwargs)
