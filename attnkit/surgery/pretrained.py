"""load_pretrained(): the tensors of a checkpoint that match a model by name and shape, and a report of the rest."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["LoadReport", "load_pretrained"]


@dataclass
class LoadReport:
    """What load_pretrained() did with each key."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing from the checkpoint ({len(self.missing)}, left as initialised): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"in the checkpoint but not the model ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, want, got in self.mismatched:
            lines.append(f"shape mismatch, not loaded: {key}: model {want}, checkpoint {got}")
        return "\n".join(lines)


def _read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"load_pretrained: no checkpoint file at {str(path)!r}.")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for damaged or unsafe files
            raise ValueError(
                f"load_pretrained: cannot read {str(path)!r} as a weights-only PyTorch checkpoint: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from error
        source = str(path)
    else:
        source = "the given state dict"
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"load_pretrained: expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}.")
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"load_pretrained: {source} contains no tensors.")
    if all(k.startswith("module.") for k in tensors):  # DataParallel / DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, source


def load_pretrained(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load the tensors of `checkpoint` whose names and shapes match `model`, and report every other key.

    `checkpoint` is a state dict, a checkpoint dict holding one under 'state_dict' or 'model', or a file
    (read with torch.load(weights_only=True), so it cannot run code). A checkpoint none of whose weights (those of
    the convolutions and linear layers) match is an error, even if biases or BatchNorm's counters do: it comes from
    another architecture.
    """
    tensors, source = _read_state_dict(checkpoint)
    own = model.state_dict()
    report = LoadReport()
    matched = {}
    for key, value in tensors.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append((key, tuple(own[key].shape), tuple(value.shape)))
        else:
            matched[key] = value
    weights = {name for name, p in model.named_parameters() if p.ndim >= 2}  # convolutions' and linear layers'
    if not matched.keys() & weights:  # biases and BatchNorm counters have the same names and shapes in many networks
        only = f" (only {len(matched)} biases, norms and buffers do, such as {next(iter(matched))})" if matched else ""
        raise ValueError(
            f"load_pretrained: no weight of {source} matches {type(model).__name__} by name and shape{only}; it is "
            f"from another architecture. Checkpoint keys start: {', '.join(list(tensors)[:3])}; model keys "
            f"start: {', '.join(list(own)[:3])}."
        )
    model.load_state_dict(matched, strict=False)
    report.loaded = list(matched)
    report.missing = [k for k in own if k not in tensors]
    return report
