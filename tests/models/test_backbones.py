"""create_model(): every backbone with every module builds and trains a step; the plain ImageNet models are
torchvision's (same parameter names and counts); attention versions have the published parameter counts."""
from __future__ import annotations

import functools

import attnkit
import pytest
import torch
import torchvision

CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2"]
# every module runs on these in the default suite; the other backbones run every module under `slow`
FAST = {"lenet", "resnet20", "resnet18", "mobilenet_v2"}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_for(model: str) -> torch.Tensor:
    if model == "lenet":
        return torch.randn(2, 1, 28, 28)
    return torch.randn(2, 3, *((32, 32) if model in CIFAR else (48, 40)))


@functools.cache
def plain_params(model: str) -> int:
    return n_params(attnkit.create_model(model, num_classes=7))


# EMA's 32 groups and Shuffle Attention's 2·64 do not divide LeNet's 6 and 16 channels or resnet20's 16: groups that do
NARROW = {"ema": "ema(groups=2)", "shuffle": "shuffle(groups=1)"}
PARAMETER_FREE = {"ge", "simam"}  # Gather-Excite θ⁻ and SimAM
# Grouped modules whose default groups do not divide a narrow backbone's widths (LeNet's 6 channels, the CIFAR
# ResNets' 16-64, MobileNetV2's 96-960) run there with groups that do; their defaults refuse with a clear error.
FITTED = {("lenet", "sge"): "sge(groups=2)", ("lenet", "fca"): "fca(frequencies='top2')",
          ("lenet", "ela"): "ela(norm_groups=2)", ("mobilenet_v2", "sge"): "sge(groups=16)",
          **{(model, "sge"): "sge(groups=16)" for model in CIFAR}}


def _combinations():
    for model in attnkit.list_models():
        for attn in [None, *attnkit.list_modules()]:
            marks = [pytest.mark.slow] if model not in FAST and attn is not None else []
            yield pytest.param(model, NARROW.get(attn, attn), marks=marks, id=f"{model}-{attn}")


@pytest.mark.parametrize("model, attn", list(_combinations()))
def test_every_backbone_with_every_module_trains_a_step(model, attn):
    torch.manual_seed(0)
    net = attnkit.create_model(model, attn=FITTED.get((model, attn), attn), num_classes=7)
    x = input_for(model)
    logits = net(x)
    assert logits.shape == (2, 7)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if attn is not None:
        assert (n_params(net) == plain_params(model)) == (attn in PARAMETER_FREE)


@pytest.mark.parametrize("model, attn", sorted(FITTED))
def test_grouped_defaults_that_do_not_fit_a_backbone_say_what_to_pass(model, attn):
    with pytest.raises(ValueError, match=r"must divide the channel count|does not divide the channel count"):
        attnkit.create_model(model, attn=attn)


@pytest.mark.parametrize("name", IMAGENET)
def test_plain_models_are_torchvisions(name):
    ours, theirs = attnkit.create_model(name), getattr(torchvision.models, name)()
    assert n_params(ours) == n_params(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict: every key and shape matches
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name, published", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)])
def test_cifar_resnets_have_the_papers_parameter_counts(name, published):
    """He et al. 2016, Table 6 (option A shortcuts: no parameters)."""
    digits = 1 if published >= 1 else 2
    assert round(n_params(attnkit.create_model(name)) / 1e6, digits) == published


RESNET50_BLOCKS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # output width of each bottleneck
RESNET50 = 25_557_032  # torchvision's resnet50, checked against torchvision above


def se_params(c: int, r: int = 16) -> int:
    return 2 * c * (c // r) + c // r + c  # two FCs with biases


@pytest.mark.parametrize(
    "attn, added, published",
    [
        ("se", sum(se_params(c) for c in RESNET50_BLOCKS), 28.09),  # Hu et al., Table 2
        ("cbam", sum(se_params(c) + 2 * 49 + 2 for c in RESNET50_BLOCKS), 28.09),  # Woo et al., Table 3
        ("srm", sum(4 * c for c in RESNET50_BLOCKS), 25.62),  # Lee et al., Table 1
        ("eca", 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7, 25.56),  # Wang et al.: the formula gives k = 5, 5, 5, 7 per stage
        ("ge", 0, 25.56),  # Hu et al. 2018: θ⁻ has no parameters
    ],
)
def test_resnet50_attention_parameter_counts(attn, added, published):
    total = n_params(attnkit.create_model("resnet50", attn=attn))
    assert total == RESNET50 + added
    assert round(total / 1e6, 2) == published


MOBILENET_V2 = 3_504_872
# (expanded width, count) of the 16 blocks with expand ratio 6; the sites are after their depthwise conv
MBV2_SITES = [(96, 1), (144, 2), (192, 3), (384, 4), (576, 3), (960, 3)]


def coord_params(c: int) -> int:
    mip = max(8, c // 32)
    return c * mip + mip + 2 * mip + 2 * (mip * c + c)


@pytest.mark.parametrize(
    "attn, added, published",
    [
        # Hou et al., Table 2; SE and CBAM there use r = 24 (which reproduces 3.89M), CA r = 32
        ("se(reduction=24)", sum(n * se_params(c, 24) for c, n in MBV2_SITES), 3.89),
        ("cbam(reduction=24)", sum(n * (se_params(c, 24) + 100) for c, n in MBV2_SITES), 3.89),
        ("coord", sum(n * coord_params(c) for c, n in MBV2_SITES), 3.95),
    ],
)
def test_mobilenet_v2_attention_parameter_counts(attn, added, published):
    total = n_params(attnkit.create_model("mobilenet_v2", attn=attn))
    assert total == MOBILENET_V2 + added
    assert round(total / 1e6, 2) == published


def test_sites_follow_the_papers():
    def sites(model, attn):
        return [s.after for s in attnkit.attach(attnkit.create_model(model), attn)]

    assert sites("resnet50", "se")[:2] == ["layer1.0.bn3", "layer1.1.bn3"] and len(sites("resnet50", "se")) == 16
    assert sites("resnet18", "cbam")[0] == "layer1.0.bn2"
    assert sites("resnet50", "bam") == ["layer1.2", "layer2.3", "layer3.5"]  # before each downsampling
    assert sites("resnet56", "bam") == ["layer1.8", "layer2.8"]
    assert sites("resnet50", "gc")[0] == "layer2.0.bn3" and len(sites("resnet50", "gc")) == 13  # stages c3-c5
    assert sites("mobilenet_v2", "coord")[0] == "features.2.conv.1"  # features.1 has expand ratio 1
    assert sites("lenet", "se") == ["relu1", "relu2"]


def test_sk_replaces_the_3x3_convolution():
    net = attnkit.create_model("resnet50", attn="sk")
    block = net.layer2[0]
    assert isinstance(block.conv2, attnkit.SelectiveKernel) and isinstance(block.bn2, torch.nn.Identity)
    assert block.conv2.paths[0][0].stride == (2, 2) and block.conv2.out_channels == 128
    assert isinstance(attnkit.create_model("resnet18", attn="sk").layer1[0].conv1, attnkit.SelectiveKernel)


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet5'.*lenet.*Did you mean"):
        attnkit.create_model("resnet5")


def test_lenet_input_sizes():
    assert attnkit.create_model("lenet", input_size=32)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="28×28 or 32×32"):
        attnkit.create_model("lenet", input_size=30)
