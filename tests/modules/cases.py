"""The module configurations every contract test runs: each registered module at its defaults and with its
main options. A `spatial_size` of INPUT_SIZE is replaced by the input's H×W (GE θ's global gather, NAM's pixel
normalisation)."""
from __future__ import annotations

import attnkit
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
    # simam, ema, gam, shuffle, nam, nonlocal
    ("simam", {}),
    ("simam", {"e_lambda": 0.1, "gate": "hard_sigmoid"}),
    ("ema", {"groups": 4}),
    ("ema", {"groups": 8}),
    ("gam", {}),
    ("gam", {"reduction": 4, "kernel_size": 3, "groups": 2, "spatial_norm": False}),
    ("shuffle", {"groups": 4}),
    ("shuffle", {"groups": 2, "gate": "hard_sigmoid"}),
    ("nam", {}),
    ("nam", {"spatial_size": INPUT_SIZE, "detach_weights": False, "abs_weights": False}),
    ("nonlocal", {}),
    ("nonlocal", {"pairwise": "concatenation", "subsample": "after"}),
    ("nonlocal", {"pairwise": "dot_product", "norm": False}),
    ("nonlocal", {"pairwise": "gaussian", "subsample": "none", "scale": False}),
    # sge, gct, fca, scse, ela, psa
    ("sge", {"groups": 4}),
    ("sge", {"groups": 16, "gate": "hard_sigmoid"}),
    ("gct", {}),
    ("gct", {"mode": "l1"}),
    ("gct", {"mode": "l1", "after_relu": True}),
    ("fca", {}),
    ("fca", {"frequencies": "low4", "dct_size": 14, "bias": True}),
    ("scse", {}),
    ("scse", {"combine": "add"}),
    ("scse", {"combine": "mul", "reduction": 4}),
    ("ela", {}),
    ("ela", {"variant": "L"}),
    ("ela", {"shared": False, "norm_groups": 1, "act": "silu", "bias": True}),
    ("psa", {}),
    ("psa", {"layout": "sequential"}),
    ("psa", {"variant": "paper"}),
    ("psa", {"variant": "paper", "layout": "sequential"}),
]

# The first case of each registered module (its defaults, or the nearest config that fits 16 channels).
DEFAULT_CASES = [next(case for case in CASES if case[0] == name) for name in attnkit.list_modules()]


def case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return name + ("(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else "")


def build(name: str, kwargs: dict, channels: int, size: tuple[int, int]) -> nn.Module:
    kwargs = {k: (tuple(size) if v == INPUT_SIZE else v) for k, v in kwargs.items()}
    return attnkit.create(name, channels, **kwargs)
