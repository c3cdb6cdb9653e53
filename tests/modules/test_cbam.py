"""CBAM: the module against its equations (outputs and gradients, float64, eval and train BatchNorm) at its
defaults and with each option (pool types incl. 'lp'/'lse', no_spatial, residual, spatial_norm=False, the
spatial pool order, kernel size, MLP bias), closed-form parameter counts, and the error messages."""
from __future__ import annotations

import re

import pytest
import torch

from attnkit.modules import CBAM

from .reference import assert_matches_equations, batch_norm, conv1x1, conv2d_same, feature_map, n_params, randomize

C = 48  # MLP width C // 16 = 3
SHAPE = (3, C, 7, 5)

# Global pools over H×W, N×C.
POOLS = {
    "avg": lambda x: x.mean((2, 3)),
    "max": lambda x: x.amax((2, 3)),
    "lp": lambda x: torch.sqrt((x**2).sum((2, 3))),  # L2 norm
    "lse": lambda x: torch.log(torch.exp(x).sum((2, 3))),  # log-sum-exp
}
# Pools over C, N×1×H×W.
CHANNEL_POOLS = {"max": lambda x: x.amax(1, keepdim=True), "mean": lambda x: x.mean(1, keepdim=True)}


def channel_attention(x, m, pool_types):
    """Mc = σ(Σ_p MLP(pool_p(x))), N×C, one MLP shared by the pools."""
    fc1, fc2 = m.channel_gate.fc1, m.channel_gate.fc2
    return torch.sigmoid(sum(conv1x1(torch.relu(conv1x1(POOLS[p](x), fc1)), fc2) for p in pool_types))


def spatial_logits(y, m, order):
    """conv_k([pool_c(y) in `order`]), N×1×H×W, before the BatchNorm."""
    conv = m.spatial_gate.conv
    return conv2d_same(torch.cat([CHANNEL_POOLS[p](y) for p in order], 1), conv.weight, conv.bias)


def cbam_reference(m, train=False, **options):
    """x' = x·Mc(x); y = x'·σ(BN(spatial_logits(x'))) (+ x), options defaulting to the paper's."""
    pool_types = options.get("pool_types", ("avg", "max"))
    order = options.get("spatial_pools", ("max", "mean"))  # the official order

    def forward(x):
        y = x * channel_attention(x, m, pool_types)[:, :, None, None]
        if not options.get("no_spatial", False):
            z = spatial_logits(y, m, order)
            if options.get("spatial_norm", True):
                z = batch_norm(z, m.spatial_gate.bn, train)
            y = y * torch.sigmoid(z)
        return y + x if options.get("residual", False) else y

    return forward


OPTIONS = [
    {},
    {"pool_types": ("avg", "max", "lp", "lse")},
    {"pool_types": ("lse", "lp")},
    {"no_spatial": True},
    {"residual": True},
    {"spatial_norm": False},
    {"spatial_pools": ("mean", "max")},
    {"kernel_size": 3, "bias": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_matches_equations(options):
    m = randomize(CBAM(C, **options), double=True).eval()
    assert_matches_equations(m, cbam_reference(m, **options), feature_map(*SHAPE))


@pytest.mark.parametrize("options", [{}, {"pool_types": ("lp", "lse"), "spatial_pools": ("mean", "max")}])
def test_matches_equations_in_train_mode(options):
    m = randomize(CBAM(C, **options), double=True).train()
    assert_matches_equations(m, cbam_reference(m, train=True, **options), feature_map(*SHAPE))


def test_spatial_batchnorm_momentum_is_official():
    # The official BasicConv's BatchNorm2d(momentum=0.01): running ← 0.99·running + 0.01·batch (unbiased var).
    m = randomize(CBAM(C), double=True).train()
    bn = m.spatial_gate.bn
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    x = feature_map(*SHAPE).detach()
    with torch.no_grad():
        z = spatial_logits(x * channel_attention(x, m, ("avg", "max"))[:, :, None, None], m, ("max", "mean"))
        m(x)
    torch.testing.assert_close(bn.running_mean, 0.99 * old_mean + 0.01 * z.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, 0.99 * old_var + 0.01 * z.var(), rtol=1e-12, atol=1e-14)


def test_structure_of_the_gates():
    m = CBAM(C)
    assert m.spatial_gate.conv.bias is None  # no bias before the BatchNorm
    assert m.spatial_gate.conv.weight.shape == (1, 2, 7, 7)
    assert CBAM(C, spatial_norm=False).spatial_gate.conv.bias is not None
    assert CBAM(C, no_spatial=True).spatial_gate is None


@pytest.mark.parametrize("c", [16, 64, 256, 2048])
def test_parameter_count(c):
    h = c // 16
    mlp = 2 * c * h + h + c  # shared MLP, Linear+bias both ways
    assert n_params(CBAM(c)) == mlp + 2 * 7 * 7 + 2  # + 7×7 conv 2→1 without bias + BN(1) γ, β
    assert n_params(CBAM(c, kernel_size=3)) == mlp + 2 * 3 * 3 + 2
    assert n_params(CBAM(c, spatial_norm=False)) == mlp + 2 * 7 * 7 + 1  # biased conv, no BN
    assert n_params(CBAM(c, no_spatial=True)) == mlp
    assert n_params(CBAM(c, bias=False, no_spatial=True)) == 2 * c * h
    assert n_params(CBAM(c, pool_types=("avg", "max", "lp", "lse"))) == mlp + 2 * 7 * 7 + 2  # pools are free


def test_single_value_batchnorm_in_training():
    with pytest.raises(ValueError, match=r"BatchNorm that would see a single value per channel .* \(1, 48, 1, 1\)"):
        CBAM(C).train()(torch.randn(1, C, 1, 1))


def test_bad_options():
    valid = "['avg', 'max', 'lp', 'lse']"
    with pytest.raises(ValueError, match=re.escape(f"`pool_types` must be one of {valid}, got 'bogus'")):
        CBAM(C, pool_types=("avg", "bogus"))
    with pytest.raises(TypeError, match=re.escape(f"`pool_types` must be a non-empty tuple of names from {valid}")):
        CBAM(C, pool_types="avg")
    with pytest.raises(ValueError, match=r"`pool_types` has a repeated entry: \('avg', 'avg'\)"):
        CBAM(C, pool_types=("avg", "avg"))
    with pytest.raises(ValueError, match=r"`spatial_pools` must order 'max' and 'mean', got \('mean',\)"):
        CBAM(C, spatial_pools=("mean",))
    with pytest.raises(ValueError, match=r"`kernel_size` must be odd so the padding is symmetric, got 6"):
        CBAM(C, kernel_size=6)
