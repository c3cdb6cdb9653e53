"""Efficient Local Attention: the module against its equations (outputs and gradients, float64) for the paper's four
versions and the unshared variant, the versions' numbers, a 1×1 map with one channel per norm group, closed-form
parameter counts, where attach() puts it, and the error messages (parity with timm's variant: test_timm_parity)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.modules import EfficientLocalAttention

from .reference import BN_EPS, assert_close, assert_matches_equations, feature_map, n_params, randomize

C = 32


def grouped_conv1d(z: torch.Tensor, weight: torch.Tensor, groups: int, bias: torch.Tensor | None) -> torch.Tensor:
    """'same' 1-D convolution in groups, as a sum of shifted strips:
    out[n, o, l] = Σ_{c ∈ group(o), u} w[o, c, u]·pad(z)[n, c, l + u] (+ b[o])."""
    k, length = weight.shape[2], z.shape[2]
    padded = F.pad(z, (k // 2, k // 2))
    per_group = z.shape[1] // groups
    outs = []
    for g in range(groups):
        zg = padded[:, g * per_group:(g + 1) * per_group]
        wg = weight[g * (weight.shape[0] // groups):(g + 1) * (weight.shape[0] // groups)]
        outs.append(sum(torch.einsum("oc,ncl->nol", wg[:, :, u], zg[:, :, u:u + length]) for u in range(k)))
    out = torch.cat(outs, 1)
    return out if bias is None else out + bias[None, :, None]


def group_norm(z: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per sample and group of C/G channels: (z − mean) / sqrt(var + ε) over the group's values, then γ, β per channel."""
    n, c, length = z.shape
    zg = z.reshape(n, groups, c // groups * length)
    mean = zg.mean(2, keepdim=True)
    var = ((zg - mean) ** 2).mean(2, keepdim=True)
    return ((zg - mean) / torch.sqrt(var + BN_EPS)).reshape(n, c, length) * weight[None, :, None] + bias[None, :, None]


def ela_gates(m: EfficientLocalAttention, x: torch.Tensor, groups: int, norm_groups: int, act=lambda z: z):
    """aʰ = σ(act(GN(conv1d(mean_W(x))))) (N×C×H), aʷ = σ(act(GN(conv1d(mean_H(x))))) (N×C×W), one convolution and
    GroupNorm for both (shared) or one each."""
    (conv_h, norm_h), (conv_w, norm_w) = m.strips()

    def strip(z, conv, norm):
        return torch.sigmoid(act(group_norm(grouped_conv1d(z, conv.weight, groups, conv.bias), norm_groups, norm.weight,
                                            norm.bias)))

    return strip(x.mean(3), conv_h, norm_h), strip(x.mean(2), conv_w, norm_w)


def ela_equation(m: EfficientLocalAttention, x: torch.Tensor, groups: int, norm_groups: int, act=lambda z: z):
    """y = x·aʰ·aʷ."""
    a_h, a_w = ela_gates(m, x, groups, norm_groups, act)
    return x * a_h[:, :, :, None] * a_w[:, :, None, :]


@pytest.mark.parametrize("variant, k, groups, norm_groups",
                         [("T", 5, C, 32), ("B", 7, C, 16), ("S", 5, C // 8, 16), ("L", 7, C // 8, 16)])
def test_versions_match_equations(variant, k, groups, norm_groups):
    m = randomize(EfficientLocalAttention(C, variant=variant), double=True)
    conv = m.conv
    assert (conv.kernel_size, conv.groups, m.norm.num_groups, conv.bias) == ((k,), groups, norm_groups, None)
    assert_matches_equations(m, lambda x: ela_equation(m, x, groups, norm_groups), feature_map(3, C, 9, 6))


@pytest.mark.parametrize("shape", [(2, C, 1, 7), (2, C, 11, 1), (1, 16, 1, 1)], ids=["1x7", "11x1", "1x1"])
def test_thin_maps_match_equations(shape):
    m = randomize(EfficientLocalAttention(shape[1]), double=True)
    x = feature_map(*shape)
    if shape[1] == 16:  # one value per norm group: GN gives its shift β, the gate σ(β) on both axes
        expected = x * torch.sigmoid(m.norm.bias)[None, :, None, None] ** 2
        assert_close(m(x), expected, "1×1 output")
        return
    assert_matches_equations(m, lambda x: ela_equation(m, x, shape[1], 16), x)


def test_unshared_silu_variant_with_bias_matches_equations():
    m = randomize(EfficientLocalAttention(C, 3, shared=False, norm_groups=1, act="silu", bias=True), double=True)
    assert {name for name, _ in m.named_parameters()} == {
        f"{layer}_{axis}.{p}" for layer in ("conv", "norm") for axis in "hw" for p in ("weight", "bias")}
    assert_matches_equations(m, lambda x: ela_equation(m, x, C, 1, F.silu), feature_map(2, C, 5, 8))


def test_explicit_numbers_override_the_version():
    m = EfficientLocalAttention(C, 3, variant="L", conv_groups=2, norm_groups=4)
    assert (m.conv.kernel_size, m.conv.groups, m.norm.num_groups) == ((3,), 2, 4)


@pytest.mark.parametrize("variant, per_channel", [("B", 7 + 2), ("T", 5 + 2), ("S", 8 * 5 + 2), ("L", 8 * 7 + 2)])
def test_parameter_count(variant, per_channel):
    # a (C, C/groups, k) convolution without bias and the GroupNorm's γ, β
    assert n_params(EfficientLocalAttention(64, variant=variant)) == 64 * per_channel


def test_sites_are_those_of_coordinate_attention():
    resnet = [s.after for s in attnkit.attach(attnkit.create_model("resnet50"), "ela")]
    assert resnet[:2] == ["layer1.0.bn3", "layer1.1.bn3"] and len(resnet) == 16
    mobile = [s.after for s in attnkit.attach(attnkit.create_model("mobilenet_v2"), "ela")]
    assert mobile[0] == "features.2.conv.1"  # after the depthwise stage, as Coordinate Attention


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"channels": 24}, ValueError, r"`norm_groups`=16 must divide the channel count 24; pass norm_groups=12"),
        ({"channels": 4, "variant": "S"}, ValueError, r"variant 'S' groups its convolution in C/8 groups, which needs "
                                                      r"at least 8 channels, got 4; pass conv_groups"),
        ({"channels": 32, "conv_groups": 3}, ValueError, r"`conv_groups`=3 must divide the channel count 32"),
        ({"channels": 32, "kernel_size": 4}, ValueError, r"`kernel_size` must be odd"),
        ({"channels": 32, "variant": "XL"}, ValueError, r"`variant` must be one of \['T', 'B', 'S', 'L'\], got 'XL'"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        EfficientLocalAttention(**kwargs)
