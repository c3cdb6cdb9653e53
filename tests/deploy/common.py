"""What the deployment tests share: models whose BatchNorms are not the identity, and relative errors."""
from __future__ import annotations

import torch
from torch import nn

import attnkit

BACKBONES = ("resnet18", "resnet56", "mobilenet_v2")
# the spec each module takes inside a backbone at any input size (GE θ's global gather needs a fixed size) and width
# (EMA's 32, Shuffle Attention's 2·64 and SGE's 64 default groups need wider layers than resnet56's and
# mobilenet_v2's; 8 SGE groups divide them all)
SPECS = {name: name for name in attnkit.list_modules()} | {"ge": "ge(extent=2, variant='plus')", "ema": "ema(groups=8)",
                                                          "shuffle": "shuffle(groups=4)", "sge": "sge(groups=8)"}


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm, and random SRM style weights (zero at
    initialisation), so that folding has something to fold; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        if isinstance(m, attnkit.SRM):
            m.cfc.copy_(torch.randn(m.cfc.shape, generator=g))
    return model.eval()


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got − expected| / max |expected|."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
