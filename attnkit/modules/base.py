"""What an attention module declares about itself, which attnkit's tools read instead of keeping tables of their own.

    placement, first_stage   attach(where="auto"): where in a network the module goes
    gate_probes()            attnkit.capture: the gates it records, by name
    channel_weights()        attnkit stats / prune: one weight per channel and sample, from one pass's gates
    spatial_map()            attnkit explain: the N×h×w map to draw, from one pass's gates
    fixed_spatial_size       attnkit export: the one input size the module takes, if it takes only one
    init_in_network()        attach() and create_model(): what the official network code re-initialises after building
    forward_residual()       the residual blocks of attnkit's networks: max(module(x) + residual, 0) at their end

AttentionModule gives every name a default. A registered module that does not subclass it may define any of them;
the functions below fall back to the same defaults, which read a child called `gate` (the convention of attnkit's
modules and of timm's): its output is the recorded gate "gate", and its spatial mean the channel weights.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from .. import kernels
from ..kernels.backend import Backend
from ..kernels.functions import channel_gate
from ..registry import registered_classes
from . import _common
from ._common import BatchNormViews, positive_int

__all__ = [
    "AttentionModule",
    "Probe",
    "ChannelGateAttention",
    "RowColumnAttention",
    "PLACEMENTS",
    "TIMM_KEYWORDS",
    "channel_weights",
    "channel_weights_unavailable",
    "fixed_spatial_size",
    "gate_probes",
    "init_in_network",
    "is_attention_module",
    "output",
    "placement_of",
    "spatial_map",
    "spatial_mean",
]

# (submodule whose forward is observed, gate name, the gate's value from that submodule's inputs and output)
Probe = tuple[nn.Module, str, Callable[[tuple, Tensor], Tensor]]
PLACEMENTS = ("block", "after_conv", "before_norm", "before_conv", "stage", "conv")


def output(inputs: tuple, out: Tensor) -> Tensor:
    """A probe's value: the observed submodule's output as it is."""
    return out


#: timm's keyword conventions for attention layers (timm builds them as `attn_layer(channels, **these)`), taken by every
#: AttentionModule with their meaning where the module has the part they describe, and without effect where it has
#: none (rd_* for a module without a bottleneck, act_layer for one without a hidden activation)
TIMM_KEYWORDS = ("rd_ratio", "rd_channels", "rd_divisor", "act_layer", "gate_layer", "device", "dtype")


def _make_divisible(value: float, divisor: int) -> int:
    """timm's rounding of an attention layer's bottleneck width (make_divisible with round_limit=0): the nearest multiple
    of `divisor`, at least `divisor`."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def _from_timm(owner: str, channels: int, given: dict[str, Any], parameters: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """attnkit keyword arguments for timm's (TIMM_KEYWORDS but device and dtype)."""
    translated: dict[str, Any] = {}
    if "hidden_channels" in parameters:
        ratio, width, divisor = given.get("rd_ratio"), given.get("rd_channels"), given.get("rd_divisor")
        if width is not None:
            translated["hidden_channels"] = width
        elif ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio:
                raise ValueError(f"{owner}: `rd_ratio` (timm's C/r ratio) must be a positive number, got {ratio!r}.")
            translated["hidden_channels"] = _make_divisible(channels * ratio, divisor) if divisor else max(1, round(channels * ratio))
    for timm_name, own in (("act_layer", "act"), ("gate_layer", "gate")):
        if given.get(timm_name) is not None and own in parameters:
            translated[own] = given[timm_name]
    return translated


def _taking_timm_keywords(init: Callable) -> Callable:
    parameters = inspect.signature(init).parameters

    @functools.wraps(init)
    def __init__(self: nn.Module, channels: int, *args: Any, **kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in TIMM_KEYWORDS if k in kwargs}
        translated = _from_timm(type(self).__name__, channels, given, parameters)
        both = sorted(set(translated) & set(kwargs))
        if both:
            raise ValueError(f"{type(self).__name__}: {', '.join(both)} given twice, as attnkit's keyword and as timm's "
                             f"({', '.join(k for k in given if k not in ('device', 'dtype'))}).")
        init(self, channels, *args, **kwargs, **translated)
        if given.get("device") is not None or given.get("dtype") is not None:
            self.to(device=given.get("device"), dtype=given.get("dtype"))

    return __init__


