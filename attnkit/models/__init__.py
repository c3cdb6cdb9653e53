"""Backbones and create_model(): the networks the papers use, with attention placed as each paper places it."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from torch import nn

from ..registry import Registry
from ..surgery import attach
from ..surgery.attach import INITS
from .cifar_resnet import CifarResNet
from .lenet import LeNet
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152

__all__ = ["MODELS", "create_model", "list_models", "CifarResNet", "LeNet", "MobileNetV2", "ResNet"]

MODELS = Registry("model", {
    "lenet": LeNet,
    **{f"resnet{d}": partial(CifarResNet, d) for d in (20, 32, 44, 56, 110)},
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "mobilenet_v2": mobilenet_v2,
})


def list_models() -> list[str]:
    """The names create_model() accepts."""
    return MODELS.names()


def create_model(
    name: str,
    attn: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    *,
    input_size: int | None = None,
    identity_init: bool = False,
    init: str = "paper",
    **kwargs: Any,
) -> nn.Module:
    """Build backbone `name`, with the attention module `attn` (a registry spec) placed as its paper says.

    `input_size` (the input's side) reaches the backbones whose classifier depends on it (lenet) and is
    ignored by those that pool globally. Other `kwargs` go to the backbone; attention options go in the spec
    string, e.g. create_model("resnet50", attn="cbam(reduction=8)"). `init` is attach()'s: "paper" initialises the
    attention as its official network code does, "pytorch" keeps PyTorch's defaults.
    """
    factory = MODELS.get(name)
    if init not in INITS:
        raise ValueError(f"create_model: `init` must be one of {list(INITS)}, got {init!r}.")
    options = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    if input_size is not None and "input_size" in inspect.signature(factory).parameters:
        options["input_size"] = input_size
    model = factory(**options, **kwargs)
    if attn is not None:
        attach(model, attn, identity_init=identity_init, init=init)
    return model
