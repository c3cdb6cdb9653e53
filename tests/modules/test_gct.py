"""Gated Channel Transformation: the module against its equations (outputs and gradients, float64) in modes 'l2' and
'l1' (with and without `after_relu`), the identity at the official initialisation (α = 1, γ = 0, β = 0), the weight
decay the paper leaves off β, closed-form parameter counts and the error messages; in networks, one GCT on the input
of every convolution (the paper's and the official networks' placement), which traces, pickles, copies and folds."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import attnkit
from attnkit.analysis.gate_stats import channel_sites
from attnkit.analysis.prune import _l1_order, _sites
from attnkit.modules import GatedChannelTransformation
from attnkit.surgery import gates_before
from attnkit.train.optim import no_decay_names

from .reference import assert_matches_equations, feature_map, n_params, randomize

EPS = 1e-5
SHAPE = (3, 12, 7, 5)


def gct_gate(m: GatedChannelTransformation, x: torch.Tensor) -> torch.Tensor:
    """l2: s = α·sqrt(Σ_hw x² + ε), ŝ = γ·s / sqrt(mean_c s² + ε); l1: s = α·Σ_hw |x| (Σ x after ReLU),
    ŝ = γ·s / (mean_c |s| + ε); the gate 1 + tanh(ŝ + β), N×C×1×1."""
    if m.mode == "l2":
        s = m.alpha * torch.sqrt((x**2).sum((2, 3), keepdim=True) + EPS)
        s_hat = m.gamma * s / torch.sqrt((s**2).mean(1, keepdim=True) + EPS)
    else:
        s = m.alpha * (x if m.after_relu else x.abs()).sum((2, 3), keepdim=True)
        s_hat = m.gamma * s / (s.abs().mean(1, keepdim=True) + EPS)
    return 1 + torch.tanh(s_hat + m.beta)


def gct_equation(m: GatedChannelTransformation, x: torch.Tensor) -> torch.Tensor:
    """y = x·(1 + tanh(ŝ + β))."""
    return x * gct_gate(m, x)


@pytest.mark.parametrize("kwargs", [{}, {"mode": "l1"}, {"mode": "l1", "after_relu": True}], ids=["l2", "l1", "l1-relu"])
def test_matches_equations(kwargs):
    m = randomize(GatedChannelTransformation(SHAPE[1], **kwargs), double=True)
    x = feature_map(*SHAPE)
    if kwargs.get("after_relu"):
        x = x.detach().relu().requires_grad_()
    assert_matches_equations(m, lambda x: gct_equation(m, x), x)


@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (2, 7, 4, 9)], ids=["1x1", "4x9"])
def test_matches_equations_on_other_shapes(shape):
    m = randomize(GatedChannelTransformation(shape[1]), double=True)
    assert_matches_equations(m, lambda x: gct_equation(m, x), feature_map(*shape))


@pytest.mark.parametrize("mode", ["l2", "l1"])
def test_official_initialisation_is_the_identity(mode):
    m = GatedChannelTransformation(16, mode=mode)
    assert all(p.shape == (1, 16, 1, 1) for p in m.parameters())
    assert (m.alpha == 1).all() and (m.gamma == 0).all() and (m.beta == 0).all()
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(m(x), x)  # γ = 0: ŝ = 0, the gate 1 + tanh(0) = 1


def test_beta_is_trained_without_weight_decay():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), GatedChannelTransformation(8))
    exempt = no_decay_names(net)
    assert "1.beta" in exempt and "1.alpha" not in exempt and "1.gamma" not in exempt
    assert GatedChannelTransformation(8, beta_weight_decay=True).no_weight_decay() == set()


@pytest.mark.parametrize("c", [3, 64, 2048])
def test_parameter_count(c):
    assert n_params(GatedChannelTransformation(c)) == 3 * c  # α, γ, β per channel


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mode": "l3"}, ValueError, r"`mode` must be one of \['l2', 'l1'\], got 'l3'"),
        ({"after_relu": True}, ValueError, r"`after_relu` only changes mode 'l1'"),
        ({"eps": -1.0}, ValueError, r"`eps` must be a number in \(0, 1\]"),
        ({"eps": "1e-5"}, ValueError, r"`eps` must be a number"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        GatedChannelTransformation(8, **kwargs)


# ---------------------------------------------------------------------------------------------- in networks
def _active(model: torch.nn.Module) -> torch.nn.Module:
    """Random γ, β in every GCT (γ = 0 at initialisation makes each one the identity) and random BN statistics."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedChannelTransformation):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=g))
                m.beta.copy_(torch.randn(m.beta.shape, generator=g))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_gct_resnet50_has_one_before_every_convolution():
    """As the paper and both official networks: before the stem's convolution, each bottleneck's three and each
    projection shortcut's, on the convolution's input, with its input's channel count."""
    plain = attnkit.create_model("resnet50")
    convs = {name: m.in_channels for name, m in plain.named_modules() if isinstance(m, torch.nn.Conv2d)}
    report = attnkit.attach(plain, "gct")
    assert sorted(s.after for s in report) == sorted(convs) and len(report) == 53
    assert all(s.position == "before" and s.channels == convs[s.after] for s in report)
    assert report.sites[0].after == "conv1" and report.sites[0].channels == 3
    # 3 parameters per input channel: Σ C_in = 22,531 (3 + Σ over the bottlenecks of 2·planes + C_in + projections)
    assert report.params_added == 3 * sum(convs.values()) == 3 * 22_531 == 67_593
    assert n_params(attnkit.create_model("resnet50", attn="gct")) == 25_557_032 + 67_593  # 25.62M
    assert "(before) layer1.0.conv2" in str(report)


