"""export(): write a model (or a training checkpoint's model) as ONNX, an ExportedProgram or TorchScript, and check
the written file against the PyTorch model on fresh random input before reporting success."""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..files import replacing
from ..modules.base import fixed_spatial_size
from .folding import fuse

__all__ = ["FORMATS", "ExportCheck", "ExportReport", "export"]

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2", "torchscript": ".ts"}
_RUNTIME = {"onnx": "onnxruntime", "exported-program": "torch.export.load", "torchscript": "torch.jit.load"}
_AXES = {0: "batch", 2: "height", 3: "width"}
Ranges = dict[str, tuple[int, float]]  # dynamic axis -> (smallest, largest size), as torch.export traced it
Written = tuple[Callable[[Tensor], Tensor], Ranges]


@dataclass
class ExportCheck:
    """The exported model against the PyTorch model on one random input."""

    input_shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float  # max |exported − reference| / max |reference|
    refused: str | None = None  # a torch.export program's guard that refused this shape (it raises, it is not wrong)


@dataclass
class ExportReport:
    path: Path
    format: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    dynamic_size: bool
    batchnorms_folded: int
    ranges: Ranges = field(default_factory=dict)
    checks: list[ExportCheck] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((c.max_rel_error for c in self.checks if c.refused is None), default=math.nan)

    def __str__(self) -> str:
        shape = "×".join(map(str, self.input_shape))
        axes = [f"batch {'dynamic' if self.dynamic_batch else 'fixed'}", f"size {'dynamic' if self.dynamic_size else 'fixed'}"]
        lines = [f"wrote {self.path} ({self.format}; example input {shape}, {', '.join(axes)}; "
                 f"{self.batchnorms_folded} BatchNorms folded into the layers before them)"]
        if self.ranges:
            spans = ", ".join(f"{axis} {lo}..{'∞' if hi == math.inf else hi}" for axis, (lo, hi) in self.ranges.items())
            lines.append(f"torch.export traced the dynamic axes as valid for {spans}"
                         + (" (the program refuses other sizes)" if self.format == "exported-program" else ""))
        if self.checks:
            lines.append(f"checked with {_RUNTIME[self.format]} against the PyTorch model (eval mode, unfolded) "
                         f"on fresh random input:")
            lines += [f"  input {'×'.join(map(str, c.input_shape))}: "
                      + (f"refused by the program ({c.refused})" if c.refused else
                         f"max abs error {c.max_abs_error:.2e}, max rel error {c.max_rel_error:.2e}")
                      for c in self.checks]
        return "\n".join(lines)


def _count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, tuple[int, int, int]]:
    from ..runs import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(path)
    arch = state.get("arch")
    if not isinstance(arch, dict) or not {"in_chans", "input_size"} <= arch.keys():
        raise ValueError(f"{path} has no model description ('arch'); it was not written by attnkit train.")
    return model_from_checkpoint(state, path), (arch["in_chans"], arch["input_size"], arch["input_size"])


def _check_finite(model: nn.Module) -> None:
    """A model with NaN or infinite weights or statistics is refused: the check against PyTorch cannot see it (a
    BatchNorm with infinite running variances outputs zeros, which the export reproduces)."""
    from ..runs import nonfinite_tensors

    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"export: the model holds NaN or infinite values in {len(bad)} of its tensors (the first: "
                         f"{bad[0]}); it comes from a run that diverged. Export a model trained without diverging.")


def _input_shape(value: object) -> tuple[int, int, int]:
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"export: `input_shape` must be (C, H, W) of one input image, e.g. (3, 224, 224), got {value!r}.")
    return tuple(value)  # type: ignore[return-value]


