"""SimAM (Yang et al., ICML 2021) against its equations.

Checks: outputs and input gradients equal the energy formula written out here (float64), with λ = 1e-4 and other λ,
and with the hard-sigmoid gate; a 1×1 map gives x·σ(1/2); no parameters, so a SimAM-ResNet-50 has ResNet-50's
25,557,032 (25.56M, as published); the official placement, on the 3×3 convolution's output before its BN; the errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision

import attnkit
from attnkit.modules import SimAM

from .reference import assert_close, assert_matches_equations, feature_map, n_params

RESNET50 = 25_557_032


def simam_equation(x: torch.Tensor, e_lambda: float = 1e-4, gate=torch.sigmoid) -> torch.Tensor:
    """d = (t − μ)², σ̂² = Σ d / (HW − 1), 1/e* = d / (4(σ̂² + λ)) + 1/2, y = x·σ(1/e*), per channel of each sample."""
    n, c, h, w = x.shape
    mean = x.sum((2, 3), keepdim=True) / (h * w)
    d = (x - mean) ** 2
    variance = d.sum((2, 3), keepdim=True) / (h * w - 1)
    return x * gate(d / (4 * (variance + e_lambda)) + 0.5)


@pytest.mark.parametrize("shape", [(3, 6, 7, 5), (2, 4, 1, 9), (1, 3, 13, 17)], ids=lambda s: f"{s[2]}x{s[3]}")
@pytest.mark.parametrize("e_lambda", [1e-4, 0.1])
def test_matches_equations(shape, e_lambda):
    m = SimAM(shape[1], e_lambda).double()
    assert_matches_equations(m, lambda x: simam_equation(x, e_lambda), feature_map(*shape, scale=3.0))


def test_hard_sigmoid_gate_matches_equations():
    m = SimAM(6, gate="hard_sigmoid").double()
    x = feature_map(3, 6, 7, 5, scale=3.0)
    # PyTorch's Hardsigmoid backward multiplies by 1/6 rounded to float32 (relative error 3e-8)
    assert_matches_equations(m, lambda v: simam_equation(v, gate=lambda z: torch.clamp(z / 6 + 0.5, 0, 1)), x,
                             grad_tol=1e-6)


def test_the_default_lambda_is_the_papers():
    assert SimAM(8).e_lambda == 1e-4


def test_one_by_one_map_gives_half_energy():
    x = feature_map(2, 5, 1, 1)
    assert_close(SimAM(5).double()(x), x * (1 / (1 + math.exp(-0.5))), "1×1 output")


def test_no_parameters_and_the_resnet50_count():
    assert n_params(SimAM(2048)) == 0 and len(SimAM(64).state_dict()) == 0
    assert n_params(attnkit.create_model("resnet50", attn="simam")) == RESNET50  # SimAM-R50: 25.56M


def test_goes_on_the_3x3_convolution_before_its_batchnorm():
    """As the official ResNets and MobileNetV2: after conv2 (the bottleneck's 3×3, or a basic block's second), before
    bn2; after the depthwise convolution of every inverted residual, before its BN."""
    assert [s.after for s in attnkit.attach(torchvision.models.resnet50(), "simam")] == [
        f"layer{i}.{j}.conv2" for i, n in enumerate([3, 4, 6, 3], 1) for j in range(n)]
    assert [s.after for s in attnkit.attach(attnkit.create_model("resnet20"), "simam")][:2] == ["layer1.0.conv2",
                                                                                                 "layer1.1.conv2"]
    mobilenet = attnkit.attach(torchvision.models.mobilenet_v2(), "simam")
    assert [s.after for s in mobilenet][:2] == ["features.1.conv.0.0", "features.2.conv.1.0"] and len(mobilenet) == 17


def test_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match=r"SimAM was built for 6 channels but the input has 5"):
        SimAM(6)(torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize("value", [0, -1e-4, float("nan"), float("inf"), True, "1e-4"])
def test_bad_lambda(value):
    with pytest.raises(ValueError, match=r"`e_lambda` \(λ\) must be a positive number \(the paper's is 1e-4\)"):
        SimAM(4, value)
