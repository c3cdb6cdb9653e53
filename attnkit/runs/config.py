"""Every option of a training run, in one dataclass: the CLI fills it, checkpoints store it, resume compares it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..registry import BASELINE, did_you_mean

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


def option(default: Any, help: str) -> Any:
    """A TrainConfig field and its help text, kept in the field's metadata (the command line's --help shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """A training run. Defaults train a CIFAR ResNet-20 on the embedded digits in about half a minute on 2 cores."""

    model: str = option("resnet20", "backbone name (attnkit.list_models())")
    attn: str | None = option(None, "attention spec, e.g. se or 'cbam(reduction=8)'; leave out for the plain network")
    where: str = option("auto", "placement: auto (the paper's), position=residual|output, stages=2,3, or a module-name "
                                "pattern; combine with ';', e.g. 'position=output;stages=3'")
    dataset: str = option("digits", "digits, cluttered-digits, mnist, fashion-mnist, cifar10, cifar100, imagefolder, "
                                    "synthetic; options as in 'synthetic(samples=512, channels=1)'")
    data_dir: str = option("data", "where the data set's files are")
    download: bool = option(False, "let torchvision download mnist/fashion-mnist/cifar into --data-dir (needs a network)")
    image_size: int | None = option(None, "resize the images to this side (default: the data set's own)")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(64, "global batch, divided among the processes")
    workers: int = option(0, "data-loading processes (image folders)")
    optimizer: str = option("sgd", "optimiser")
    lr: float = option(0.1, "peak learning rate, reached after the warm-up")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "weight decay; never applied to norms, biases or parameters a paper exempts (SRM)")
    schedule: str = option("cosine", "learning-rate schedule after the warm-up")
    warmup_epochs: float = option(1.0, "epochs of linear learning-rate warm-up")
    milestones: tuple[int, ...] = option((), "epochs at which the step schedule multiplies the rate by --gamma "
                                             "(default: 50% and 75% of the epochs)")
    gamma: float = option(0.1, "the step schedule's factor at each milestone")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss, in [0, 1)")
    amp: str = option("none", "mixed precision")
    channels_last: bool = option(False, "channels_last memory format for the model and the inputs")
    compile: bool = option(False, "torch.compile the model")
    clip_grad: float | None = option(None, "clip the gradient norm to this value")
    skip_nonfinite: int = option(0, "skip up to this many training batches whose loss is NaN or inf over the run, "
                                    "instead of stopping at the first (costs one device sync per step; may be raised "
                                    "on --resume)")
    seed: int = option(0, "the run's seed: initialisation, data order and augmentation")
    pretrained: str | None = option(None, "checkpoint to load through load_pretrained (what matches is kept; the "
                                          "report is printed)")
    identity_init: bool = option(False, "start the inserted modules as the identity (fine-tuning pretrained networks)")
    init: str = option("paper", "the inserted modules' initialisation: paper (as their official network code "
                                "re-initialises them) or pytorch (PyTorch's defaults)")
    freeze: str = option("none", "backbone: train only the inserted modules and the classifier")
    sync_bn: bool = option(False, "SyncBatchNorm across processes (GPUs)")
    device: str = option("auto", "where to train: auto (a GPU when there is one), cpu or cuda")
    threads: int | None = option(None, "torch CPU threads")
    run_dir: str | None = option(None, "the run's folder (default runs/<model>-<variant>-<dataset>-seed<k>)")
    resume: bool = option(False, "continue the run in --run-dir from its last checkpoint")
    tensorboard: bool = option(True, "write TensorBoard logs next to metrics.csv")
    progress: bool = option(True, "progress bars and per-epoch lines")

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
        """BASELINE ('plain'), or the attention spec with its placement when that is not the paper's."""
        if not self.attn:
            return BASELINE
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
