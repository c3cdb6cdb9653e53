"""Training checkpoints: written atomically (attnkit.files: a crash never leaves half a checkpoint), and read
through one check of their structure and values that every reader shares: the fields a reader needs, sane
architecture fields, and finite weights (a checkpoint of a run that diverged is refused, not analysed, exported
or trained on)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..files import write_file
from ..surgery.attach import INITS
from .config import TrainConfig

__all__ = ["ARCH_LIMITS", "check_checkpoint", "load_checkpoint", "nonfinite_tensors", "save_checkpoint"]

FORMAT = "attnkit-train-1"
REQUIRED = ("config", "arch", "model")  # what every reader needs
RESUMABLE = ("epoch", "optimizer", "schedule", "scaler", "rng", "history", "best_acc", "best_epoch")
# the architecture fields a network is built from, and the range a real one lies in
ARCH_LIMITS = {"num_classes": (1, 100_000), "in_chans": (1, 1024), "input_size": (1, 8192)}
ARCH_TEXT = {"model": str, "where": str}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    write_file(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in `tensors` (nested dicts and lists too) that hold a NaN or an
    infinity, in order."""
    found = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{name}.{i}", item)

    visit("", tensors)
    return found


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arch(arch: Any, source: object) -> None:
    if not isinstance(arch, Mapping):
        raise ValueError(f"{source}: its 'arch' (the network's description) is a {type(arch).__name__}, not a dict.")
    for key, (low, high) in ARCH_LIMITS.items():
        value = arch.get(key)
        if not _integer(value) or not low <= value <= high:
            raise ValueError(f"{source}: its 'arch' gives {key}={value!r}; a network takes an integer from {low} to "
                             f"{high:,}. The file is damaged or was not written by attnkit train.")
    for key, kind in ARCH_TEXT.items():
        if not isinstance(arch.get(key), kind):
            raise ValueError(f"{source}: its 'arch' gives {key}={arch.get(key)!r}, not a name. The file is damaged or "
                             f"was not written by attnkit train.")
    attn, identity_init, init = arch.get("attn"), arch.get("identity_init"), arch.get("init", "pytorch")
    if not (attn is None or isinstance(attn, str)) or not isinstance(identity_init, bool) or init not in INITS:
        raise ValueError(f"{source}: its 'arch' gives attn={attn!r}, identity_init={identity_init!r}, init={init!r}; "
                         f"expected a module spec (or None), True or False, and one of {list(INITS)}.")


def check_checkpoint(state: Any, source: object, resumable: bool = False) -> dict[str, Any]:
    """`state` if it is a whole, sane attnkit training checkpoint, else a ValueError naming `source` and what is
    wrong: the format, the fields every reader needs (and, with `resumable`, those --resume needs), the training
    configuration, the architecture (ARCH_LIMITS), and the weights: tensors, all finite (and, with `resumable`, the
    optimizer's state too)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{source} is not an attnkit training checkpoint: expected format {FORMAT!r}, found {found!r}.")
    missing = [key for key in REQUIRED + (RESUMABLE if resumable else ()) if key not in state]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(repr(k) for k in missing)}: it is not a whole checkpoint of attnkit "
                         f"train{' that --resume can continue' if resumable else ''}.")
    if not isinstance(state["config"], dict):
        raise ValueError(f"{source}: its 'config' is a {type(state['config']).__name__}, not the training options.")
    try:
        TrainConfig.from_dict(state["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: its 'config' is not a valid training configuration ({error})") from error
    _check_arch(state["arch"], source)
    weights = state["model"]
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()):
        raise ValueError(f"{source}: its 'model' is not a state dict (names and tensors).")
    bad = nonfinite_tensors(weights)
    if resumable:
        if not _integer(state["epoch"]) or state["epoch"] < 0:
            raise ValueError(f"{source}: its 'epoch' is {state['epoch']!r}, not a count of epochs.")
        if not isinstance(state["history"], list) or not isinstance(state["rng"], Tensor):
            raise ValueError(f"{source}: its 'history' or 'rng' is not what attnkit train writes; the file is damaged.")
        bad += nonfinite_tensors({"optimizer": state["optimizer"]})
    if bad:
        raise ValueError(f"{source} holds NaN or infinite values in {len(bad)} of its tensors (the first: {bad[0]}): it was "
                         f"saved by a run that diverged. Use an earlier checkpoint, or train again with a lower --lr.")
    return state


def load_checkpoint(path: str | os.PathLike, resumable: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (tensors and plain values only: weights_only loading), checked
    by check_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if isinstance(error, OSError) and error.errno is not None:  # the file system's error, not the file's content
            raise
        reason = next(iter(str(error).strip().splitlines()), "")  # torch's own message runs over many lines
        raise ValueError(f"{path} is not a readable attnkit checkpoint ({type(error).__name__}: {reason}).") from error
    return check_checkpoint(state, path, resumable)
