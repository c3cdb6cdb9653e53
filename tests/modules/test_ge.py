"""Gather-Excite (Hu et al., NeurIPS 2018) against its equations.

Checks: outputs and gradients of θ⁻ (global, extents 2 and 4), θ (global, extents 2 and 4) and θ⁺ (global,
extent 4) equal the gather / excite / sigmoid / nearest-upsample written out here, in eval and train mode;
closed-form parameter counts per variant; the error messages (spatial_size missing or not matching the
map, extent not a power of two, unknown variant, wrong channels, 3-D input, BatchNorm on one value).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.modules import GatherExcite

from .reference import TRAIN_MODES, assert_matches_equations, batch_norm, conv1x1, feature_map, n_params, randomize

C = 32  # θ⁺ needs C // 16 >= 2 hidden channels for a non-trivial excite MLP
SHAPE = (3, C, 7, 5)


def window_mean(x: torch.Tensor, e: int) -> torch.Tensor:
    """Average pooling, kernel 2e−1, stride e, padding e−1, padding excluded: each output (i, j) averages the
    rows e·i−(e−1) … e·i+(e−1) and columns likewise, clipped to the map."""
    h, w = x.shape[2:]
    rows = [range(max(0, e * i - (e - 1)), min(h, e * i + e)) for i in range(math.ceil(h / e))]
    cols = [range(max(0, e * j - (e - 1)), min(w, e * j + e)) for j in range(math.ceil(w / e))]
    return torch.stack(
        [torch.stack([x[:, :, r.start:r.stop, c.start:c.stop].mean((2, 3)) for c in cols], dim=2) for r in rows],
        dim=2,
    )


def upsample_nearest(g: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest neighbour: output row i reads row floor(i·h_in/h), column j reads floor(j·w_in/w)."""
    rows = torch.tensor([i * g.shape[2] // h for i in range(h)])
    cols = torch.tensor([j * g.shape[3] // w for j in range(w)])
    return g[:, :, rows][:, :, :, cols]


def theta_gather(m: GatherExcite, x: torch.Tensor, extent: int, train: bool) -> torch.Tensor:
    """Global: per-channel Σ w·x over the whole map, BN. Extent e: log2(e) × (3×3 depthwise conv, stride 2,
    padding 1, BN), ReLU between."""
    convs = [layer for layer in m.gather if isinstance(layer, nn.Conv2d)]
    bns = [layer for layer in m.gather if isinstance(layer, nn.BatchNorm2d)]
    if extent == 0:
        return batch_norm((convs[0].weight[:, 0] * x).sum((2, 3), keepdim=True), bns[0], train)
    assert len(convs) == len(bns) == int(math.log2(extent))
    v = x
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        v = batch_norm(F.conv2d(torch.relu(v) if i else v, conv.weight, stride=2, padding=1, groups=C), bn, train)
    return v


def ge_equation(m: GatherExcite, x: torch.Tensor, variant: str, extent: int, train: bool) -> torch.Tensor:
    if variant == "minus":
        gathered = x.mean((2, 3), keepdim=True) if extent == 0 else window_mean(x, extent)
    else:
        gathered = theta_gather(m, x, extent, train)
    if variant == "plus":  # ReLU, 1×1 conv C → C/16 (bias), ReLU, 1×1 conv → C (bias)
        gathered = conv1x1(torch.relu(conv1x1(torch.relu(gathered), m.excite[1])), m.excite[3])
    g = torch.sigmoid(gathered)
    return x * (upsample_nearest(g, *x.shape[2:]) if extent else g)


def build(variant: str, extent: int) -> GatherExcite:
    size = SHAPE[2:] if variant != "minus" and extent == 0 else None
    return randomize(GatherExcite(C, extent, variant=variant, spatial_size=size), double=True)


@TRAIN_MODES
@pytest.mark.parametrize(
    ("variant", "extent"),
    [("minus", 0), ("minus", 2), ("minus", 4), ("theta", 0), ("theta", 2), ("theta", 4), ("plus", 0), ("plus", 4)],
)
def test_matches_equations(variant, extent, train):
    m = build(variant, extent).train(train)
    assert_matches_equations(m, lambda x: ge_equation(m, x, variant, extent, train), feature_map(*SHAPE))


def test_theta_global_eval_with_batch_of_one_matches_equations():
    m = build("theta", 0).eval()
    assert_matches_equations(m, lambda x: ge_equation(m, x, "theta", 0, False), feature_map(1, *SHAPE[1:]))


def excite_params(c: int) -> int:
    hidden = c // 16
    return (c * hidden + hidden) + (hidden * c + c)


@pytest.mark.parametrize("channels", [16, 64, 256])
@pytest.mark.parametrize(
    ("variant", "extent", "expected"),
    [
        ("minus", 0, lambda c, h, w: 0),
        ("minus", 8, lambda c, h, w: 0),
        ("theta", 0, lambda c, h, w: c * h * w + 2 * c),  # one h×w depthwise kernel per channel + BN
        ("theta", 2, lambda c, h, w: 9 * c + 2 * c),  # one 3×3 depthwise conv + BN
        ("theta", 8, lambda c, h, w: 3 * (9 * c + 2 * c)),  # log2(8) = 3 of them
        ("plus", 0, lambda c, h, w: c * h * w + 2 * c + excite_params(c)),
        ("plus", 4, lambda c, h, w: 2 * (9 * c + 2 * c) + excite_params(c)),
    ],
)
def test_parameter_count(channels, variant, extent, expected):
    h, w = 14, 9
    size = (h, w) if variant != "minus" and extent == 0 else None
    m = GatherExcite(channels, extent, variant=variant, spatial_size=size)
    assert n_params(m) == expected(channels, h, w)


@pytest.mark.parametrize("variant", ["theta", "plus"])
def test_global_theta_without_spatial_size(variant):
    with pytest.raises(TypeError, match=r"need `spatial_size` \(H, W\)"):
        GatherExcite(8, variant=variant)


def test_global_theta_on_a_map_of_another_size_names_both_sizes():
    m = GatherExcite(8, variant="theta", spatial_size=(7, 5)).eval()
    with pytest.raises(ValueError, match=r"built for 7×5 maps.*got 6×5"):
        m(torch.randn(2, 8, 6, 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"extent": 3}, ValueError, r"`extent` must be 0 \(global\) or a power of two .*got 3"),
        ({"extent": -2}, ValueError, r"`extent` must be an integer >= 0, got -2"),
        ({"variant": "bogus"}, ValueError, r"`variant` must be one of \['minus', 'theta', 'plus'\], got 'bogus'"),
        ({"spatial_size": (7, 5)}, ValueError, r"`spatial_size` is only used by variants 'theta' and 'plus'"),
        ({"variant": "plus", "spatial_size": 7, "reduction": 0}, ValueError, r"`reduction` is the divisor r of C/r and must be >= 1, got 0"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        GatherExcite(8, **kwargs)


def test_theta_global_train_with_batch_of_one_says_batchnorm_cannot_train():
    m = GatherExcite(8, variant="theta", spatial_size=(4, 4)).train()
    with pytest.raises(ValueError, match="BatchNorm cannot train on one value"):
        m(torch.randn(1, 8, 4, 4))
