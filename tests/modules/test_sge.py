"""Spatial Group-wise Enhance: the module against its equations (outputs and gradients, float64) with H != W, the
official initialisation (γ = 0, β = 1), 1×1 and constant maps, the groups it accepts, the parameter count of
SGE-ResNet-50 (25.56M, the official repository's table) and where attach() puts it."""
from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.modules import SpatialGroupEnhance

from .reference import assert_close, assert_matches_equations, feature_map, n_params, randomize

EPS = 1e-5  # added to the standard deviation


def sge_gate(m: SpatialGroupEnhance, x: torch.Tensor) -> torch.Tensor:
    """Per group g of C/G channels: c_i = GAP(x_g)·x_g,i; ĉ = (c − mean c) / (std c + ε) over the positions (unbiased
    std); the gate σ(γ_g ĉ_i + β_g) (or the hard sigmoid clamp(a/6 + ½, 0, 1)), N×G×H×W."""
    n, c, h, w = x.shape
    g = m.groups
    xg = x.reshape(n, g, c // g, h * w)
    c_i = (xg * xg.mean(3, keepdim=True)).sum(2)  # N×G×HW
    centred = c_i - c_i.mean(2, keepdim=True)
    std = torch.sqrt((centred**2).sum(2, keepdim=True) / (h * w - 1))
    a = centred / (std + EPS) * m.weight.reshape(1, g, 1) + m.bias.reshape(1, g, 1)
    gate = torch.clamp(a / 6 + 0.5, 0, 1) if isinstance(m.gate, torch.nn.Hardsigmoid) else torch.sigmoid(a)
    return gate.reshape(n, g, h, w)


def sge_equation(m: SpatialGroupEnhance, x: torch.Tensor) -> torch.Tensor:
    """y_g,i = x_g,i · gate_g,i."""
    n, c, h, w = x.shape
    return (x.reshape(n, m.groups, c // m.groups, h, w) * sge_gate(m, x)[:, :, None]).reshape(n, c, h, w)


@pytest.mark.parametrize("shape, groups", [((3, 32, 7, 5), 8), ((2, 24, 4, 9), 4), ((2, 12, 6, 6), 12)])
def test_matches_equations(shape, groups):
    m = randomize(SpatialGroupEnhance(shape[1], groups), double=True)
    assert_matches_equations(m, lambda x: sge_equation(m, x), feature_map(*shape))


def test_official_initialisation_gates_every_position_by_sigmoid_one():
    m = SpatialGroupEnhance(64)
    assert m.weight.shape == m.bias.shape == (1, 64, 1, 1)
    assert torch.equal(m.weight.detach(), torch.zeros(1, 64, 1, 1)) and torch.equal(m.bias.detach(), torch.ones(1, 64, 1, 1))
    x = torch.randn(2, 64, 5, 6)
    assert_close(m(x), x / (1 + math.exp(-1)), "output at initialisation", tol=1e-6)


def test_one_by_one_map_has_no_spread():
    m = randomize(SpatialGroupEnhance(8, 4), double=True)
    x = feature_map(3, 8, 1, 1)
    y = m(x)  # ĉ = 0 at the single position: y = x·σ(β)
    assert_close(y, x * torch.sigmoid(m.bias.reshape(1, 4, 1, 1)).repeat_interleave(2, dim=1), "1×1 output")
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_constant_group_has_finite_gradients():
    m = randomize(SpatialGroupEnhance(8, 2), double=True)
    x = torch.ones(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)  # every position alike: std = 0
    y = m(x)
    assert_close(y, x * torch.sigmoid(m.bias.reshape(1, 2, 1, 1)).repeat_interleave(4, dim=1), "constant output")
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_channel_weights_give_each_channel_its_groups_mean_gate():
    m = randomize(SpatialGroupEnhance(12, 3)).eval()
    x = torch.randn(2, 12, 5, 4)
    with torch.no_grad(), attnkit.capture(torch.nn.Sequential(m)) as gates:
        m(x)
    spatial = gates["0"]["spatial"][0]
    assert spatial.shape == (2, 3, 5, 4)
    weights = m.channel_weights({"spatial": spatial})
    assert torch.equal(weights, spatial.mean((2, 3)).repeat_interleave(4, dim=1))


@pytest.mark.parametrize("c, g", [(64, 64), (256, 64), (2048, 64), (12, 3)])
def test_parameter_count(c, g):
    assert n_params(SpatialGroupEnhance(c, g)) == 2 * g  # γ and β per group


def test_sge_resnet50_parameters_and_sites():
    plain = n_params(attnkit.create_model("resnet50"))
    net = attnkit.create_model("resnet50", attn="sge")
    assert n_params(net) - plain == 16 * 2 * 64 == 2048  # one SGE(64) per bottleneck
    assert round(n_params(net) / 1e6, 2) == 25.56  # PytorchInsight's table: SGE-ResNet50 25.56M
    report = attnkit.attach(attnkit.create_model("resnet50"), "sge")
    assert [s.after for s in report][:2] == ["layer1.0.bn3", "layer1.1.bn3"] and len(report) == 16


def test_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError, match=r"`groups`=64 must divide the channel count 48; pass groups=48"):
        SpatialGroupEnhance(48)
    with pytest.raises(ValueError, match=r"`groups`=64 must divide the channel count 16; pass groups=16"):
        attnkit.create_model("resnet20", attn="sge")  # CIFAR widths 16-64: SGE needs groups=16 or fewer there
    assert len(attnkit.attach(attnkit.create_model("resnet20"), "sge(groups=16)")) == 9


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"groups": 0}, ValueError, r"`groups` must be an integer >= 1, got 0"),
        ({"groups": 2.0}, TypeError, r"`groups` must be an integer >= 1, got 2.0"),
        ({"eps": 0}, ValueError, r"`eps` must be a number in \(0, 1\]"),
        ({"gate": "tanh"}, ValueError, r"`gate` must be one of \['hard_sigmoid', 'sigmoid'\], got 'tanh'"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        SpatialGroupEnhance(16, **{"groups": 4, **kwargs})