class AttentionModule(nn.Module):
    """Base of attnkit's modules: records `channels`, validates the input of `forward`, and declares defaults for
    what the tools read (this file's docstring).

    Subclasses that contain a BatchNorm which may see too few values to train list what it sees in
    `batchnorm_views` (see `check_feature_map`).
    """

    #: "block": in every block, where the block's layout says (before the residual addition, after the depthwise
    #: stage, ...); "after_conv": in every block, after its 3×3 convolution (and that convolution's BN); "before_norm": in
    #: every block, on the output of its last k×k (k > 1) convolution, before that convolution's normalisation (SimAM);
    #: "before_conv": on the input of every convolution of the network (GCT); "stage": once before every downsampling
    #: (BAM); "conv": in place of each block's 3×3 convolution (SK).
    placement: ClassVar[str] = "block"
    #: with placement "block": "residual" (inside the block, as above) or "output" (after the block, as non-local
    #: blocks go between residual blocks); attach(position=...) overrides it
    default_position: ClassVar[str] = "residual"
    #: with where="auto", the first stage (1-based; a stage ends where the resolution changes) that gets the module,
    #: or the stages that do (None: every stage from first_stage on); attach(stages=...) overrides them
    first_stage: ClassVar[int] = 1
    default_stages: ClassVar[tuple[int, ...] | None] = None
    #: with where="auto": in each stage, the last site and every k-th one before it (non-local blocks: 2, every other
    #: block); attach(every=...) overrides it
    default_every: ClassVar[int] = 1
    #: the name under which capture() records the child `gate`, and whose spatial mean channel_weights() takes
    gate_name: ClassVar[str] = "gate"
    batchnorm_views: BatchNormViews = ()
    #: keywords every module takes besides its own (the registry's argument check accepts them)
    accepted_keywords: ClassVar[tuple[str, ...]] = TIMM_KEYWORDS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each module's constructor also takes timm's keywords (TIMM_KEYWORDS), so that it works as timm's
        `attn_layer` / `se_layer`."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _taking_timm_keywords(cls.__dict__["__init__"])

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = positive_int(type(self).__name__, "channels", channels)

    def check_input(self, x: Tensor) -> Tensor:
        views = self.batchnorm_views if self.training else ()
        # through the module, where torch.fx.wrap patches it while tracing
        return _common.check_feature_map(x, self.channels, type(self).__name__, views)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    @property
    def fixed_spatial_size(self) -> tuple[int, int] | None:
        """(H, W) when the module takes feature maps of that size only (a kernel that covers the map), else None."""
        return None

    def gate_probes(self) -> list[Probe]:
        """The gates attnkit.capture records: the output of the child `gate`, named `gate_name`."""
        gate = getattr(self, "gate", None)
        return [(gate, _gate_name(self), output)] if isinstance(gate, nn.Module) else []

    def channel_weights_unavailable(self) -> str | None:
        """Why channel_weights() has nothing to give (None when it has)."""
        if any(name == _gate_name(self) for _, name, _ in gate_probes(self)):
            return None
        return f"it records no gate {_gate_name(self)!r} to take channel weights from"

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """One weight per channel and sample (N×C, float32) from one forward pass's gates: the spatial mean of the
        gate `gate_name` (N×C×h×w)."""
        return spatial_mean(self, gates, _gate_name(self))

    def spatial_map(self, gates: Mapping[str, Tensor]) -> tuple[str, Tensor] | None:
        """(gate name, N×h×w map) to draw over the image: the first gate with more than one position, averaged over
        its channels; None when every gate is one value per channel."""
        return next(((name, g.float().mean(1)) for name, g in gates.items() if g.dim() == 4 and g.shape[-2:].numel() > 1),
                    None)

    def init_in_network(self) -> None:
        """Re-initialise the module as its paper's official network code does once the network is built (attach() and
        create_model() call it unless init="pytorch"). By default nothing: where the official code leaves the
        module as its layers' constructors made it, PyTorch's initialisation is already the paper's."""

    def forward_residual(self, x: Tensor, residual: Tensor, relu: bool = True) -> Tensor:
        """The end of a residual block whose last layer this module gates: max(self(x) + residual, 0), or the sum
        alone without `relu`. Modules on a fused path may add the residual and take the ReLU in the pass that writes
        their output (ChannelGateAttention; CBAM, Coordinate Attention)."""
        y = self(x) + residual
        return y.relu_() if relu else y  # y is the sum's own tensor, which autograd does not keep


