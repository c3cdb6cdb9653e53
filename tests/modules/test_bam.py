"""BAM: the module against its equations (outputs and gradients, float64, eval and train BatchNorm) for
combine='sum' (the paper) and 'product' (the released code) and the dilation options, closed-form
parameter counts, and the error messages."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from attnkit.modules import BAM

from .reference import (
    TRAIN_MODES,
    assert_matches_equations,
    batch_norm,
    conv1x1,
    conv2d_same,
    feature_map,
    n_params,
    randomize,
)

C = 48  # width C // 16 = 3
SHAPE = (3, C, 11, 9)  # larger than the dilation, so the dilated taps reach inside the map


def layers(m, kind):
    return [layer for layer in m.modules() if isinstance(layer, kind)]


def biases_before_batchnorm(m):
    """Names of the biases that a BatchNorm follows: their gradient vanishes in training."""
    return frozenset(
        f"{name}.{i}.bias"
        for name, seq in [("channel_gate", m.channel_gate), ("spatial_gate", m.spatial_gate)]
        for i in range(len(seq) - 1)
        if isinstance(seq[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d))
    )


def bam_reference(m, combine="sum", dilation=4, num_dilated=2, train=False):
    """Mc = FC(ReLU(BN(FC(GAP(x))))); Ms = conv1×1(ReLU(BN(conv3×3,d(… ReLU(BN(conv1×1(x))))))), with
    y = x·(1 + σ(Mc + Ms)) for 'sum' and x·(1 + σ(Mc·Ms)) for 'product'."""
    fc1, fc2 = layers(m.channel_gate, nn.Linear)
    (bn1d,) = layers(m.channel_gate, nn.BatchNorm1d)
    convs, bns = layers(m.spatial_gate, nn.Conv2d), layers(m.spatial_gate, nn.BatchNorm2d)
    assert len(convs) == num_dilated + 2 and len(bns) == num_dilated + 1

    def forward(x):
        mc = conv1x1(torch.relu(batch_norm(conv1x1(x.mean((2, 3)), fc1), bn1d, train)), fc2)
        z = torch.relu(batch_norm(conv2d_same(x, convs[0].weight, convs[0].bias), bns[0], train))
        for conv, norm in zip(convs[1:-1], bns[1:]):
            z = torch.relu(batch_norm(conv2d_same(z, conv.weight, conv.bias, dilation), norm, train))
        ms = conv2d_same(z, convs[-1].weight, convs[-1].bias)
        mc = mc[:, :, None, None]
        return x * (1 + torch.sigmoid(mc + ms if combine == "sum" else mc * ms))

    return forward


OPTIONS = [{}, {"combine": "sum"}, {"combine": "product"}, {"dilation": 2, "num_dilated": 3}]


@TRAIN_MODES
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_equations(options, train):
    m = randomize(BAM(C, **options), double=True).train(train)
    zero_grads = biases_before_batchnorm(m) if train else frozenset()
    assert_matches_equations(m, bam_reference(m, train=train, **options), feature_map(*SHAPE), zero_grads=zero_grads)


def test_spatial_branch_structure():
    convs = layers(BAM(C).spatial_gate, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.dilation) for c in convs] == [
        (C, 3, (1, 1), (1, 1)),
        (3, 3, (3, 3), (4, 4)),
        (3, 3, (3, 3), (4, 4)),
        (3, 1, (1, 1), (1, 1)),
    ]
    assert len(layers(BAM(C, num_dilated=0).spatial_gate, nn.Conv2d)) == 2


@pytest.mark.parametrize("c", [16, 64, 256, 2048])
def test_parameter_count(c):
    h = c // 16
    channel = (c * h + h) + 2 * h + (h * c + c)  # Linear C→h, BN1d(h), Linear h→C
    spatial = (c * h + h) + 2 * h + 2 * (9 * h * h + h + 2 * h) + (h + 1)  # 1×1, BN, 2×(3×3 + BN), 1×1 → 1
    assert n_params(BAM(c)) == channel + spatial
    assert n_params(BAM(c, num_dilated=1)) == channel + spatial - (9 * h * h + h + 2 * h)
    assert n_params(BAM(c, combine="product")) == channel + spatial


def test_batch_of_one_in_training():
    # BatchNorm1d over the pooled descriptor sees one value per channel for N = 1.
    with pytest.raises(ValueError, match=r"BatchNorm that would see a single value per channel .* \(1, 48, 7, 5\)"):
        BAM(C).train()(torch.randn(1, C, 7, 5))
    assert BAM(C).eval()(torch.randn(1, C, 7, 5)).shape == (1, C, 7, 5)


def test_bad_options():
    with pytest.raises(ValueError, match=re.escape("`combine` must be one of ['sum', 'product'], got 'bogus'")):
        BAM(C, combine="bogus")
    with pytest.raises(ValueError, match=r"`dilation` must be an integer >= 1, got 0"):
        BAM(C, dilation=0)
    with pytest.raises(ValueError, match=r"`num_dilated` must be an integer >= 0, got -1"):
        BAM(C, num_dilated=-1)
