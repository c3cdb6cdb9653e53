"""A trained run to analyse: the network of an `attnkit train` checkpoint and the data set to look at it with."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data import Dataset, load_dataset
from .checkpoint import load_checkpoint
from .model import model_from_checkpoint

__all__ = ["LoadedRun", "load_run", "run_data"]


@dataclass
class LoadedRun:
    """A checkpoint's network (eval mode) and the data set to look at it with."""

    model: nn.Module
    data: Dataset
    name: str  # "resnet20 + se", for titles
    folder: Path  # the checkpoint's folder, where the outputs go by default


def run_data(state: dict[str, Any], source: object, dataset: str | None = None,
             data_dir: str | os.PathLike | None = None) -> Dataset:
    """The data set at the network's input size: the checkpoint's own (from its training data folder) unless
    `dataset` (`data_dir`) is given, which must have the same channels and classes."""
    arch, config = state.get("arch"), state.get("config", {})
    if not isinstance(arch, dict):
        raise ValueError(f"{source} has no model description ('arch'); it was not written by attnkit train.")
    spec = dataset or config.get("dataset")
    if not spec:
        raise ValueError(f"{source} does not say which data set it was trained on; pass --dataset.")
    data = load_dataset(spec, data_dir or config.get("data_dir", "data"), arch["input_size"])
    if (data.in_chans, data.num_classes) != (arch["in_chans"], arch["num_classes"]):
        raise ValueError(f"{source} was trained on {arch['in_chans']}-channel images of {arch['num_classes']} "
                         f"classes, but {spec!r} has {data.in_chans} channels and {data.num_classes} classes; give a "
                         f"data set like the one it was trained on.")
    return data


def load_run(checkpoint: str | os.PathLike, dataset: str | None = None, data_dir: str | os.PathLike | None = None) -> LoadedRun:
    """The network of a checkpoint written by `attnkit train` and its data set (see run_data)."""
    state = load_checkpoint(checkpoint)
    data = run_data(state, checkpoint, dataset, data_dir)
    arch = state["arch"]
    name = arch["model"] + (f" + {arch['attn']}" if arch.get("attn") else "")
    return LoadedRun(model_from_checkpoint(state, checkpoint), data, name, Path(checkpoint).parent)
