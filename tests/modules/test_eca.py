"""Efficient Channel Attention: the module against its equations (outputs and gradients, float64), the
paper's adaptive kernel size and the `kernel_size` override, parameter counts, and the error messages."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.modules import ECA, eca_kernel_size

from .reference import assert_matches_equations, feature_map, n_params, randomize

# t = int(|log2(C)/2 + 1/2|), k = t if t is odd else t + 1, worked by hand:
PAPER_KERNELS = {
    8: 3,  # 3/2 + 1/2 = 2 -> 3
    16: 3,  # 2 + 0.5 = 2.5 -> 2 -> 3
    64: 3,  # 3 + 0.5 -> 3
    256: 5,  # 4 + 0.5 -> 4 -> 5
    512: 5,  # 4.5 + 0.5 = 5
    1024: 5,  # 5 + 0.5 -> 5
    2048: 7,  # 5.5 + 0.5 = 6 -> 7
}


def paper_kernel(c, gamma, b):
    t = int(abs(math.log2(c) / gamma + b / gamma))
    return t if t % 2 else t + 1


def eca_reference(m, k):
    """s = σ(Σ_u w[u] · pad(GAP(x))[c + u]), zero padding (k − 1)/2 on both ends of the channel axis."""

    def forward(x):
        c = x.shape[1]
        w = m.conv.weight[0, 0]
        padded = F.pad(x.mean((2, 3)), ((k - 1) // 2, (k - 1) // 2))
        z = sum(w[u] * padded[:, u : u + c] for u in range(k))
        return x * torch.sigmoid(z)[:, :, None, None]

    return forward


@pytest.mark.parametrize("c, kernel_size, k", [(256, None, 5), (48, 5, 5), (48, 3, 3), (37, 1, 1)])
def test_matches_equations(c, kernel_size, k):
    m = randomize(ECA(c, kernel_size), double=True)
    assert m.conv.weight.shape == (1, 1, k) and m.conv.bias is None
    assert_matches_equations(m, eca_reference(m, k), feature_map(3, c, 7, 5))


def test_paper_kernel_table():
    assert {c: eca_kernel_size(c) for c in PAPER_KERNELS} == PAPER_KERNELS
    assert {c: ECA(c).kernel_size for c in PAPER_KERNELS} == PAPER_KERNELS
    assert {c: ECA(c).conv.weight.numel() for c in PAPER_KERNELS} == PAPER_KERNELS


@pytest.mark.parametrize("gamma, b", [(2, 1), (3, 2), (1.5, 0.5)])
def test_kernel_formula_over_many_widths(gamma, b):
    widths = range(1, 4097, 7)
    assert [eca_kernel_size(c, gamma, b) for c in widths] == [paper_kernel(c, gamma, b) for c in widths]
    assert ECA(300, gamma=gamma, beta=b).kernel_size == paper_kernel(300, gamma, b)


def test_kernel_size_override():
    m = ECA(2048, kernel_size=3)  # the formula would give 7
    assert m.kernel_size == 3 and m.conv.weight.shape == (1, 1, 3) and m.conv.padding == (1,)


@pytest.mark.parametrize("c", [16, 64, 256, 2048])
def test_parameter_count(c):
    assert n_params(ECA(c)) == PAPER_KERNELS[c]  # one k-tap kernel, no bias
    assert n_params(ECA(c, kernel_size=9)) == 9


def test_eca_resnet50_added_parameters():
    # One ECA per bottleneck; the released checkpoints use per-stage k = 3, 5, 5, 7.
    blocks = [(256, 3)] * 3 + [(512, 5)] * 4 + [(1024, 5)] * 6 + [(2048, 7)] * 3
    assert sum(n_params(ECA(c, kernel_size=k)) for c, k in blocks) == 3 * 3 + 4 * 5 + 6 * 5 + 3 * 7 == 80
    # With the formula instead: k = 5, 5, 5, 7 -> 86. Both are "under a hundred".
    assert sum(n_params(ECA(c)) for c, _ in blocks) == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7 == 86


def test_bad_options():
    with pytest.raises(ValueError, match=r"`kernel_size` must be odd so the padding is symmetric, got 4"):
        ECA(64, kernel_size=4)
    with pytest.raises(ValueError, match=r"`kernel_size` must be an integer >= 1, got 0"):
        ECA(64, kernel_size=0)
    with pytest.raises(ValueError, match=r"`gamma` must be a positive finite number, got 0"):
        ECA(64, gamma=0)
