"""Frequency Channel Attention (FcaNet): the module against its equations (outputs and gradients, float64) on maps of
the DCT's size and of other sizes (pooled to it first, as the official layer does), the paper's frequency selections,
the DCT filters, the SE special case (the DC frequency alone is global average pooling: parity with timm's SEModule),
the FcaNet-50 parameter count (28.07M) and the error messages."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers.squeeze_excite import SEModule

import attnkit
from attnkit.modules import FrequencyChannelAttention

from .reference import assert_close, assert_matches_equations, conv1x1, feature_map, n_params, randomize

# The official code's 'top16' (u, v) in the 7×7 frequency space, u along H.
TOP16 = [(0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0), (5, 0), (1, 6), (3, 0), (0, 4), (0, 6), (0, 3),
         (3, 5), (2, 2)]
LOW4, BOT4 = [(0, 0), (0, 1), (1, 0), (1, 1)], [(6, 6), (1, 4), (3, 4), (3, 6)]
SELECTIONS = {"top16": TOP16, "low4": LOW4, "bot4": BOT4, "top1": TOP16[:1]}


def basis(u: int, v: int, h: int, w: int) -> torch.Tensor:
    """B_{u,v}[i, j] = b_u(i)·b_v(j), b_f(p) = cos(π f (p + ½)/L)/√L, times √2 for f > 0 (orthonormal DCT-II)."""
    def b(f, n):
        p = torch.arange(n, dtype=torch.float64)
        return torch.cos(math.pi * f * (p + 0.5) / n) / math.sqrt(n) * (math.sqrt(2) if f else 1.0)

    return b(u, h)[:, None] * b(v, w)[None, :]


def fca_gate(m: FrequencyChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """X pooled to h×w (adaptive average pooling) when its size differs; Freq_c = Σ_ij X_c[i, j]·B_{u_k, v_k}[i, j] for
    channel c in part k = c // (C/K) (frequencies scaled by h // 7); s = σ(W₂ δ(W₁ Freq)), N×C×1×1."""
    selection = SELECTIONS[m.frequencies]
    h, w = m.dct_size
    pooled = x if tuple(x.shape[2:]) == (h, w) else F.adaptive_avg_pool2d(x, (h, w))
    c, k = x.shape[1], len(selection)
    filters = torch.stack([basis(u * (h // 7), v * (w // 7), h, w) for u, v in selection])
    per_channel = filters.repeat_interleave(c // k, dim=0)  # C×h×w
    freq = (pooled * per_channel).sum((2, 3))
    return torch.sigmoid(conv1x1(torch.relu(conv1x1(freq, m.fc1)), m.fc2))[:, :, None, None]


def fca_equation(m: FrequencyChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """y = x·s."""
    return x * fca_gate(m, x)


@pytest.mark.parametrize("size", [(7, 7), (13, 9), (5, 3), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_equations(size):
    m = randomize(FrequencyChannelAttention(32), double=True)  # top16, two channels per frequency, C/r = 2
    assert_matches_equations(m, lambda x: fca_equation(m, x), feature_map(3, 32, *size))


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"frequencies": "low4", "dct_size": 14}, (14, 14)),
        ({"frequencies": "bot4", "dct_size": (14, 7), "bias": True}, (9, 20)),
        ({"frequencies": "top16", "dct_size": 56}, (56, 56)),
    ],
    ids=["low4-14", "bot4-14x7-bias", "top16-56"],
)
def test_options_match_equations(kwargs, size):
    m = randomize(FrequencyChannelAttention(16, 4, **kwargs), double=True)
    assert_matches_equations(m, lambda x: fca_equation(m, x), feature_map(2, 16, *size))


def test_dct_filters_are_the_orthonormal_basis_of_the_selection():
    m = FrequencyChannelAttention(32, frequencies="top16", dct_size=14)
    filters = m.dct_filters()
    assert filters.shape == (16, 14, 14)
    expected = torch.stack([basis(2 * u, 2 * v, 14, 14) for u, v in TOP16])  # (2u, 2v) on 14×14 is (u, v) on 7×7
    assert_close(filters, expected, "filters", tol=1e-7)
    gram = filters.flatten(1) @ filters.flatten(1).T
    assert_close(gram, torch.eye(16, dtype=torch.float64), "Gram matrix", tol=1e-6)


def test_the_dc_frequency_alone_is_squeeze_and_excitation():
    """FcaNet's observation: GAP is the lowest DCT frequency scaled by √(hw) (7 on the 7×7 grid), so 'top1' is SE with
    W₁ scaled by 7. Compared with timm's SEModule (bias-free), outputs and gradients, on a 14×14 map (pooled exactly to
    2×2 block means)."""
    torch.manual_seed(0)
    ours = randomize(FrequencyChannelAttention(32, frequencies="top1"))
    theirs = SEModule(32, rd_channels=2, bias=False)
    with torch.no_grad():
        theirs.fc1.weight.copy_(7 * ours.fc1.weight)
        theirs.fc2.weight.copy_(ours.fc2.weight)
    x = torch.randn(4, 32, 14, 14)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.fc1.weight.grad, 7 * theirs.fc1.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.fc2.weight.grad, theirs.fc2.weight.grad, rtol=1e-5, atol=1e-6)


def test_filters_follow_the_input_size_in_export_and_tracing():
    m = randomize(FrequencyChannelAttention(16)).eval()
    traced = torch.fx.symbolic_trace(m)
    for size in [(7, 7), (9, 12), (2, 3)]:
        x = torch.randn(2, 16, *size)
        torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize("c", [16, 64, 2048])
def test_parameter_count(c):
    h = c // 16
    assert n_params(FrequencyChannelAttention(c)) == 2 * c * h  # two bias-free FCs; the DCT filters are buffers
    assert n_params(FrequencyChannelAttention(c, bias=True)) == 2 * c * h + h + c
    assert not FrequencyChannelAttention(c).state_dict().keys() - {"fc1.weight", "fc2.weight"}  # filters: not learned


def test_fcanet50_parameters_and_sites():
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    net = attnkit.create_model("resnet50", attn="fca")
    assert n_params(net) == 25_557_032 + sum(2 * c * (c // 16) for c in widths) == 28_071_976
    assert round(n_params(net) / 1e6, 2) == 28.07  # Qin et al.: FcaNet-50, 28.07M (as bias-free SE-ResNet-50)
    assert net.layer1[0].attn.dct_size == (7, 7)
    assert [s.after for s in attnkit.attach(attnkit.create_model("resnet50"), "fca")][:2] == ["layer1.0.bn3", "layer1.1.bn3"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"channels": 24}, ValueError, r"16 does not divide the channel count 24; pick a selection of 8 \(e.g. 'top8'\)"),
        ({"channels": 16, "frequencies": "top3"}, ValueError, r"`frequencies` must be one of \[.*'top16'.*\], got 'top3'"),
        ({"channels": 16, "dct_size": 8}, ValueError, r"`dct_size` must be a multiple of 7 .* got 8"),
        ({"channels": 16, "dct_size": (7,)}, TypeError, r"`dct_size` must be an int or a pair \(h, w\)"),
        ({"channels": 16, "dct_size": 0}, ValueError, r"`dct_size` must be an integer >= 1, got 0"),
        ({"channels": 16, "reduction": 0}, ValueError, r"`reduction` is the divisor r of C/r"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        FrequencyChannelAttention(**kwargs)


def test_the_official_fcanet50_grids_per_stage_match_its_maps_at_224():
    """The official FcaNet-50 builds each stage's layers for the stage's map size at 224×224 (56, 28, 14, 7) and so
    never pools there: attach per stage with those dct sizes, and each layer's grid is its input's size."""
    net = attnkit.create_model("resnet50").eval()
    for stage, size in zip((1, 2, 3, 4), (56, 28, 14, 7)):
        attnkit.attach(net, f"fca(dct_size={size})", stages=[stage])
    seen = {}

    def record(module, args):
        seen[id(module)] = (module.dct_size, tuple(args[0].shape[2:]))

    handles = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, FrequencyChannelAttention)]
    with torch.no_grad():
        net(torch.randn(1, 3, 224, 224))
    for handle in handles:
        handle.remove()
    assert len(seen) == 16 and all(grid == size for grid, size in seen.values())
    assert n_params(net) == 28_071_976  # the DCT grids are not parameters
