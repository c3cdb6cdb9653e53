"""SRM (Lee et al., ICCV 2019) against its equations.

Checks: outputs and gradients equal the style pooling / channel-wise FC / BN / sigmoid written out here, in
eval mode (running statistics) and train mode (batch statistics); the CFC weight starts at zero; a 1×1 map
uses the biased variance (0); `no_weight_decay()` names SRM's own parameters; the parameter count is 4C
(and 60,416 ≈ 0.06M over the blocks of SRM-ResNet-50); the error messages.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnkit.modules import SRM

from .reference import TRAIN_MODES, assert_close, assert_matches_equations, batch_norm, feature_map, n_params, randomize

STD_EPS = 1e-5  # ε inside SRM's standard deviation


def srm_equation(m: SRM, x: torch.Tensor, train: bool) -> torch.Tensor:
    """t = [μ, σ] (unbiased variance), z = w_μ·μ + w_σ·σ, g = sigmoid(BN(z)), y = x·g."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    mean = flat.sum(2) / (h * w)
    var = ((flat - mean[:, :, None]) ** 2).sum(2) / (h * w - 1)
    std = torch.sqrt(var + STD_EPS)
    z = m.cfc[:, 0] * mean + m.cfc[:, 1] * std
    return x * torch.sigmoid(batch_norm(z[:, :, None, None], m.bn, train))


@TRAIN_MODES
def test_matches_equations(train):
    m = randomize(SRM(6), double=True).train(train)
    assert_matches_equations(m, lambda x: srm_equation(m, x, train), feature_map(3, 6, 7, 5))


def test_eval_with_batch_of_one_matches_equations():
    m = randomize(SRM(6), double=True).eval()
    assert_matches_equations(m, lambda x: srm_equation(m, x, False), feature_map(1, 6, 7, 5))


def test_cfc_is_zero_initialised():
    m = SRM(5)
    assert m.cfc.shape == (5, 2)
    assert torch.equal(m.cfc.detach(), torch.zeros(5, 2))


@TRAIN_MODES
def test_one_by_one_map_uses_biased_variance(train):
    m = randomize(SRM(4), double=True).train(train)
    x = feature_map(3, 4, 1, 1)
    out = m(x)
    z = m.cfc[:, 0] * x[:, :, 0, 0] + m.cfc[:, 1] * math.sqrt(STD_EPS)  # μ = x, σ = sqrt(0 + ε)
    expected = x * torch.sigmoid(batch_norm(z[:, :, None, None], m.bn, train))
    assert torch.isfinite(out).all()
    assert_close(out, expected, "1×1 output")


def test_no_weight_decay_names_cfc_and_bn():
    assert SRM(8).no_weight_decay() == {"cfc", "bn.weight", "bn.bias"}


@pytest.mark.parametrize("channels", [1, 16, 64, 2048])
def test_parameter_count(channels):
    m = SRM(channels)
    cfc, bn = 2 * channels, 2 * channels
    assert n_params(m) == cfc + bn == 4 * channels


def test_resnet50_added_parameters():
    # One SRM per bottleneck, on its output width: 3, 4, 6, 3 blocks of 256, 512, 1024, 2048 channels.
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    added = sum(n_params(SRM(w)) for w in widths)
    assert added == 4 * 15104 == 60416  # about 0.06M, as published


def test_train_with_batch_of_one_says_batchnorm_cannot_train():
    with pytest.raises(ValueError, match="BatchNorm cannot train on one value"):
        SRM(6).train()(torch.randn(1, 6, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"channels": 0}, ValueError, r"`channels` must be an integer >= 1, got 0"),
        ({"channels": 4, "eps": -1.0}, ValueError, r"`eps` must be a number in \[0, 1\] \(the paper.s is 1e-5\), got -1.0"),
        ({"channels": 4, "eps": float("nan")}, ValueError, r"`eps` must be a number in \[0, 1\] \(the paper.s is 1e-5\), got nan"),
        ({"channels": 4, "gate": "sigmod"}, ValueError, r"`gate` must be one of .*Did you mean 'sigmoid'"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        SRM(**kwargs)
