"""Optimiser and learning-rate schedule: parameter groups without weight decay for norms, biases and the
parameters a module's paper exempts (its `no_weight_decay()`), SGD/AdamW, warm-up then cosine or step decay."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..runs.config import TrainConfig

__all__ = ["build_optimizer", "build_schedule", "no_decay_names"]


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay: every 1-D parameter (norm scales and shifts,
    biases) and those each submodule lists in `no_weight_decay()` (SRM's style weights, per its paper)."""
    names = {name for name, p in model.named_parameters() if p.ndim <= 1}
    for prefix, module in model.named_modules():
        exempt = getattr(module, "no_weight_decay", None)
        if callable(exempt):
            names |= {f"{prefix}.{n}" if prefix else n for n in exempt()}
    return names


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    exempt = no_decay_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n not in exempt], "weight_decay": config.weight_decay},
        {"params": [p for n, p in trainable if n in exempt], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """The learning rate at optimizer step `step`, as a fraction of config.lr: linear warm-up over
    warmup_epochs, then cosine to zero, steps of gamma at the milestones, or constant."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "step":
        milestones = config.milestones or (config.epochs // 2, config.epochs * 3 // 4)
        return config.gamma ** sum(step >= m * steps_per_epoch for m in milestones)
    return 1.0


def build_schedule(optimizer: torch.optim.Optimizer, steps_per_epoch: int, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule (stepped after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config))