class ChannelGateAttention(AttentionModule):
    """Base of the modules whose fused path is attnkit.kernels.functions.channel_gate, one gate per channel from the
    means over H×W (and their M2): SE, ECA, SRM, Gather-Excite θ⁻. On that path forward_residual adds the block's
    residual and takes its ReLU in the pass that writes the gated map, and the backward masks and reduces dy in one
    pass: of the seven passes over the map that the gate, the sum and the ReLU make apart, four remain, and the
    results are those of the separate operations, bit for bit."""

    #: gate_path's forward_pays: whether the fused forward pays without autograd (the module's reference forward
    #: makes more passes than a mean and a product). Ending a block, it always does: two passes and a read of the
    #: residual against the gate's, the addition's and the ReLU's four (ResNet-50, batch 1: BENCHMARKS.md)
    fused_forward_pays: ClassVar[bool] = False

    def _fused_gate(self, x: Tensor, fast: bool) -> tuple[Callable[..., Tensor], bool] | None:
        """(the gate from the pooled statistics, whether it takes their M2 too) for channel_gate, or None where this
        configuration of the module has no such path. A kernels.functions.GateNetwork, whose backward is written out,
        makes channel_gate one autograd node (SE, ECA)."""
        raise NotImplementedError

    def _fused_path(self, x: Tensor, backend: Backend | None,
                    fast: bool) -> tuple[Backend, Callable[..., Tensor], bool] | None:
        """(backend, gate, with_m2) for channel_gate, or None for the formulas: the routed backend, or where 'auto'
        routed x to the formulas for its size, the CPU's whole-module kernel if it runs this gate network
        (kernels.whole_module)."""
        if backend is None and not fast:
            return None
        fused = self._fused_gate(x, fast)
        if fused is not None and backend is None:
            backend = kernels.whole_module(x, getattr(fused[0], "weights", None))
        return None if fused is None or backend is None else (backend, *fused)

    def forward_residual(self, x: Tensor, residual: Tensor, relu: bool = True) -> Tensor:
        x = self.check_input(x)
        forward_pays = self.fused_forward_pays or not torch.is_grad_enabled()
        fused = self._fused_path(x, *_common.residual_path(self, x, residual, forward_pays))
        if fused is None:
            return super().forward_residual(x, residual, relu)
        backend, gate, with_m2 = fused
        return channel_gate(backend, x, gate, with_m2, residual, relu)


class RowColumnAttention(AttentionModule):
    """Base of the modules that scale x by a gate per row, aʰ (N×C×H×1), and one per column, aʷ (N×C×1×W), which
    capture() records as "a_h" and "a_w" (Coordinate Attention, ELA)."""

    def channel_weights_unavailable(self) -> str | None:
        return None

    def channel_weights(self, gates: Mapping[str, Tensor]) -> Tensor:
        """The mean over positions of the product aʰ(i)·aʷ(j) by which x is scaled, which factors into the two means."""
        return gates["a_h"].float().mean((2, 3)) * gates["a_w"].float().mean((2, 3))

    def spatial_map(self, gates: Mapping[str, Tensor]) -> tuple[str, Tensor]:
        """aʰ(i)·aʷ(j), averaged over the channels."""
        return "a_h·a_w", (gates["a_h"].float() * gates["a_w"].float()).mean(1)


def _gate_name(module: nn.Module) -> str:
    return getattr(module, "gate_name", "gate")


def spatial_mean(module: nn.Module, gates: Mapping[str, Tensor], name: str) -> Tensor:
    """The gate `name` (N×C×h×w) averaged over its positions: N×C, float32."""
    gate = gates[name]
    channels = getattr(module, "channels", None)
    if gate.dim() != 4 or gate.shape[1] != (channels or max(2, gate.shape[1])):
        raise ValueError(
            f"{type(module).__name__}: its gate {name!r} has shape {tuple(gate.shape)}, not N×C×h×w"
            f"{f' with C = {channels}' if channels else ''}: not one weight per channel. Define "
            f"channel_weights(gates) on the module, or channel_weights_unavailable() returning why it has none."
        )
    return gate.float().mean((2, 3))


# The functions the tools call: the module's own declaration where it has one, AttentionModule's default otherwise.
def _declared(module: nn.Module, name: str) -> Callable:
    own = getattr(type(module), name, None)
    return (own if callable(own) else getattr(AttentionModule, name)).__get__(module)


def is_attention_module(module: nn.Module) -> bool:
    """An attnkit module, or an instance of a class registered with attnkit.register."""
    return isinstance(module, AttentionModule) or type(module) in registered_classes()


def placement_of(factory: object) -> str:
    """Where attach(where="auto") puts the modules `factory` builds (its `placement`, "block" by default)."""
    placement = getattr(factory, "placement", "block")
    if placement not in PLACEMENTS:
        raise ValueError(f"{getattr(factory, '__name__', factory)!r} declares placement={placement!r}; expected one of "
                         f"{list(PLACEMENTS)}.")
    return placement


def gate_probes(module: nn.Module) -> list[Probe]:
    return _declared(module, "gate_probes")()


def channel_weights_unavailable(module: nn.Module) -> str | None:
    if not hasattr(type(module), "channel_weights_unavailable") and callable(getattr(type(module), "channel_weights", None)):
        return None  # a module of the user's that gives channel weights and does not say when it cannot
    return _declared(module, "channel_weights_unavailable")()


def channel_weights(module: nn.Module, gates: Mapping[str, Tensor]) -> Tensor:
    return _declared(module, "channel_weights")(gates)


def spatial_map(module: nn.Module, gates: Mapping[str, Tensor]) -> tuple[str, Tensor] | None:
    return _declared(module, "spatial_map")(gates)


def fixed_spatial_size(module: nn.Module) -> tuple[int, int] | None:
    return getattr(module, "fixed_spatial_size", None)


def init_in_network(module: nn.Module) -> None:
    """The module's network-level initialisation, if its class declares one (a module of the user's need not)."""
    own = getattr(type(module), "init_in_network", None)
    if callable(own):
        with torch.no_grad():
            own(module)
