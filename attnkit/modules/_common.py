"""What every attention module shares: input checks, argument checks, activations and pooled statistics.

Numerics convention: statistics pooled from the feature map are computed in at least float32, the small
gate networks run with autocast off in their parameters' dtype, and the gate is cast to the input's dtype
only for the final product, so fp16/bf16 autocast cannot overflow inside the attention branch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from .. import kernels
from ..kernels import cpu
from ..kernels.backend import Backend
from ..kernels.functions import conv_planes
from ..registry import did_you_mean

__all__ = [
    "check_feature_map",
    "make_activation",
    "make_gate",
    "reduced_width",
    "positive_int",
    "odd_kernel",
    "dividing",
    "one_of",
    "stat_dtype",
    "gate_math",
    "gate_conv",
    "in_format_of",
    "check_groups",
    "gate_path",
    "pointwise",
    "Derivative",
    "DERIVATIVES",
    "derivatives_known",
    "autocast_off",
    "CAFFE_BN_MOMENTUM",
    "caffe_msra_",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "hard_swish": nn.Hardswish,
    "gelu": nn.GELU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

GATES: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
}


def one_of(owner: str, name: str, value: object, valid: Sequence[str]) -> str:
    """Return `value` if it is one of `valid`, else raise a ValueError that lists them."""
    if not isinstance(value, str):
        raise TypeError(f"{owner}: `{name}` must be one of {list(valid)}, got {value!r} ({type(value).__name__}).")
    if value not in valid:
        raise ValueError(f"{owner}: `{name}` must be one of {list(valid)}, got {value!r}.{did_you_mean(value, valid)}")
    return value


def positive_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    """Return `value` as an int if it is an integer >= minimum, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value}.")
    return value


def odd_kernel(owner: str, name: str, value: object) -> int:
    """A positive odd kernel size (odd so that 'same' padding is symmetric)."""
    value = positive_int(owner, name, value)
    if value % 2 == 0:
        raise ValueError(f"{owner}: `{name}` must be odd so the padding is symmetric, got {value}.")
    return value


def dividing(owner: str, name: str, value: object, channels: int, what: str = "the channel count") -> int:
    """`value` as an int >= 1 that divides `channels`, else an error that names both and the divisor to use instead."""
    value = positive_int(owner, name, value)
    if channels % value:
        fit = max(d for d in range(1, min(value, channels) + 1) if channels % d == 0)
        raise ValueError(f"{owner}: `{name}`={value} must divide {what} {channels}; pass {name}={fit} (the largest "
                         f"divisor of {channels} up to {value}) for this layer.")
    return value


