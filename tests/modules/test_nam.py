"""NAM (Liu et al., 2021) against its equations.

Checks: outputs and gradients equal the BatchNorm-weighted gate written out here (float64), in eval and train mode:
the released code's weights |γ|/Σ|γ| with no gradient through them, and the paper's γ/Σγ with it; the spatial
pixel-normalisation submodule (one BatchNorm feature per position) with its fixed map size; the L1 sparsity term;
folding the BatchNorms; parameter counts; the errors.
"""
from __future__ import annotations

import pytest
import torch

from attnkit.modules import NAM

from .reference import TRAIN_MODES, BN_EPS, assert_close, assert_matches_equations, batch_norm, feature_map, n_params
from .reference import randomize

C = 6


def share(scale: torch.Tensor, detach: bool, absolute: bool) -> torch.Tensor:
    """w_i = |γ_i| / Σ_j |γ_j| (released code, read from .data: detached), or γ_i / Σ_j γ_j (paper)."""
    scale = scale.detach() if detach else scale
    scale = scale.abs() if absolute else scale
    return scale / scale.sum()


def pixel_batch_norm(y: torch.Tensor, bn: torch.nn.BatchNorm1d, train: bool) -> torch.Tensor:
    """One feature per position p: y[:, :, p] normalised over the batch and the channels, then λ_p·v + β_p."""
    n, c, h, w = y.shape
    flat = y.reshape(n, c, h * w)
    if train:
        mean = flat.mean((0, 1), keepdim=True)
        var = ((flat - mean) ** 2).mean((0, 1), keepdim=True)
    else:
        mean, var = bn.running_mean[None, None], bn.running_var[None, None]
    return ((flat - mean) / torch.sqrt(var + BN_EPS) * bn.weight + bn.bias).reshape(n, c, h, w)


def nam_equation(m: NAM, x: torch.Tensor, train: bool, detach: bool = True, absolute: bool = True) -> torch.Tensor:
    """Mc = σ(w_γ ⊙ BN(x)), y = x·Mc; with the spatial submodule Ms = σ(w_λ ⊙ BN_s(y)), y·Ms."""
    w = share(m.bn.weight, detach, absolute)
    y = x * torch.sigmoid(batch_norm(x, m.bn, train) * w[None, :, None, None])
    if m.pixel_bn is None:
        return y
    w_pixel = share(m.pixel_bn.weight, detach, absolute).reshape(y.shape[2:])
    return y * torch.sigmoid(pixel_batch_norm(y, m.pixel_bn, train) * w_pixel)


@TRAIN_MODES
@pytest.mark.parametrize("shape", [(3, C, 7, 5), (2, C, 1, 9)], ids=lambda s: f"{s[2]}x{s[3]}")
def test_matches_equations(train, shape):
    m = randomize(NAM(C), double=True).train(train)
    assert_matches_equations(m, lambda x: nam_equation(m, x, train), feature_map(*shape, scale=2.0))


@TRAIN_MODES
def test_the_papers_weights_match_equations(train):
    m = randomize(NAM(C, detach_weights=False, abs_weights=False), double=True).train(train)
    x = feature_map(3, C, 7, 5, scale=2.0)
    assert_matches_equations(m, lambda v: nam_equation(m, v, train, detach=False, absolute=False), x)


def test_the_released_weights_pass_no_gradient_to_the_scale():
    """The released code reads w_γ from .data: γ's gradient is only the one through the BN's own output."""
    m = randomize(NAM(C), double=True).eval()
    x = feature_map(2, C, 5, 4).detach()
    (grad,) = torch.autograd.grad(m(x).sum(), [m.bn.weight])
    z = (x - m.bn.running_mean[:, None, None]) / torch.sqrt(m.bn.running_var[:, None, None] + BN_EPS)
    w = share(m.bn.weight, True, True)[:, None, None]
    logits = (z * m.bn.weight[:, None, None] + m.bn.bias[:, None, None]) * w
    through_bn = (x * torch.sigmoid(logits) * (1 - torch.sigmoid(logits)) * w * z).sum((0, 2, 3))
    assert_close(grad, through_bn, "γ's gradient")


@TRAIN_MODES
def test_spatial_submodule_matches_equations(train):
    m = randomize(NAM(C, spatial_size=(7, 5)), double=True).train(train)
    assert m.pixel_bn.num_features == 35 and m.fixed_spatial_size == (7, 5)
    assert_matches_equations(m, lambda x: nam_equation(m, x, train), feature_map(3, C, 7, 5, scale=2.0))


def test_spatial_submodule_takes_one_size():
    with pytest.raises(ValueError, match=r"built for 7×5 maps .*got 5×7\. Build it with spatial_size=\(5, 7\)"):
        NAM(C, spatial_size=(7, 5)).eval()(torch.randn(2, C, 5, 7))


def test_sparsity_penalty_is_the_l1_norm_of_the_scales():
    m = randomize(NAM(C, spatial_size=4))
    assert torch.equal(m.sparsity_penalty(), m.bn.weight.abs().sum() + m.pixel_bn.weight.abs().sum())
    m = randomize(NAM(C))
    assert torch.equal(m.sparsity_penalty(), m.bn.weight.abs().sum())
    m.sparsity_penalty().backward()
    assert torch.equal(m.bn.weight.grad, torch.sign(m.bn.weight))  # the official updateBN's s·sign(γ), with s = 1


@pytest.mark.parametrize("spatial_size", [None, (6, 5)])
def test_folding_the_batchnorms_keeps_the_function(spatial_size):
    m = randomize(NAM(C, spatial_size=spatial_size), double=True).eval()
    x = feature_map(2, C, 6, 5).detach()
    expected = m(x)
    m.fold_batchnorm()
    assert not any(isinstance(b, torch.nn.modules.batchnorm._BatchNorm) for b in m.modules())
    assert n_params(m) == 0  # the folded affine maps are buffers of the inference copy
    assert_close(m(x), expected, "folded output")


@pytest.mark.parametrize("channels", [16, 256, 2048])
def test_parameter_count(channels):
    assert n_params(NAM(channels)) == 2 * channels  # the BN's γ and β
    assert n_params(NAM(channels, spatial_size=(7, 7))) == 2 * channels + 2 * 49


def test_resnet50_added_parameters():
    # One NAM per bottleneck before the residual addition, on its output width
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert sum(n_params(NAM(c)) for c in widths) == 2 * sum(widths) == 30_208


def test_train_with_batch_of_one_on_a_pixel_says_batchnorm_cannot_train():
    with pytest.raises(ValueError, match="BatchNorm cannot train on one value"):
        NAM(C).train()(torch.randn(1, C, 1, 1))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"spatial_size": (7,)}, TypeError, r"`spatial_size` must be the \(H, W\)"),
    ({"spatial_size": (0, 3)}, ValueError, r"`spatial_size` must be an integer >= 1, got 0"),
    ({"gate": "sigmod"}, ValueError, r"`gate` must be one of .*Did you mean 'sigmoid'"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        NAM(C, **kwargs)
