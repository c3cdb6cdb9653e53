"""Gated Channel Transformation: the module against its equations (outputs and gradients, float64) in modes 'l2' and
'l1' (with and without `after_relu`), the identity at the official initialisation (α = 1, γ = 0, β = 0), the weight
decay the paper leaves off β, closed-form parameter counts and the error messages."""
from __future__ import annotations

import pytest
import torch

from attnkit.modules import GatedChannelTransformation
from attnkit.train.optim import no_decay_names

from .reference import assert_matches_equations, feature_map, n_params, randomize

EPS = 1e-5
SHAPE = (3, 12, 7, 5)


def gct_gate(m: GatedChannelTransformation, x: torch.Tensor) -> torch.Tensor:
    """l2: s = α·sqrt(Σ_hw x² + ε), ŝ = γ·s / sqrt(mean_c s² + ε); l1: s = α·Σ_hw |x| (Σ x after ReLU),
    ŝ = γ·s / (mean_c |s| + ε); the gate 1 + tanh(ŝ + β), N×C×1×1."""
    if m.mode == "l2":
        s = m.alpha * torch.sqrt((x**2).sum((2, 3), keepdim=True) + EPS)
        s_hat = m.gamma * s / torch.sqrt((s**2).mean(1, keepdim=True) + EPS)
    else:
        s = m.alpha * (x if m.after_relu else x.abs()).sum((2, 3), keepdim=True)
        s_hat = m.gamma * s / (s.abs().mean(1, keepdim=True) + EPS)
    return 1 + torch.tanh(s_hat + m.beta)


def gct_equation(m: GatedChannelTransformation, x: torch.Tensor) -> torch.Tensor:
    """y = x·(1 + tanh(ŝ + β))."""
    return x * gct_gate(m, x)


@pytest.mark.parametrize("kwargs", [{}, {"mode": "l1"}, {"mode": "l1", "after_relu": True}], ids=["l2", "l1", "l1-relu"])
def test_matches_equations(kwargs):
    m = randomize(GatedChannelTransformation(SHAPE[1], **kwargs), double=True)
    x = feature_map(*SHAPE)
    if kwargs.get("after_relu"):
        x = x.detach().relu().requires_grad_()
    assert_matches_equations(m, lambda x: gct_equation(m, x), x)


@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (2, 7, 4, 9)], ids=["1x1", "4x9"])
def test_matches_equations_on_other_shapes(shape):
    m = randomize(GatedChannelTransformation(shape[1]), double=True)
    assert_matches_equations(m, lambda x: gct_equation(m, x), feature_map(*shape))


@pytest.mark.parametrize("mode", ["l2", "l1"])
def test_official_initialisation_is_the_identity(mode):
    m = GatedChannelTransformation(16, mode=mode)
    assert all(p.shape == (1, 16, 1, 1) for p in m.parameters())
    assert (m.alpha == 1).all() and (m.gamma == 0).all() and (m.beta == 0).all()
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(m(x), x)  # γ = 0: ŝ = 0, the gate 1 + tanh(0) = 1


def test_beta_is_trained_without_weight_decay():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), GatedChannelTransformation(8))
    exempt = no_decay_names(net)
    assert "1.beta" in exempt and "1.alpha" not in exempt and "1.gamma" not in exempt
    assert GatedChannelTransformation(8, beta_weight_decay=True).no_weight_decay() == set()


@pytest.mark.parametrize("c", [3, 64, 2048])
def test_parameter_count(c):
    assert n_params(GatedChannelTransformation(c)) == 3 * c  # α, γ, β per channel


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mode": "l3"}, ValueError, r"`mode` must be one of \['l2', 'l1'\], got 'l3'"),
        ({"after_relu": True}, ValueError, r"`after_relu` only changes mode 'l1'"),
        ({"eps": -1.0}, ValueError, r"`eps` must be a number in \(0, 1\]"),
        ({"eps": "1e-5"}, ValueError, r"`eps` must be a number"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        GatedChannelTransformation(8, **kwargs)
