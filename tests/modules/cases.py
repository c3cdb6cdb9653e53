"""The module configurations every contract test runs: each registered module at its defaults and with its
main options. A `spatial_size` of INPUT_SIZE is replaced by the input's H×W (GE θ's global gather)."""
from __future__ import annotations

import attnkit
import torch
from torch import nn

INPUT_SIZE = "input"

CASES: list[tuple[str, dict]] = [
    ("se", {}),
    ("se", {"bias": False, "gate": "hard_sigmoid"}),
    ("eca", {}),
    ("eca", {"kernel_size": 5}),
    ("cbam", {}),
    ("cbam", {"pool_types": ("avg", "max", "lp", "lse"), "kernel_size": 3}),
    ("cbam", {"no_spatial": True}),
    ("cbam", {"residual": True, "spatial_norm": False, "bias": False}),
    ("bam", {}),
    ("bam", {"combine": "product"}),
    ("coord", {}),
    ("srm", {}),
    ("ge", {}),
    ("ge", {"extent": 2}),
    ("ge", {"variant": "theta", "spatial_size": INPUT_SIZE}),
    ("ge", {"variant": "theta", "extent": 4}),
    ("ge", {"variant": "plus", "extent": 2}),
    ("gc", {}),
    ("gc", {"fusion": ("add", "mul"), "pooling": "avg"}),
    ("triplet", {}),
    ("triplet", {"no_spatial": True}),
    ("sk", {"groups": 4}),
    ("sk", {"groups": 8, "out_channels": 24, "stride": 2}),
]

# The first case of each registered module (its defaults, or the nearest config that fits 16 channels).
DEFAULT_CASES = [next(case for case in CASES if case[0] == name) for name in attnkit.list_modules()]


def case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return name + ("(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else "")


def build(name: str, kwargs: dict, channels: int, size: tuple[int, int]) -> nn.Module:
    kwargs = {k: (tuple(size) if v == INPUT_SIZE else v) for k, v in kwargs.items()}
    return attnkit.create(name, channels, **kwargs)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic random values, so no zero-initialised layer hides anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module
