"""Concurrent spatial and channel squeeze & excitation: the module against its equations (outputs and gradients,
float64) for each way of combining the two recalibrations, the cSE branch against torchvision's SqueezeExcitation
(outputs and gradients, copied weights), closed-form parameter counts, where attach() puts it, and the error
messages."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import SqueezeExcitation

import attnkit
from attnkit.modules import SCSE

from .reference import assert_matches_equations, conv1x1, feature_map, n_params, randomize

C = 12


def scse_gates(m: SCSE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s = σ(W₂ ReLU(W₁ GAP(x) + b₁) + b₂) (N×C×1×1), q = σ(w·x + b) (N×1×H×W)."""
    return torch.sigmoid(conv1x1(torch.relu(conv1x1(x.mean((2, 3)), m.fc1)), m.fc2))[:, :, None, None], \
        torch.sigmoid(conv1x1(x, m.conv))


def scse_equation(m: SCSE, x: torch.Tensor) -> torch.Tensor:
    """y = max(x·s, x·q), x·s + x·q or x·s·q."""
    s, q = scse_gates(m, x)
    if m.combine == "max":
        return torch.maximum(x * s, x * q)
    return x * s + x * q if m.combine == "add" else x * s * q


@pytest.mark.parametrize("combine", ["max", "add", "mul"])
@pytest.mark.parametrize("shape", [(3, C, 7, 5), (2, C, 1, 1)], ids=["7x5", "1x1"])
def test_matches_equations(combine, shape):
    m = randomize(SCSE(C, combine=combine), double=True)
    assert_matches_equations(m, lambda x: scse_equation(m, x), feature_map(*shape))


def test_no_bias_and_other_reduction_match_equations():
    m = randomize(SCSE(C, 4, bias=False), double=True)
    assert m.fc1.out_channels == 3 and m.fc1.bias is None and m.conv.bias is None
    assert_matches_equations(m, lambda x: scse_equation(m, x), feature_map(3, C, 6, 4))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_channel_branch_is_torchvisions_squeeze_excitation(train):
    """cSE is SE with r = 2 and biases; x·s equals torchvision.ops.SqueezeExcitation(C, C // 2) with the same weights,
    outputs and gradients."""
    torch.manual_seed(0)
    ours = randomize(SCSE(32)).train(train)
    theirs = SqueezeExcitation(32, 16).train(train)
    names = {f"{fc}.{p}": f"{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    with torch.no_grad():
        for a, b in names.items():
            theirs.get_parameter(b).copy_(ours.get_parameter(a))
    x = torch.randn(4, 32, 7, 9)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = xa * ours.channel_excitation(xa), theirs(xb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for a, b in names.items():
        torch.testing.assert_close(ours.get_parameter(a).grad, theirs.get_parameter(b).grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", [2, 16, 256])
def test_parameter_count(c):
    h = c // 2
    assert n_params(SCSE(c)) == (c * h + h) + (h * c + c) + (c + 1)  # cSE's two FCs, sSE's 1×1 convolution
    assert n_params(SCSE(c, bias=False)) == 2 * c * h + c


def test_sites_are_the_residual_branch_ends():
    report = attnkit.attach(attnkit.create_model("resnet50"), "scse")
    assert [s.after for s in report][:2] == ["layer1.0.bn3", "layer1.1.bn3"] and len(report) == 16


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"combine": "concat"}, ValueError, r"`combine` must be one of \['max', 'add', 'mul'\], got 'concat'"),
        ({"reduction": 0.5}, ValueError, r"`reduction` is the divisor r of C/r and must be >= 1, got 0.5"),
        ({"act": "prelu"}, ValueError, r"`act` must be one of"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        SCSE(C, **kwargs)
