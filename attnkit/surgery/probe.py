"""What attach() measures instead of guessing: one forward pass of the model in eval mode, without gradients, on a
small input, recording each module's output and input shapes and how often it runs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..hooks import evaluating, forward_hooks

__all__ = ["Measured", "measure"]

SIDES = (64, 224, 32, 28, 299)  # tried in turn until the model runs; 299 for Inception v3's minimum, 28/32 for LeNets


@dataclass
class Measured:
    """One forward pass: per module path, its output shape and the shape of its first input (first call, tensors
    only) and its number of calls, and the paths of the modules without children in the order they ran."""

    example: Tensor = field(repr=False)  # the input it ran on
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    leaves: list[str] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def channels(self, path: str) -> int | None:
        shape = _feature_map(self.shapes, path)
        return None if shape is None else shape[1]

    def resolution(self, path: str) -> tuple[int, ...] | None:
        shape = _feature_map(self.shapes, path)
        return None if shape is None else shape[2:]

    def input_channels(self, path: str) -> int | None:
        shape = _feature_map(self.input_shapes, path)
        return None if shape is None else shape[1]

    def input_resolution(self, path: str) -> tuple[int, ...] | None:
        shape = _feature_map(self.input_shapes, path)
        return None if shape is None else shape[2:]


def _feature_map(shapes: dict[str, tuple[int, ...]], path: str) -> tuple[int, ...] | None:
    """The recorded shape at `path` if it is an N×C×H×W feature map, else None."""
    shape = shapes.get(path)
    return shape if shape is not None and len(shape) == 4 else None


def _inputs(model: nn.Module, example_input: Tensor | None) -> list[Tensor]:
    if example_input is not None:
        if not isinstance(example_input, Tensor):
            raise TypeError(f"attach: `example_input` must be a tensor the model takes, got {type(example_input).__name__}.")
        return [example_input]
    tensor = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device, dtype = (tensor.device, tensor.dtype) if tensor is not None else (torch.device("cpu"), torch.float32)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_channels = conv.in_channels if conv is not None else 3
    g = torch.Generator().manual_seed(0)  # the global random state is left as it is
    return [torch.randn(2, in_channels, s, s, generator=g).to(device, dtype) for s in SIDES]


def measure(model: nn.Module, example_input: Tensor | None = None) -> Measured:
    """Run `model` once (eval mode, no gradients; each module's mode is restored afterwards) on `example_input`, or on
    2×C×S×S random inputs with C from the first convolution and S from SIDES until one runs."""
    paths = {id(m): p for p, m in model.named_modules()}
    errors = []
    record: Measured | None = None

    def hook(module: nn.Module, inputs: tuple, out: object) -> None:
        path = paths.get(id(module))
        if path is None or record is None:
            return
        record.calls[path] = record.calls.get(path, 0) + 1
        if inputs and isinstance(inputs[0], Tensor) and path not in record.input_shapes:
            record.input_shapes[path] = tuple(inputs[0].shape)
        if isinstance(out, Tensor) and path not in record.shapes:
            record.shapes[path] = tuple(out.shape)
            if next(module.children(), None) is None:
                record.leaves.append(path)

    with forward_hooks((m, hook) for m in model.modules()), evaluating(model), torch.no_grad():
        for x in _inputs(model, example_input):
            record = Measured(x)
            try:
                model(x)
                return record
            except Exception as error:  # a model may refuse a size, a dtype on this device, a shape...
                errors.append(f"{'×'.join(map(str, x.shape))}: {type(error).__name__}: {_first_line(error)}")
    raise ValueError(
        f"attach: {type(model).__name__} did not run on any probe input ({'; '.join(errors)}), so the channel counts of "
        f"its layers cannot be measured. Pass example_input= (a tensor it takes), or channels= for named sites."
    )


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""
