"""Every attnkit module works as timm's attention layer (`attn_layer`, `se_layer`): it takes timm's keyword conventions
(rd_ratio, rd_channels, rd_divisor, act_layer, gate_layer, device, dtype) with their meaning, in timm's ResNet-50,
EfficientNet-B0 and a RegNet, forward and backward."""
from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.layers import SEModule, make_divisible
from torch import nn

import attnkit
from attnkit import registry
from attnkit.modules.base import AttentionModule

pytestmark = pytest.mark.usefixtures("one_thread")

# timm builds every layer with the block's channel count alone; modules that need more (GE θ's map size) are left out
CLASSES = sorted({cls for cls in registry.registered_classes() if issubclass(cls, AttentionModule)}, key=lambda c: c.__name__)

NETWORKS = {
    "resnet50": lambda cls: timm.create_model("resnet50", block_args=dict(attn_layer=cls)),
    "efficientnet_b0": lambda cls: timm.create_model("efficientnet_b0", se_layer=cls),
    "regnetz_b16": lambda cls: timm.create_model("regnetz_b16", attn_layer=cls),
}


# timm builds every layer of a network with one class; where a module's paper grouping does not fit the network's channel
# counts (and the channels=8 probe timm's EfficientNet builds first), it refuses with the keyword to change, and the
# advised value works. Each entry: the refusal's message, and the keywords that fit every layer of that network.
REFUSED = {
    ("efficientnet_b0", attnkit.EMA): (r"EMA: channels = 8 must be a multiple of groups = 32", dict(groups=8)),
    ("efficientnet_b0", attnkit.EfficientLocalAttention): (r"`norm_groups`=16 must divide the channel count 8", dict(norm_groups=8)),
    ("efficientnet_b0", attnkit.FrequencyChannelAttention): (r"16 does not divide the channel count 8; pick a selection of 8", dict(frequencies="top8")),
    ("efficientnet_b0", attnkit.ShuffleAttention): (r"channels = 8 must be a multiple of 2·groups = 128", dict(groups=4)),
    ("efficientnet_b0", attnkit.SpatialGroupEnhance): (r"`groups`=64 must divide the channel count 8; pass groups=8", dict(groups=8)),
    ("efficientnet_b0", attnkit.SelectiveKernel): (r"`groups`=32 must divide both channels=8 .* pass groups=1", dict(groups=8)),
    ("regnetz_b16", attnkit.EMA): (r"EMA: channels = 144 must be a multiple of groups = 32", dict(groups=16)),
    ("regnetz_b16", attnkit.ShuffleAttention): (r"channels = 96 must be a multiple of 2·groups = 128", dict(groups=24)),
    ("regnetz_b16", attnkit.SpatialGroupEnhance): (r"`groups`=64 must divide the channel count 96; pass groups=48", dict(groups=48)),
    ("regnetz_b16", attnkit.SelectiveKernel): (r"`groups`=32 must divide both channels=\d+ .* pass groups=1", dict(groups=16)),
}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("network", list(NETWORKS))
def test_every_module_as_timms_attention_layer(network, cls):
    torch.manual_seed(0)
    if (network, cls) in REFUSED:
        message, fitting = REFUSED[network, cls]
        with pytest.raises(ValueError, match=message):
            NETWORKS[network](cls)
    model = NETWORKS[network](functools.partial(cls, **fitting) if (network, cls) in REFUSED else cls)
    inserted = [m for m in model.modules() if type(m) is cls]
    assert len(inserted) >= 10
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is not None for m in inserted for p in m.parameters())


def test_timm_keywords_mean_what_they_mean_in_timm():
    # rd_ratio with timm's divisor: the width of timm's SEModule
    for channels, ratio in [(64, 1 / 16), (256, 1 / 16), (100, 0.25), (24, 1 / 16)]:
        se = attnkit.SqueezeExcite(channels, rd_ratio=ratio, rd_divisor=8)
        assert se.fc1.out_channels == SEModule(channels, rd_ratio=ratio).fc1.out_channels == make_divisible(channels * ratio, 8, round_limit=0.0)
    assert attnkit.SqueezeExcite(96, rd_ratio=0.25 / 6).fc1.out_channels == 4  # no divisor: rounded, as EfficientNet's SE
    assert attnkit.CBAM(64, rd_channels=5).channel_gate.fc1.out_channels == 5
    assert attnkit.create("se", 64, rd_ratio=1 / 8).fc1.out_channels == 8  # the registry takes them too
    se = attnkit.SqueezeExcite(32, act_layer=nn.SiLU, gate_layer="hard_sigmoid", device="cpu", dtype=torch.float64)
    assert isinstance(se.act, nn.SiLU) and isinstance(se.gate, nn.Hardsigmoid) and se.fc1.weight.dtype == torch.float64
    eca = attnkit.ECA(64, rd_ratio=0.25, act_layer=nn.ReLU)  # no bottleneck, no hidden activation: no effect
    assert eca.kernel_size == attnkit.ECA(64).kernel_size
    with pytest.raises(ValueError, match="hidden_channels given twice, as attnkit's keyword and as timm's"):
        attnkit.SqueezeExcite(64, hidden_channels=4, rd_ratio=0.5)
    with pytest.raises(ValueError, match="`rd_ratio` .* must be a positive number, got -1"):
        attnkit.SqueezeExcite(64, rd_ratio=-1)
