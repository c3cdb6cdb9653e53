"""GAM (Liu, Shao & Hoffmann, 2021) against its equations.

Checks: outputs and gradients equal the per-position channel MLP and the two 7×7 convolutions written out here
(float64), in eval and train mode, without the BNs, and with grouped convolutions and a channel shuffle between them;
closed-form parameter counts, tied to a network build, and the 149.5M of a CIFAR-100 ResNet-50 with GAM (r = 16,
dense convolutions); the errors.
"""
from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.modules import GAM

from .reference import TRAIN_MODES, assert_matches_equations, batch_norm, conv1x1, conv2d_same, feature_map, n_params
from .reference import randomize

C = 16


def dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight (out × in/groups × k × k) as the dense block-diagonal one (out × in × k × k)."""
    out, per_group = weight.shape[:2]
    full = weight.new_zeros(out, per_group * groups, *weight.shape[2:])
    step = out // groups
    for g in range(groups):
        full[g * step:(g + 1) * step, g * per_group:(g + 1) * per_group] = weight[g * step:(g + 1) * step]
    return full


def gam_equation(m: GAM, x: torch.Tensor, train: bool, norm: bool = True) -> torch.Tensor:
    """Mc = σ(W₂ ReLU(W₁ x_ij + b₁) + b₂) at every position; F₂ = x·Mc; Ms = σ(BN(conv(ReLU(BN(conv(F₂)))))), the
    hidden channels shuffled between grouped convolutions; y = F₂·Ms."""
    f2 = x * torch.sigmoid(conv1x1(torch.relu(conv1x1(x, m.fc1)), m.fc2))
    hidden = conv2d_same(f2, dense(m.conv1.weight, m.groups), m.conv1.bias)
    hidden = torch.relu(batch_norm(hidden, m.bn1, train) if norm else hidden)
    if m.groups > 1:  # hidden channel g·(h/G) + k moves to k·G + g
        h = hidden.shape[1]
        hidden = hidden[:, [g * (h // m.groups) + k for k in range(h // m.groups) for g in range(m.groups)]]
    logits = conv2d_same(hidden, dense(m.conv2.weight, m.groups), m.conv2.bias)
    return f2 * torch.sigmoid(batch_norm(logits, m.bn2, train) if norm else logits)


@TRAIN_MODES
@pytest.mark.parametrize("shape", [(3, C, 7, 5), (2, C, 4, 9)], ids=lambda s: f"{s[2]}x{s[3]}")
def test_matches_equations(train, shape):
    m = randomize(GAM(C, reduction=4, kernel_size=3), double=True).train(train)
    # the convolutions' biases are followed by BatchNorms: their gradients vanish in training
    zero_grads = frozenset({"conv1.bias", "conv2.bias"}) if train else frozenset()
    assert_matches_equations(m, lambda x: gam_equation(m, x, train), feature_map(*shape), zero_grads=zero_grads)


def test_default_seven_by_seven_matches_equations():
    m = randomize(GAM(C, hidden_channels=4), double=True).eval()
    assert m.conv1.kernel_size == (7, 7) and m.conv1.padding == (3, 3)
    assert_matches_equations(m, lambda x: gam_equation(m, x, False), feature_map(2, C, 9, 8))


def test_without_norm_matches_equations():
    m = randomize(GAM(C, reduction=4, kernel_size=3, spatial_norm=False), double=True).train()
    assert isinstance(m.bn1, torch.nn.Identity) and isinstance(m.bn2, torch.nn.Identity)
    assert_matches_equations(m, lambda x: gam_equation(m, x, True, norm=False), feature_map(2, C, 6, 5))


@TRAIN_MODES
def test_grouped_convolutions_with_a_shuffle_match_equations(train):
    m = randomize(GAM(C, reduction=2, kernel_size=3, groups=4), double=True).train(train)
    assert m.conv1.groups == m.conv2.groups == 4
    zero_grads = frozenset({"conv1.bias", "conv2.bias"}) if train else frozenset()
    assert_matches_equations(m, lambda x: gam_equation(m, x, train), feature_map(3, C, 5, 6), zero_grads=zero_grads)


def gam_params(c: int, r: int = 16, k: int = 7, groups: int = 1) -> int:
    h = c // r  # MLP (with biases), two k×k convolutions (with biases), two BNs
    return (2 * c * h + h + c) + (k * k * c * h // groups + h) + 2 * h + (k * k * h * c // groups + c) + 2 * c


@pytest.mark.parametrize(("channels", "groups"), [(64, 1), (256, 1), (256, 4), (512, 2)])
def test_parameter_count(channels, groups):
    assert n_params(GAM(channels, groups=groups)) == gam_params(channels, groups=groups)


def test_a_network_build_adds_the_closed_form():
    net, plain = attnkit.create_model("resnet18", attn="gam"), attnkit.create_model("resnet18")
    widths = [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2  # after bn2 of each basic block, before the addition
    assert n_params(net) - n_params(plain) == sum(gam_params(c) for c in widths)
    assert [s for s, m in net.named_modules() if isinstance(m, GAM)][:1] == ["layer1.0.attn"]


def test_cifar100_resnet50_count():
    """149.5M: the figure the EMA repository's table gives for GAM in a CIFAR-100 ResNet-50 (23.71M; one GAM per
    bottleneck on its output width, r = 16, dense convolutions)."""
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    cifar_resnet50 = 23_705_252  # a 3×3 stem without max pooling, 100 classes
    assert round((cifar_resnet50 + sum(gam_params(c) for c in widths)) / 1e6, 1) == 149.5


def test_bad_options():
    with pytest.raises(ValueError, match=r"`groups` = 3 must divide both the channels \(16\) and the hidden width"):
        GAM(C, reduction=2, groups=3)
    with pytest.raises(ValueError, match=r"`kernel_size` must be odd"):
        GAM(C, kernel_size=4)
    with pytest.raises(ValueError, match=r"`reduction` is the divisor r of C/r"):
        GAM(C, reduction=0.5)


def test_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match=r"GAM was built for 16 channels but the input has 8"):
        GAM(C)(torch.randn(2, 8, 5, 5))
