"""Every option of a training run, in one dataclass: the CLI fills it, checkpoints store it, resume compares it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..registry import did_you_mean

__all__ = ["CHOICES", "TrainConfig", "RESUMABLE_CHANGES"]

# Options that may differ between a run and its resumption: they change how it is run, not what it computes
# (a larger --skip-nonfinite budget only lets a stopped run go on).
RESUMABLE_CHANGES = frozenset({"resume", "progress", "workers", "tensorboard", "threads", "run_dir", "data_dir",
                               "skip_nonfinite"})

CHOICES = {  # the options that take one of a few names
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "amp": ("none", "bf16", "fp16"),
    "freeze": ("none", "backbone"),
    "device": ("auto", "cpu", "cuda"),
    "init": ("paper", "pytorch"),
}


@dataclass
class TrainConfig:
    """A training run. Defaults train a CIFAR ResNet-20 on the embedded digits in about half a minute on 2 cores."""

    model: str = "resnet20"
    attn: str | None = None  # a registry spec; None trains the plain network
    where: str = "auto"  # placement: see attnkit.surgery.parse_placement
    dataset: str = "digits"  # a dataset spec, e.g. "synthetic(samples=512)"
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = None  # None: the data set's own size
    epochs: int = 10
    batch_size: int = 64  # the global batch, divided among the processes
    workers: int = 0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    milestones: tuple[int, ...] = ()  # for the step schedule; empty: at 50% and 75% of the epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    clip_grad: float | None = None
    skip_nonfinite: int = 0
    seed: int = 0
    pretrained: str | None = None
    identity_init: bool = False
    init: str = "paper"  # the inserted modules' initialisation: attach()'s `init`
    freeze: str = "none"
    sync_bn: bool = False
    device: str = "auto"
    threads: int | None = None
    run_dir: str | None = None
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}.{did_you_mean(str(value), choices)}")
        if not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite is a number of batches ≥ 0, got {self.skip_nonfinite!r}.")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("lr", "weight_decay", "warmup_epochs", "label_smoothing", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)!r}.")
        if not self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be below 1, got {self.label_smoothing}.")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive (or None for no clipping), got {self.clip_grad}.")
        if self.freeze == "backbone" and not (self.attn or self.pretrained):
            raise ValueError("--freeze backbone trains only the inserted attention and the classifier: give --attn (and usually --pretrained).")
        self.milestones = tuple(int(m) for m in self.milestones)

    @property
    def variant(self) -> str:
        """'plain', or the attention spec with its placement when that is not the paper's."""
        if not self.attn:
            return "plain"
        return self.attn if self.where == "auto" else f"{self.attn}@{self.where}"

    def default_run_dir(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.model}-{self.variant}-{self.dataset}").strip("_")
        return f"runs/{slug}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A stored configuration (a checkpoint's, a result.json's). One stored before `init` existed was trained with
        PyTorch's initialisation, and says so."""
        values = {"init": "pytorch", **values}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**values)

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """The options that differ from `other` and matter to the result (not those in RESUMABLE_CHANGES)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]}
