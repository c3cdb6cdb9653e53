"""A run's network: its description (the "arch" checkpoints store), the network built from it, and the trained
network read back from a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data import Dataset
from ..models import create_model
from ..surgery import AttachReport, attach, parse_placement
from .checkpoint import check_checkpoint, load_checkpoint
from .config import TrainConfig

__all__ = ["build_model", "load_weights", "model_arch", "model_from_checkpoint"]


def model_arch(config: TrainConfig, data: Dataset) -> dict[str, Any]:
    """What build_model() needs to rebuild a run's network; checkpoints store it as "arch"."""
    return {"model": config.model, "attn": config.attn, "where": config.where, "identity_init": config.identity_init,
            "init": config.init, "num_classes": data.num_classes, "in_chans": data.in_chans, "input_size": data.image_size}


def build_model(arch: dict[str, Any]) -> tuple[nn.Module, AttachReport | None]:
    """The backbone, then the attention at its placement. `arch` holds model, attn, where, identity_init, init (PyTorch's
    where it lacks it: the checkpoints written before it existed), num_classes, in_chans and input_size, as checkpoints
    store it."""
    model = create_model(arch["model"], num_classes=arch["num_classes"], in_chans=arch["in_chans"],
                         input_size=arch["input_size"])
    report = None
    if arch["attn"]:
        report = attach(model, arch["attn"], identity_init=arch["identity_init"], init=arch.get("init", "pytorch"),
                        **parse_placement(arch["where"]))
    return model, report


def load_weights(model: nn.Module, weights: dict[str, Any], source: object) -> None:
    """model.load_state_dict(weights), strictly; weights of another network are a ValueError naming `source`."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        reason = next(iter(str(error).strip().splitlines()[1:2]), str(error)).strip()  # torch's list of keys
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ValueError(f"{source}: its weights do not fit the architecture it records ({reason}).") from error


def model_from_checkpoint(checkpoint: str | Path | dict[str, Any], source: object = None) -> nn.Module:
    """The trained network of a checkpoint written by train() (its path, or what load_checkpoint read from
    it, then `source` names it in errors), with its weights, in eval mode."""
    if isinstance(checkpoint, dict):
        source = source or "the checkpoint"
        state = check_checkpoint(checkpoint, source)
    else:
        source, state = checkpoint, load_checkpoint(checkpoint)
    model, _ = build_model(state["arch"])
    load_weights(model, state["model"], source)
    return model.eval()