def _other_shapes(shape: tuple[int, ...], dynamic_batch: bool, dynamic_size: bool) -> list[tuple[int, ...]]:
    """The shapes checked besides the example's: another batch, and a larger and a smaller size, where dynamic."""
    n, c, h, w = shape
    n2 = n + 1 if dynamic_batch else n
    others = [(n2, c, h, w)] if dynamic_batch else []
    if dynamic_size:
        others += [(n2, c, h + max(3, h // 2) + 1, w + max(2, w // 4)), (n2, c, max(2, h // 2 + 1), max(2, w // 2 - 1))]
    return others


def _within(shape: tuple[int, ...], ranges: Ranges) -> tuple[int, ...]:
    """`shape` with each dynamic axis brought into the range torch.export traced it for."""
    clamped = list(shape)
    for axis, name in _AXES.items():
        if name in ranges:
            lo, hi = ranges[name]
            clamped[axis] = int(min(max(clamped[axis], lo), hi))
    return tuple(clamped)


def _check_sizes_taken(model: nn.Module, shapes: list[tuple[int, ...]], dynamic_size: bool) -> None:
    """Say clearly, before exporting, when the model itself cannot run at a shape the export would allow."""
    for path, module in model.named_modules():
        size = fixed_spatial_size(module) if dynamic_size else None
        if size is not None:
            raise ValueError(
                f"--dynamic-size: {path} ({type(module).__name__}) takes {size[0]}×{size[1]} feature maps only (a "
                f"Gather-Excite θ with a global gather has a kernel that covers the map), so the model takes one input "
                f"size only. Export with a fixed size."
            )
    for shape in shapes:
        try:
            with torch.no_grad():
                model(torch.zeros(shape))
        except Exception as error:
            raise ValueError(
                f"the model does not run on an input of shape {'×'.join(map(str, shape))}, which the dynamic axes "
                f"would allow ({type(error).__name__}: {error}). Export with fixed axes."
            ) from error


def _dynamic_shapes(dynamic_batch: bool, dynamic_size: bool) -> tuple[dict[int, Any]] | None:
    axes = {0: dynamic_batch, 2: dynamic_size, 3: dynamic_size}
    spec = {axis: torch.export.Dim.DYNAMIC for axis, dynamic in axes.items() if dynamic}
    return (spec,) if spec else None




def _program(model: nn.Module, example: Tensor, dynamic: Any) -> tuple[torch.export.ExportedProgram, Ranges]:
    """torch.export's program and, for each dynamic axis, the range of sizes it was traced valid for (torch.export
    narrows it where code depends on the size, layout checks included; the program refuses sizes outside)."""
    from torch.utils._sympy.numbers import int_oo  # sympy: 0.4 s to import, so only when exporting

    try:
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    except Exception as error:  # torch.export's errors run over pages; the first line says what failed
        reason = next(iter(str(error).strip().splitlines()), "")
        raise ValueError(f"torch.export cannot capture the model ({type(error).__name__}: {reason}).") from error
    (name,) = program.graph_signature.user_inputs
    (node,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == name]
    ranges = {}
    for axis, size in enumerate(node.meta["val"].shape):
        bounds = program.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        if bounds is not None:
            ranges[_AXES[axis]] = (int(bounds.lower), math.inf if bounds.upper == int_oo else int(bounds.upper))
    return program, ranges


def _write_onnx(model: nn.Module, example: Tensor, path: Path, dynamic: Any, opset: int | None) -> Written:
    import onnxruntime

    program, ranges = _program(model, example, dynamic)
    kwargs = {"opset_version": opset} if opset else {}
    torch.onnx.export(program, (example,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
                      verbose=False, **kwargs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])), ranges


def _write_exported_program(model: nn.Module, example: Tensor, path: Path, dynamic: Any, opset: int | None) -> Written:
    program, ranges = _program(model, example, dynamic)
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module(), ranges


def _write_torchscript(model: nn.Module, example: Tensor, path: Path, dynamic: Any, opset: int | None) -> Written:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input checks read shapes as Python values
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; kept for stacks that need it
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))
        return torch.jit.load(str(path)), {}


_WRITERS = {"onnx": _write_onnx, "exported-program": _write_exported_program, "torchscript": _write_torchscript}


def _compare(run: Callable[[Tensor], Tensor], reference: nn.Module, shape: tuple[int, ...], seed: int) -> ExportCheck:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(x)
        try:
            got = run(x)
        except Exception as error:
            if str(error).startswith("Guard failed"):  # an ExportedProgram refusing a size it was not traced for
                return ExportCheck(shape, math.nan, math.nan, refused=str(error))
            raise ValueError(f"the exported model fails on an input of shape {'×'.join(map(str, shape))} "
                             f"({type(error).__name__}: {error}).") from error
    if got.shape != expected.shape:
        raise ValueError(f"the exported model gives an output of shape {tuple(got.shape)} for an input of shape "
                         f"{shape}, the PyTorch model {tuple(expected.shape)}.")
    error = (got.double() - expected.double()).abs().max().item()
    return ExportCheck(shape, error, error / max(expected.abs().max().item(), 1e-30))