def test_lenet_takes_one_before_each_convolution():
    report = attnkit.attach(attnkit.create_model("lenet"), "gct")
    assert [(s.after, s.channels) for s in report] == [("conv1", 1), ("conv2", 6)]


def test_at_initialisation_the_network_is_unchanged_and_gates_change_it():
    torch.manual_seed(0)
    plain = attnkit.create_model("resnet18", num_classes=5).eval()
    net = copy.deepcopy(plain)
    attnkit.attach(net, "gct")
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
        assert not torch.allclose(_active(net)(x), plain(x), rtol=1e-3, atol=1e-3)


def test_gates_on_inputs_trace_pickle_copy_and_fold():
    torch.manual_seed(0)
    net = _active(attnkit.create_model("resnet20", attn="gct", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(net)(x), y, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(net)(x), y, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), y, rtol=0, atol=0)
        fused = attnkit.fuse(net)  # every BN folds into its convolution, which keeps the GCT on its input
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert [type(g) for g in gates_before(fused.layer1[0].conv2)] == [GatedChannelTransformation]
        assert gates_before(fused.layer1[0].conv2)[0] is fused.layer1[0].get_submodule("attn1")
        # folding rounds every convolution differently: 20 layers of it, 1e-4 (AVX2 kernels reach 3e-5)
        torch.testing.assert_close(fused(x), y, rtol=1e-4, atol=1e-4)
    assert "input through GatedChannelTransformation" in repr(net.layer1[0].conv1)


def test_named_sites_gate_the_named_layers_input_by_default():
    model = attnkit.create_model("resnet18")
    report = attnkit.attach(model, "gct", where=["layer1.0.conv2", "layer2.0.conv1"])
    assert [(s.after, s.channels, s.position) for s in report] == [("layer1.0.conv2", 64, "before"),
                                                                   ("layer2.0.conv1", 64, "before")]
    after = attnkit.attach(attnkit.create_model("resnet18"), "gct", where=["layer2.0.conv1"], position="after")
    assert [(s.after, s.channels, s.position) for s in after] == [("layer2.0.conv1", 128, "after")]
    with pytest.raises(ValueError, match="already has an attention module on its input; pass allow_multiple=True"):
        attnkit.attach(model, "gct", where=["layer1.0.conv2"])
    with pytest.raises(ValueError, match=r"position='before' needs named sites"):
        attnkit.attach(attnkit.create_model("resnet18"), "se", position="before")


def test_every_beta_in_a_network_is_exempt_from_weight_decay():
    net = attnkit.create_model("resnet18", attn="gct")
    exempt = no_decay_names(net)
    betas = {name for name in dict(net.named_parameters()) if name.endswith(".beta")}
    assert len(betas) == 20 and betas <= exempt  # 1 + 2·8 + 3 convolutions
    assert not any(name.endswith((".alpha", ".gamma")) for name in exempt)


def test_prune_ranks_a_gcts_channels_by_the_convolution_that_reads_them():
    """attnkit prune's L1 baseline: for a GCT, the L1 norm of the weights of the convolution it feeds, per input
    channel (there may be no convolution producing them: the stem's GCT reads the image)."""
    net = attnkit.create_model("resnet20", attn="gct", num_classes=10).eval()
    sites = {s.gate: s for s in _sites(net, channel_sites(net), torch.randn(2, 3, 32, 32))}
    stem, site = sites["attn"], sites["layer1.0.attn1"]  # before conv1 (the image), before layer1.0.conv2
    assert (stem.convs, stem.channels, stem.reads) == (("conv1",), 3, True)
    assert (site.convs, site.channels, site.reads) == (("layer1.0.conv2",), 16, True)
    weights = net.layer1[0].conv2.weight.detach().double()
    expected = np.argsort(weights.abs().sum((0, 2, 3)).numpy(), kind="stable")
    np.testing.assert_array_equal(_l1_order(net, site), expected)
