"""The networks attach() is tested on: the 25 common ones (torchvision's and timm's, built without weights) and, for the
default run, a small network of each family of blocks (the same block classes, fewer and narrower)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import convnext, efficientnet, vgg

tv = torchvision.models


class Network:
    def __init__(self, name: str, build: Callable[[], nn.Module], rule: str, side: int = 64) -> None:
        self.name, self.build, self.rule, self.side = name, build, rule, side

    def __repr__(self) -> str:
        return self.name

    def input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.side, self.side, generator=torch.Generator().manual_seed(1))


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return partial(timm.create_model, name, pretrained=False, **kwargs)


RESNET = "block layout: ResNet block"
TV_MBCONV = "block layout: MobileNetV3/EfficientNet block"
TIMM_MBCONV = "block layout: timm EfficientNet/MobileNet block"

COMMON = [
    Network("resnet18", tv.resnet18, RESNET),
    Network("resnext50_32x4d", tv.resnext50_32x4d, RESNET),
    Network("wide_resnet50_2", tv.wide_resnet50_2, RESNET),
    Network("mobilenet_v2", tv.mobilenet_v2, "block layout: MobileNetV2 inverted residual"),
    Network("mobilenet_v3_small", tv.mobilenet_v3_small, TV_MBCONV),
    Network("mobilenet_v3_large", tv.mobilenet_v3_large, TV_MBCONV),
    Network("efficientnet_b0", tv.efficientnet_b0, TV_MBCONV),
    Network("efficientnet_v2_s", tv.efficientnet_v2_s, TV_MBCONV),
    Network("convnext_tiny", tv.convnext_tiny, "block layout: ConvNeXt block"),
    Network("regnet_x_400mf", tv.regnet_x_400mf, "block layout: RegNet block"),
    Network("regnet_y_400mf", tv.regnet_y_400mf, "block layout: RegNet block"),
    Network("densenet121", tv.densenet121, "block layout: dense block"),
    Network("vgg11_bn", tv.vgg11_bn, "stage output"),
    Network("shufflenet_v2_x1_0", tv.shufflenet_v2_x1_0, "block layout: ShuffleNetV2 block"),
    Network("googlenet", partial(tv.googlenet, aux_logits=False, init_weights=False), "block layout: Inception module"),
    Network("mnasnet1_0", tv.mnasnet1_0, "block layout: MNASNet inverted residual"),
    Network("inception_v3", partial(tv.inception_v3, aux_logits=False, init_weights=False),
            "block layout: Inception module", side=96),
    Network("timm_resnet50", _timm("resnet50"), RESNET),
    Network("timm_efficientnet_b0", _timm("efficientnet_b0"), TIMM_MBCONV),
    Network("timm_convnext_tiny", _timm("convnext_tiny"), "block layout: timm ConvNeXt block"),
    Network("timm_regnety_008", _timm("regnety_008"), "block layout: timm RegNet block"),
    Network("timm_mobilenetv3_large_100", _timm("mobilenetv3_large_100"), TIMM_MBCONV),
    Network("timm_cspdarknet53", _timm("cspdarknet53"), "block layout: CSPNet dark block"),
    Network("timm_res2net50_26w_4s", _timm("res2net50_26w_4s"), "block layout: Res2Net block"),
    Network("timm_dla34", _timm("dla34"), "block layout: DLA block"),
]


def _small_efficientnet_v2() -> nn.Module:
    fused, mbconv = efficientnet.FusedMBConvConfig, efficientnet.MBConvConfig
    return tv.EfficientNet([fused(1, 3, 1, 16, 16, 1), fused(4, 3, 2, 16, 24, 1), mbconv(4, 3, 2, 24, 32, 1)],
                           dropout=0.0, last_channel=64)


def _small_convnext() -> nn.Module:
    return tv.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)])


def plain_cnn() -> nn.Module:
    """A network without blocks or residuals, as VGG: the stage-output rule."""
    return nn.Sequential(vgg.make_layers([8, "M", 16, 16, "M", 24], batch_norm=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(24, 5))


SMALL = [
    Network("resnet18", tv.resnet18, RESNET),
    Network("resnext", partial(tv.ResNet, tv.resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4), RESNET),
    Network("mobilenet_v2", partial(tv.mobilenet_v2, width_mult=0.35), "block layout: MobileNetV2 inverted residual"),
    Network("mobilenet_v3_small", tv.mobilenet_v3_small, TV_MBCONV),
    Network("efficientnet_b0", tv.efficientnet_b0, TV_MBCONV),
    Network("efficientnet_v2", _small_efficientnet_v2, TV_MBCONV),
    Network("convnext", _small_convnext, "block layout: ConvNeXt block"),
    Network("regnet_y_400mf", tv.regnet_y_400mf, "block layout: RegNet block"),
    Network("densenet", partial(tv.DenseNet, growth_rate=8, block_config=(2, 2), num_init_features=16),
            "block layout: dense block"),
    Network("plain_cnn", plain_cnn, "stage output"),
    Network("shufflenet_v2_x0_5", tv.shufflenet_v2_x0_5, "block layout: ShuffleNetV2 block"),
    Network("googlenet", partial(tv.googlenet, aux_logits=False, init_weights=False), "block layout: Inception module"),
    Network("mnasnet0_5", tv.mnasnet0_5, "block layout: MNASNet inverted residual"),
    Network("timm_resnet18", _timm("resnet18"), RESNET),
    Network("timm_mobilenetv3_small_050", _timm("mobilenetv3_small_050"), TIMM_MBCONV),
    Network("timm_convnext_atto", _timm("convnext_atto"), "block layout: timm ConvNeXt block"),
    Network("timm_regnety_002", _timm("regnety_002"), "block layout: timm RegNet block"),
    Network("timm_dla46_c", _timm("dla46_c"), "block layout: DLA bottleneck"),
]
