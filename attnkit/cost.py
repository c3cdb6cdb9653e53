"""What a model costs: parameters, and multiply-adds counted by torch.utils.flop_counter."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .hooks import evaluating

__all__ = ["count_macs", "count_params"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one inference forward pass on a tensor of `input_shape` (batch included), counted by
    torch.utils.flop_counter and halved: the papers count a multiply-add once. Like the papers, this counts
    convolutions and matrix products; element-wise operations (activations, gating) are not counted."""
    parameter = next(model.parameters(), None)
    x = torch.zeros(*input_shape, device=parameter.device if parameter is not None else "cpu")
    with evaluating(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