def export(
    source: nn.Module | str | os.PathLike,
    path: str | os.PathLike | None = None,
    format: str = "onnx",
    *,
    input_shape: tuple[int, int, int] | int | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    fold: bool = True,
    opset: int | None = None,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Export a model, or the model of a checkpoint written by `attnkit train`, and check the file.

    The model is exported in eval mode, with its BatchNorms folded (`fuse`) unless `fold=False`. The file is
    then loaded by its runtime (onnxruntime for ONNX) and run on fresh random input of the example shape and,
    for dynamic axes, of another batch and size; each output is compared with the PyTorch model's, and a
    relative error (max |Δ| / max |reference|) above `tolerance` is an error.

    Args:
        source: an nn.Module, or the path of a training checkpoint (its input shape is then known).
        path: the file to write; default: the checkpoint's path with the format's suffix.
        format: 'onnx' (torch.onnx's torch.export-based exporter), 'exported-program' (torch.export, .pt2),
            or 'torchscript' (torch.jit.trace).
        input_shape: (C, H, W) of one image; required for a module, read from a checkpoint (where an int
            gives another side H = W to trace at).
        batch_size: the example batch (at least 2 with a dynamic batch: torch.export specialises 1).
        dynamic_batch, dynamic_size: let the batch and the spatial size vary in the exported model.
        fold: fold BatchNorms into the layers before them first.
        opset: the ONNX opset (default: the exporter's).
        tolerance: the largest relative error accepted.
    """
    if format not in FORMATS:
        raise ValueError(f"export: `format` must be one of {list(FORMATS)}, got {format!r}.")
    if isinstance(source, nn.Module):
        if input_shape is None:
            raise ValueError("export: a model needs `input_shape`=(C, H, W) of one input image; a checkpoint knows its own.")
        _check_finite(source)
        model, shape = copy.deepcopy(source).eval(), _input_shape(input_shape)
        default_path = None
    elif isinstance(source, (str, os.PathLike)):
        model, shape = _from_checkpoint(source)
        if isinstance(input_shape, int) and not isinstance(input_shape, bool):
            input_shape = (shape[0], input_shape, input_shape)
        shape = shape if input_shape is None else _input_shape(input_shape)
        default_path = Path(source).with_suffix(FORMATS[format])
    else:
        raise TypeError(f"export: `source` must be an nn.Module or a checkpoint path, got {type(source).__name__}.")
    if path is None and default_path is None:
        raise ValueError("export: pass `path`, the file to write.")
    path = Path(path) if path is not None else default_path
    if format == "exported-program" and path.suffix != ".pt2":
        raise ValueError(f"export: torch.export reads programs from .pt2 files; name the file so, got {str(path)!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"export: `batch_size` must be a positive integer, got {batch_size!r}.")
    example_shape = (max(batch_size, 2) if dynamic_batch else batch_size, *shape)
    others = _other_shapes(example_shape, dynamic_batch, dynamic_size)
    _check_sizes_taken(model, others, dynamic_size)

    exported = fuse(model) if fold else model
    folded = _count_batchnorms(model) - _count_batchnorms(exported)
    example = torch.randn(example_shape, generator=torch.Generator().manual_seed(0))
    with replacing(path) as written:
        run, ranges = _WRITERS[format](exported, example, written, _dynamic_shapes(dynamic_batch, dynamic_size), opset)
    if format == "exported-program":  # the program checks its input sizes; onnxruntime runs any, so test outside too
        others = [_within(s, ranges) for s in others]

    report = ExportReport(path, format, example_shape, dynamic_batch, dynamic_size, folded, ranges)
    hint = ("\nAn example size at which a feature map shrinks to 1×1 is a poor one to trace dynamic sizes at: export "
            "at a larger input size, or with a fixed size." if dynamic_size else "")
    for seed, s in enumerate(dict.fromkeys([example_shape, *others]), start=1):
        try:
            report.checks.append(_compare(run, model, s, seed))
        except ValueError as error:
            raise ValueError(f"{path}: {error}\n{report}{hint}") from error
    if not report.max_rel_error <= tolerance:
        raise ValueError(f"{path}: the exported model differs from the PyTorch model by {report.max_rel_error:.2e} "
                         f"(relative), more than the tolerance {tolerance:.0e}.\n{report}{hint}")
    return report
