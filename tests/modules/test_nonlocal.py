"""Non-local block (Wang et al., CVPR 2018) against its equations.

Checks: outputs and gradients equal the four pairwise functions written out here (float64), in eval and train mode,
with the official code's scale and pooling before φ and g, and the paper's pooling after them or none; the official
initialisation (a fresh block is exactly the identity); a side of 1 is not pooled; placement after every other block
of res3 and res4 (the paper's 5-block ResNet-50) and its parameter count; the errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision

import attnkit
from attnkit.modules import NonLocal

from .reference import TRAIN_MODES, assert_matches_equations, batch_norm, conv1x1, feature_map, n_params, randomize

C = 8
RESNET50 = 25_557_032


def max_pool_2x2(v: torch.Tensor) -> torch.Tensor:
    """The largest of each 2×2 window at stride 2 (a last odd row or column dropped); a side of 1 is kept."""
    h, w = v.shape[2:]
    rows = [v[:, :, i:2 * (h // 2):2] for i in range(2)] if h > 1 else [v]
    windows = [r[:, :, :, j:2 * (w // 2):2] for r in rows for j in range(2)] if w > 1 else rows
    return torch.stack(windows).amax(0)


def nonlocal_equation(m: NonLocal, x: torch.Tensor, train: bool, kind: str = "embedded_gaussian",
                      subsample: str = "before", scale: float | None = None) -> torch.Tensor:
    """z = x + BN(W_z y) (x + W_z y without the BN), y_i = Σ_j f(x_i, x̂_j) g(x̂_j) / C(x): softmax_j(s·θ_iᵀφ_j) for the Gaussian forms, θ_iᵀφ_j / N
    for the dot product, ReLU(w_θᵀθ_i + w_φᵀφ_j) / N for the concatenation; x̂ pooled before φ and g ('before') or
    φ(x), g(x) pooled ('after')."""
    n, c, h, w = x.shape
    pooled = max_pool_2x2(x) if subsample == "before" else x
    theta = x if kind == "gaussian" else conv1x1(x, m.theta)
    phi = pooled if kind == "gaussian" else conv1x1(pooled, m.phi)
    g = conv1x1(pooled, m.g)
    if subsample == "after":
        phi, g = max_pool_2x2(phi), max_pool_2x2(g)
    t, p, v = theta.flatten(2), phi.flatten(2), g.flatten(2)  # N×d×(H·W), N×d×(h·w), N×d×(h·w)
    positions = p.shape[2]
    if kind == "concatenation":
        w_f = m.attend.concat_project.weight.flatten()
        a = torch.einsum("c,ncl->nl", w_f[:t.shape[1]], t)
        b = torch.einsum("c,ncl->nl", w_f[t.shape[1]:], p)
        f = torch.relu(a[:, :, None] + b[:, None, :]) / positions
    else:
        logits = torch.einsum("nci,ncj->nij", t, p)
        if kind == "dot_product":
            f = logits / positions
        else:
            s = 1 / math.sqrt(t.shape[1]) if scale is None else scale
            e = torch.exp(s * logits - (s * logits).amax(2, keepdim=True))
            f = e / e.sum(2, keepdim=True)
    y = torch.einsum("nij,ncj->nci", f, v).reshape(n, -1, h, w)
    z = conv1x1(y, m.w_z)
    return x + (batch_norm(z, m.norm, train) if isinstance(m.norm, torch.nn.BatchNorm2d) else z)


@TRAIN_MODES
@pytest.mark.parametrize("kind", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
@pytest.mark.parametrize("subsample", ["before", "after", "none"])
def test_matches_equations(kind, subsample, train):
    m = randomize(NonLocal(C, pairwise=kind, subsample=subsample), double=True).train(train)
    zero_grads = set()
    if train:
        zero_grads.add("w_z.bias")  # followed by the BatchNorm
        if kind in ("embedded_gaussian", "gaussian"):
            zero_grads.add("g.bias")  # the softmax weights sum to 1: it adds the same vector at every position
    if kind == "embedded_gaussian":
        zero_grads.add("phi.bias")  # adds θ_iᵀb to every logit of row i: the softmax over j ignores it
    x = feature_map(3, C, 7, 6)
    assert_matches_equations(m, lambda v: nonlocal_equation(m, v, train, kind, subsample), x,
                             zero_grads=frozenset(zero_grads))


@pytest.mark.parametrize("scale", [False, 0.25])
def test_scale_options_match_equations(scale):
    m = randomize(NonLocal(C, scale=scale), double=True).eval()
    x = feature_map(2, C, 6, 5)
    assert_matches_equations(m, lambda v: nonlocal_equation(m, v, False, scale=1.0 if scale is False else scale), x,
                             zero_grads=frozenset({"phi.bias"}))


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (5, 1), (2, 2), (3, 3)])
def test_a_side_of_one_is_not_pooled(size):
    m = randomize(NonLocal(C), double=True).eval()
    one_key = max_pool_2x2(torch.zeros(1, 1, *size)).numel() == 1  # the softmax over one position is 1: θ, φ idle
    zero_grads = {"theta.weight", "theta.bias", "phi.weight", "phi.bias"} if one_key else {"phi.bias"}
    assert_matches_equations(m, lambda v: nonlocal_equation(m, v, False), feature_map(2, C, *size),
                             zero_grads=frozenset(zero_grads))


@TRAIN_MODES
def test_without_norm_matches_equations(train):
    m = randomize(NonLocal(C, norm=False), double=True).train(train)
    assert isinstance(m.norm, torch.nn.Identity)
    assert_matches_equations(m, lambda v: nonlocal_equation(m, v, train), feature_map(2, C, 6, 5),
                             zero_grads=frozenset({"phi.bias"}))


@pytest.mark.parametrize("kind", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
@pytest.mark.parametrize("norm", [True, False])
def test_a_fresh_block_is_exactly_the_identity(kind, norm):
    torch.manual_seed(0)
    m = NonLocal(32, pairwise=kind, norm=norm)
    for name, p in m.named_parameters():  # the official initialisation: N(0, 0.01²) weights, zero biases, BN γ = 0
        if name.endswith("bias") or name == "norm.weight" or (name == "w_z.weight" and not norm):
            assert (p == 0).all(), name
        else:
            assert 0.007 < float(p.detach().std()) < 0.013, name
    x = torch.randn(2, 32, 7, 6)
    assert torch.equal(m(x), x) and torch.equal(m.train()(x), x)


def nonlocal_params(c: int) -> int:
    inner = c // 2  # θ, φ, g: C → C/2 with biases; W_z: C/2 → C with bias; BN over C
    return 3 * (c * inner + inner) + (inner * c + c) + 2 * c


def test_the_papers_resnet50_has_five_blocks_in_res3_and_res4():
    net = torchvision.models.resnet50()
    report = attnkit.attach(net, "nonlocal")
    assert [s.after for s in report] == ["layer2.1", "layer2.3", "layer3.1", "layer3.3", "layer3.5"]
    assert [s.channels for s in report] == [512, 512, 1024, 1024, 1024]
    widths = [512] * 2 + [1024] * 3
    assert n_params(net) == RESNET50 + sum(nonlocal_params(c) for c in widths) == RESNET50 + 7_358_464
    assert n_params(attnkit.create_model("resnet50", attn="nonlocal")) == n_params(net)


@pytest.mark.parametrize("channels", [16, 512, 1024])
def test_parameter_count(channels):
    assert n_params(NonLocal(channels)) == nonlocal_params(channels)
    assert n_params(NonLocal(channels, pairwise="concatenation")) == nonlocal_params(channels) + channels
    assert n_params(NonLocal(channels, pairwise="gaussian")) == nonlocal_params(channels) - 2 * (channels * channels // 2 + channels // 2)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"pairwise": "embedded"}, ValueError, r"`pairwise` must be one of \['embedded_gaussian', 'gaussian', "
                                           r"'dot_product', 'concatenation'\], got 'embedded'"),
    ({"subsample": True}, TypeError, r"`subsample` must be one of \['before', 'after', 'none'\]"),
    ({"scale": -1.0}, ValueError, r"`scale` must be True \(1/√d\), False \(1\) or a number in \(0, 1\], got -1.0"),
    ({"scale": 2}, ValueError, r"`scale` must be True \(1/√d\), False \(1\) or a number in \(0, 1\], got 2"),
    ({"reduction": 0}, ValueError, r"`reduction` is the divisor r of C/r"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        NonLocal(C, **kwargs)


def test_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match=r"NonLocal was built for 8 channels but the input has 16"):
        NonLocal(C)(torch.randn(2, 16, 5, 5))
