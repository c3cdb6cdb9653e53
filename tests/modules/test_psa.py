"""Polarized Self-Attention: the module against its equations (outputs and gradients, float64) for both layouts and
both formulations (the released code's and the paper's), the two initialisations, closed-form parameter counts,
where attach() puts it (after each block's 3×3 convolution) and the error messages."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnkit
from attnkit.modules import PolarizedSelfAttention

from .reference import BN_EPS, assert_close, assert_matches_equations, conv1x1, feature_map, n_params, randomize

C = 16
SHAPE = (3, C, 7, 5)
CASES = [("parallel", "code"), ("sequential", "code"), ("parallel", "paper"), ("sequential", "paper")]


def layer_norm(z: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """(z − mean) / sqrt(var + ε)·γ + β over the K features of an N×K tensor (LayerNorm([K, 1, 1]))."""
    mean = z.mean(1, keepdim=True)
    var = ((z - mean) ** 2).mean(1, keepdim=True)
    return (z - mean) / torch.sqrt(var + BN_EPS) * norm.weight.flatten() + norm.bias.flatten()


def channel_attention(m: PolarizedSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Aᶜʰ = σ(Wz(Σ_p Wv(x)_p · softmax_p(Wq(x))_p)), Wz: one convolution (code, parallel), conv → LN → ReLU → conv
    (code, sequential), or conv → LN over C (paper). N×C."""
    values = conv1x1(x, m.channel_v).flatten(2)  # N×C/2×HW
    weights = torch.softmax(conv1x1(x, m.channel_q).flatten(1), dim=1)  # N×HW
    context = (values * weights[:, None, :]).sum(2)  # N×C/2
    if m.variant == "paper":
        z = layer_norm(conv1x1(context, m.channel_z[0]), m.channel_z[1])
    elif m.layout == "sequential":
        hidden = torch.relu(layer_norm(conv1x1(context, m.channel_z[0]), m.channel_z[1]))
        z = conv1x1(hidden, m.channel_z[3])
    else:
        z = conv1x1(context, m.channel_z)
    return torch.sigmoid(z)


def spatial_attention(m: PolarizedSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """q = GAP(Wq(x)) (N×C/2), v = Wv(x) (N×C/2×HW); Aˢᵖ = σ(softmax_p(q·v)) (code, parallel), σ(q·softmax_p(v))
    (code, sequential), σ(softmax_c(q)·v) (paper). N×H×W."""
    q = conv1x1(x, m.spatial_q).mean((2, 3))
    v = conv1x1(x, m.spatial_v).flatten(2)
    if m.variant == "paper":
        logits = (torch.softmax(q, dim=1)[:, :, None] * v).sum(1)
    elif m.layout == "sequential":
        logits = (q[:, :, None] * torch.softmax(v, dim=2)).sum(1)
    else:
        logits = torch.softmax((q[:, :, None] * v).sum(1), dim=1)
    return torch.sigmoid(logits).reshape(x.shape[0], *x.shape[2:])


def psa_equation(m: PolarizedSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """parallel: y = x·Aᶜʰ(x) + x·Aˢᵖ(x); sequential: z = x·Aᶜʰ(x), y = z·Aˢᵖ(z)."""
    z = x * channel_attention(m, x)[:, :, None, None]
    if m.layout == "sequential":
        return z * spatial_attention(m, z)[:, None]
    return z + x * spatial_attention(m, x)[:, None]


@pytest.mark.parametrize("layout, variant", CASES)
@pytest.mark.parametrize("shape", [SHAPE, (2, C, 1, 6)], ids=["7x5", "1x6"])
def test_matches_equations(layout, variant, shape):
    m = randomize(PolarizedSelfAttention(C, layout=layout, variant=variant), double=True)
    assert_matches_equations(m, lambda x: psa_equation(m, x), feature_map(*shape))


def test_released_network_initialisation():
    """HRNet's init_weights draws every convolution weight from N(0, 0.001²): PSA starts near x·σ(0) + x·σ(1/HW)."""
    torch.manual_seed(0)
    m = PolarizedSelfAttention(256)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 5 and all(abs(float(c.weight.detach().std()) - 1e-3) < 1e-4 for c in convs)
    x = torch.randn(2, 256, 7, 5)
    assert_close(m(x), x * (0.5 + 1 / (1 + math.exp(-1 / 35))), "output at initialisation", tol=1e-3)


def test_module_initialisation_is_kaiming_fan_in_for_queries_and_values():
    torch.manual_seed(0)
    m = PolarizedSelfAttention(512, init="module")
    for conv in (m.channel_q, m.channel_v, m.spatial_q, m.spatial_v):
        assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / 512)) < 0.05 * math.sqrt(2 / 512)
    bound = 1 / math.sqrt(256)  # Wz keeps torch's default: uniform with bound 1/sqrt(fan_in)
    assert float(m.channel_z.weight.detach().abs().max()) <= bound and float(m.channel_z.weight.detach().std()) > 0.4 * bound


@pytest.mark.parametrize("layout, variant, added", [
    ("parallel", "code", lambda c, i: i * c),
    ("sequential", "code", lambda c, i: (i * (i // 4) + i // 4) + 2 * (i // 4) + (i // 4 * c + c)),
    ("parallel", "paper", lambda c, i: i * c + 2 * c),
])
@pytest.mark.parametrize("c", [16, 64, 512])
def test_parameter_count(c, layout, variant, added):
    i = c // 2  # Wv (channel), Wq (channel, C → 1), Wq and Wv (spatial), then Wz
    assert n_params(PolarizedSelfAttention(c, layout=layout, variant=variant)) == c * i + c + 2 * c * i + added(c, i)


def test_sites_follow_each_blocks_3x3_convolution():
    resnet18 = [s.after for s in attnkit.attach(attnkit.create_model("resnet18"), "psa")]
    assert resnet18[:2] == ["layer1.0.bn1", "layer1.1.bn1"] and len(resnet18) == 8
    resnet50 = [s.after for s in attnkit.attach(attnkit.create_model("resnet50"), "psa")]
    assert resnet50[0] == "layer1.0.bn2" and len(resnet50) == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "series"}, r"`layout` must be one of \['parallel', 'sequential'\], got 'series'"),
        ({"variant": "official"}, r"`variant` must be one of \['code', 'paper'\], got 'official'"),
        ({"init": "kaiming"}, r"`init` must be one of \['network', 'module'\], got 'kaiming'"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolarizedSelfAttention(C, **kwargs)