def reduced_width(owner: str, channels: int, reduction: object, hidden_channels: object = None, minimum: int = 1) -> int:
    """Width of a bottleneck: `hidden_channels` if given, else max(minimum, channels // reduction) as in the papers."""
    if hidden_channels is not None:
        return positive_int(owner, "hidden_channels", hidden_channels)
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not math.isfinite(reduction):
        raise TypeError(f"{owner}: `reduction` must be a positive number, got {reduction!r}.")
    if reduction < 1:
        raise ValueError(
            f"{owner}: `reduction` is the divisor r of C/r and must be >= 1, got {reduction}. For timm's "
            f"rd_ratio=1/16 pass reduction=16; for a bottleneck wider than C pass hidden_channels."
        )
    return max(minimum, int(channels // reduction))


def _make_layer(owner: str, name: str, spec: object, table: dict[str, Callable[[], nn.Module]]) -> nn.Module:
    if isinstance(spec, str):
        return table[one_of(owner, name, spec, sorted(table))]()
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec()
    raise TypeError(
        f"{owner}: `{name}` must be a name from {sorted(table)} or an nn.Module class, got {spec!r}."
    )


def make_activation(owner: str, spec: object) -> nn.Module:
    """The hidden activation: a name ('relu', 'silu', 'hard_swish', ...) or an nn.Module class."""
    return _make_layer(owner, "act", spec, ACTIVATIONS)


def make_gate(owner: str, spec: object) -> nn.Module:
    """The gating function: 'sigmoid' (the papers'), 'hard_sigmoid', or an nn.Module class."""
    return _make_layer(owner, "gate", spec, GATES)


#: PyTorch's BatchNorm momentum for the Caffe definitions' moving-average momentum 0.95 (GENet's and SKNet's BatchNorm
#: layers pass 1 − 0.95 to cuDNN as the weight of the new batch, which is what PyTorch's momentum is)
CAFFE_BN_MOMENTUM = 0.05


def caffe_msra_(weight: Tensor) -> Tensor:
    """Caffe's "msra" weight filler, in place: N(0, 2 / fan_in) with fan_in the weights per output channel (for a
    convolution, its input channels per group times its kernel's area)."""
    return weight.normal_(0.0, math.sqrt(2.0 / weight[0].numel()))


BatchNormViews = tuple[tuple[tuple[int, ...], int], ...]


@torch.fx.wrap
def check_feature_map(x: Tensor, channels: int, owner: str, batchnorm_views: BatchNormViews) -> Tensor:
    """Check that `x` is an N×C×H×W floating tensor with the expected C; return it unchanged.

    `batchnorm_views` describes, for each BatchNorm inside the module, how many values it sees per channel
    while training: a view (dims, stride) sees N·∏_d ⌈x.shape[d] / stride⌉ values (dims () for a BatchNorm
    over pooled per-sample statistics). BatchNorm cannot train on a single value, and the error says so.
    Wrapped for torch.fx, so that symbolic tracing records it as one call instead of failing on shapes.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor of shape (N, {channels}, H, W), got {type(x).__name__}.")
    if x.dim() != 4:
        raise ValueError(
            f"{owner} expects a 4-D feature map (N, C={channels}, H, W), got a {x.dim()}-D tensor of shape "
            f"{tuple(x.shape)}. Add the missing dimensions, e.g. x.unsqueeze(0) for a single image."
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{owner} was built for {channels} channels but the input has {x.shape[1]} "
            f"(shape {tuple(x.shape)}). Build the module with channels={x.shape[1]}."
        )
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point tensor, got dtype {x.dtype}.")
    if x.numel() == 0:
        raise ValueError(f"{owner} got an empty tensor of shape {tuple(x.shape)}; every dimension must be >= 1.")
    for dims, stride in batchnorm_views:
        values = x.shape[0]
        for d in dims:
            values *= -(-x.shape[d] // stride)
        if values < 2:
            raise ValueError(
                f"{owner} contains a BatchNorm that would see a single value per channel for an input of shape "
                f"{tuple(x.shape)}, and BatchNorm cannot train on one value. Train with a batch of 2 or more "
                f"(or a larger map), or call .eval() for inference, which works for any shape."
            )
    return x


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype pooled statistics are computed in: float32 for half types, else x's own (float64 stays)."""
    return torch.promote_types(x.dtype, torch.float32)


def gate_math(x: Tensor) -> contextlib.AbstractContextManager:
    """A context in which the small gate networks run with autocast off (in their parameters' dtype)."""
    if isinstance(x, Tensor):  # a torch.fx Proxy while tracing: nothing to switch
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _pooled_maps_for_conv(pooled: Tensor, dtype: torch.dtype) -> Tensor:
    """Pooled maps (N×2×A×B) in `dtype`, laid out for the 2 -> 1 channel gate convolution of CBAM and Triplet
    Attention: channels_last on the CPU, where PyTorch runs that convolution's backward about 3× faster from it
    (32×2×512×28 maps: 93 -> 28 ms forward+backward; 32×2×28×28: 5.6 -> 2.0 ms). A torch.fx Proxy passes as is."""
    pooled = pooled.to(dtype)
    if isinstance(pooled, Tensor) and pooled.device.type == "cpu":
        return pooled.contiguous(memory_format=torch.channels_last)
    return pooled


def _direct_conv_serves(conv: nn.Conv2d, maps: Tensor) -> bool:
    k = conv.kernel_size[0]
    return (kernels.get_mode() in ("auto", "cpu") and not kernels.reference_only(maps) and maps.device.type == "cpu"
            and maps.dtype == conv.weight.dtype == torch.float32 and conv.out_channels == 1 and conv.groups == 1
            and conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == (k // 2, k // 2)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not hooked({"conv": conv}) and cpu.unavailable() is None)


def gate_conv(conv: nn.Conv2d, maps: Tensor) -> Tensor:
    """conv(maps) for the k×k 'same' convolution of a few pooled maps (N×P×A×B) into one gate map: CBAM's spatial gate
    and Triplet Attention's branches. On the CPU in float32, outside `reference_only` and unless a hook observes the
    convolution, the same function by the CPU backend's direct kernels (attnkit.kernels.functions.conv_planes):
    PyTorch's CPU convolution runs this shape far below its arithmetic's speed, its backward most of all."""
    if _direct_conv_serves(conv, maps):
        out = conv_planes(maps, conv.weight)
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)
    return conv(_pooled_maps_for_conv(maps, conv.weight.dtype))


@torch.fx.wrap
def in_format_of(y: Tensor, x: Tensor) -> Tensor:
    """`y` in the memory format of `x` (channels_last in, channels_last out), for modules whose group reshapes or channel
    shuffles lose it. Wrapped for torch.fx, which cannot ask a Proxy for its strides: call it as `_common.in_format_of`,
    the name torch.fx patches while tracing."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y


def check_groups(owner: str, channels: int, groups: object, halves: bool = False) -> int:
    """`groups` as an int when the channels split into that many equal groups (each of two equal halves, with `halves`),
    else a ValueError naming both counts."""
    groups = positive_int(owner, "groups", groups)
    multiple = 2 * groups if halves else groups
    if channels % multiple:
        what = f"2·groups = {multiple} (each group splits into two halves)" if halves else f"groups = {groups}"
        raise ValueError(
            f"{owner}: channels = {channels} must be a multiple of {what}. Build it for a channel count that is, or "
            f"pass `groups` that divide{' half of' if halves else ''} {channels}."
        )
    return groups


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _observed(children: dict[str, nn.Module | None]) -> bool:
    """Whether a forward or backward hook would see one of these modules, or one inside them, run."""
    for m in children.values():
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                              or (m._modules and _observed(m._modules))):
            return True
    return False


def gate_path(module: nn.Module, x: Tensor, forward_pays: bool = True) -> tuple[Backend | None, bool]:
    """How `module` computes its gates for input `x`: the backend of the fused path, or None
    (attnkit.kernels.backend_for), and whether it may compute its gate network without calling the submodules that
    make it, as the same function in fewer and cheaper operations (`pointwise` for 1×1 convolutions over pooled
    maps). Neither where the reference formulas are required (attnkit.kernels.reference_only: 'reference' mode,
    tracing, export, torch.compile); no fast gate network while a hook observes a submodule (attnkit.capture, prune
    and explain record them), or a global module hook is set."""
    backend, fast = kernels.route(x, forward_pays)
    return backend, fast and not hooked(module._modules)


def hooked(children: dict[str, nn.Module | None]) -> bool:
    """Whether a hook would see one of these modules, or one inside them, run: their own or a global module hook."""
    return _observed(children) or any(getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS)


def residual_path(module: nn.Module, x: Tensor, residual: object,
                  forward_pays: bool = True) -> tuple[Backend | None, bool]:
    """gate_path for a module asked to end a residual block (forward_residual): no backend unless `residual` is a
    tensor of x's shape, dtype, device and strides (the fused pass reads both alike) and no hook observes the module,
    whose own call the fused path makes without."""
    fits = (type(residual) is Tensor and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.device == x.device and residual.stride() == x.stride())
    if not fits or hooked({"module": module}):  # the module and everything in it, so gate_path's check is made
        return None, False
    return kernels.route(x, forward_pays)


def pointwise(conv: nn.Conv2d, rows: Tensor) -> Tensor:
    """A 1×1 convolution applied to rows of channels ([..., C_in] -> [..., C_out]) as F.linear: the product conv()
    computes on N×C×1×1 maps, with the same weight and bias, at a fraction of the CPU convolution's per-call cost."""
    return F.linear(rows, conv.weight.flatten(1), conv.bias)


class Derivative(NamedTuple):
    """An activation or gate as a gate network (kernels.functions.GateNetwork) writes it out: its forward, and its
    backward from the output's gradient, the input and the output, as the operation's own autograd node computes it."""

    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tensor]


#: the activations and gates whose derivatives the gate networks write out
DERIVATIVES: dict[type[nn.Module], Derivative] = {
    nn.ReLU: Derivative(torch.relu, lambda grad, z, out: torch.ops.aten.threshold_backward(grad, out, 0)),
    nn.SiLU: Derivative(F.silu, lambda grad, z, out: torch.ops.aten.silu_backward(grad, z)),
    nn.Hardswish: Derivative(F.hardswish, lambda grad, z, out: torch.ops.aten.hardswish_backward(grad, z)),
    nn.Sigmoid: Derivative(torch.sigmoid, lambda grad, z, out: torch.ops.aten.sigmoid_backward(grad, out)),
    nn.Hardsigmoid: Derivative(F.hardsigmoid, lambda grad, z, out: torch.ops.aten.hardsigmoid_backward(grad, z)),
}


def derivatives_known(*layers: nn.Module) -> bool:
    """Whether DERIVATIVES has each of these activations and gates: a GateNetwork built from them can write out its
    backward."""
    return all(type(layer) in DERIVATIVES for layer in layers)


def batched_pointwise(conv: nn.Conv2d, maps: Tensor) -> Tensor:
    """A 1×1 convolution applied to N×C_in×L maps (-> N×C_out×L) as one product per sample, batched: the product
    conv() computes on N×C_in×L×1 maps, without copying the maps into rows of channels."""
    weight = conv.weight.flatten(1).expand(maps.shape[0], -1, -1)
    return torch.bmm(weight, maps) if conv.bias is None else torch.baddbmm(conv.bias[None, :, None], weight, maps)


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """gate_math for the fast paths: a context with autocast off for x's device, entered only where autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()
