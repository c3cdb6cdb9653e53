"""Selective Kernel convolution (Li et al., CVPR 2019) against its equations.

Checks: outputs and gradients equal the two grouped paths (3×3 dilation 1 and dilation 2, BN, ReLU), the
fuse (U = ΣU_m, GAP, FC without bias, BN, ReLU) and the select (FC to M·C_out, softmax over the paths,
weighted sum) written out here, in eval and train mode, with stride 2, out_channels != channels and other
groups; d = max(C_out // 16, 32) and closed-form parameter counts; the error messages.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.modules import SelectiveKernel

from .reference import TRAIN_MODES, assert_matches_equations, batch_norm, conv1x1, feature_map, n_params, randomize

DILATIONS = (1, 2)  # path m: 3×3 conv with dilation d_m and padding d_m


def sk_equation(m: SelectiveKernel, x: torch.Tensor, stride: int, groups: int, train: bool) -> torch.Tensor:
    paths = []
    for d, (conv, bn, _) in zip(DILATIONS, m.paths):
        u = F.conv2d(x, conv.weight, stride=stride, padding=d, dilation=d, groups=groups)
        paths.append(torch.relu(batch_norm(u, bn, train)))
    s = sum(paths).mean((2, 3), keepdim=True)  # GAP(U), N×C_out×1×1
    z = torch.relu(batch_norm(conv1x1(s, m.fc_reduce), m.bn, train))
    logits = conv1x1(z, m.fc_select).reshape(x.shape[0], len(DILATIONS), -1, 1, 1)  # N×M×C_out×1×1
    a = torch.softmax(logits, dim=1)
    return sum(a[:, i] * u for i, u in enumerate(paths))


@TRAIN_MODES
@pytest.mark.parametrize(
    ("channels", "out_channels", "stride", "groups"),
    [(8, 8, 1, 4), (8, 12, 2, 4), (6, 10, 1, 1), (8, 16, 2, 8)],
)
def test_matches_equations(channels, out_channels, stride, groups, train):
    m = randomize(SelectiveKernel(channels, out_channels, stride, groups=groups), double=True).train(train)
    x = feature_map(3, channels, 7, 5)
    assert_matches_equations(m, lambda v: sk_equation(m, v, stride, groups, train), x)
    assert m(x).shape == (3, out_channels, 4 if stride == 2 else 7, 3 if stride == 2 else 5)


def test_eval_with_batch_of_one_matches_equations():
    m = randomize(SelectiveKernel(8, 12, 2, groups=4), double=True).eval()
    assert_matches_equations(m, lambda v: sk_equation(m, v, 2, 4, False), feature_map(1, 8, 7, 5))


@pytest.mark.parametrize(
    ("channels", "out_channels"), [(64, 64), (128, 128), (256, 256), (1024, 1024), (64, 128), (2048, 2048)]
)
def test_parameter_count(channels, out_channels):
    groups = 32
    d = max(out_channels // 16, 32)
    paths = 2 * (out_channels * (channels // groups) * 3 * 3 + 2 * out_channels)  # grouped conv + BN, per path
    fuse = out_channels * d + 2 * d  # W_z (no bias) + BN
    select = d * 2 * out_channels  # W_sel (no bias)
    m = SelectiveKernel(channels, out_channels)
    assert m.fc_reduce.out_channels == d
    assert n_params(m) == paths + fuse + select


def test_train_with_batch_of_one_says_batchnorm_cannot_train():
    with pytest.raises(ValueError, match="BatchNorm cannot train on one value"):
        SelectiveKernel(8, groups=4).train()(torch.randn(1, 8, 5, 5))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((48,), {}, ValueError, r"`groups`=32 must divide both channels=48 and out_channels=48"),
        ((64, 48), {}, ValueError, r"`groups`=32 must divide both channels=64 and out_channels=48"),
        ((8,), {"groups": 3}, ValueError, r"`groups`=3 must divide both channels=8 and out_channels=8"),
        ((8, None, 0), {"groups": 1}, ValueError, r"`stride` must be an integer >= 1, got 0"),
        ((8,), {"groups": 1, "dilations": (1,)}, ValueError, r"`dilations` must list two or more dilations"),
        ((8,), {"groups": 0}, ValueError, r"`groups` must be an integer >= 1, got 0"),
    ],
)
def test_bad_options(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        SelectiveKernel(*args, **kwargs)
