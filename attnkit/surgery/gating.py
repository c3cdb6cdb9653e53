"""How a gate follows a layer without renaming anything: the layer's class becomes a subclass of its own class whose
forward applies the gates after the original forward (and the gates that go before it, such as GCT's before each
convolution, to its input).

The subclass is made once per original class and keeps its name, so the layer prints, loads its state dict and passes
`isinstance` checks as before. Three things are done so that the model stays an ordinary PyTorch model:
- pickling (torch.save of the whole model, copy.deepcopy) rebuilds the subclass from the original class, which is
  importable, so a saved model loads in a fresh process that imports attnkit;
- torch.fx treats the gated layer as its tracer treated the original: a layer the tracer keeps as one call (torch.nn's
  layers, by default) stays one call, which includes its gates; other layers are traced through, gates included;
- a forward hook on the gated layer sees the gated output (the gates are part of the layer's forward).

A residual block whose last layer is gated may take the same subclass, without gates of its own, to run its forward
rewritten to end in residual_end(), where its last gate adds the shortcut and takes the ReLU (end_with; the rewrites
of torchvision's and timm's blocks are in endings.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from torch import Tensor, fx, nn

from .. import kernels
from ..modules._common import hooked

__all__ = ["end_with", "gate_after", "gate_before", "gates_before", "gates_of", "is_gated", "own_class",
           "own_forward", "residual_end", "ungated", "with_gates_of"]

_GATES = "_attnkit_gates"  # the attribute of a gated layer that lists its gates (registered elsewhere as modules)
_GATES_BEFORE = "_attnkit_gates_before"  # and the gates applied to its input
_ENDING = "_attnkit_ending"  # a block's forward that ends in its last gate's pass, in place of its own (endings.py)
_GATED_CLASSES: dict[type, type] = {}


def _subclassed(module: nn.Module) -> bool:
    return _GATES in module.__dict__


def own_class(module: nn.Module) -> type:
    """`module`'s class before attach() gave it the gated subclass."""
    return type(module).__mro__[1] if _subclassed(module) else type(module)


@contextlib.contextmanager
def _as_original(module: nn.Module) -> Iterator[None]:
    gated = type(module)
    module.__class__ = own_class(module)
    try:
        yield
    finally:
        module.__class__ = gated


def _tracer_of(args: tuple, kwargs: dict) -> fx.Tracer | None:
    proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
    return None if proxy is None else proxy.tracer


def _gated_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = _tracer_of(args, kwargs)
    if tracer is not None:  # torch.fx: one call where the tracer keeps the original layer as one call
        path = tracer.path_of_module(self)
        with _as_original(self):
            leaf = tracer.is_leaf_module(self, path)
        if leaf:
            return tracer.create_proxy("call_module", path, args, kwargs)
    return _through(self, args, kwargs, self.__dict__[_GATES])


def _through(layer: nn.Module, args: tuple, kwargs: dict, after: list[nn.Module]) -> Any:
    """`layer`'s own forward (or the ending end_with() gave it) on its input passed through the gates before it, then
    through the gates `after`."""
    before = layer.__dict__.get(_GATES_BEFORE, ())
    if before:
        first = args[0]
        for gate in before:
            first = gate(first)
        args = (first, *args[1:])
    out = layer.__dict__.get(_ENDING, own_forward)(layer, *args, **kwargs)
    for gate in after:
        out = gate(out)
    return out


def residual_end(layer: nn.Module, x: Tensor, residual: Tensor, relu: nn.Module) -> Tensor:
    """relu(layer(x) + residual): how the residual blocks of attnkit's networks end. Where attach() put attention
    after `layer`, the last module gating it ends the block instead (its forward_residual: attnkit's modules with a
    fused path add the residual and take the ReLU in the pass that writes their output). As written wherever a
    difference could show: while the model is traced, exported or compiled (attnkit.kernels.reference_only), while a
    hook observes `layer` or `relu`, and when `relu` is not an nn.ReLU."""
    gates = layer.__dict__.get(_GATES)
    if (not gates or not hasattr(gates[-1], "forward_residual") or type(relu) is not nn.ReLU
            or kernels.reference_only(x) or kernels.reference_only(residual) or hooked({"layer": layer, "relu": relu})):
        return relu(layer(x) + residual)
    return gates[-1].forward_residual(_through(layer, (x,), {}, gates[:-1]), residual)


def own_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of `module`'s own class, as written: without the gates attach() put around it."""
    return own_class(module).forward(module, *args, **kwargs)


def end_with(block: nn.Module, forward: Callable[..., Any]) -> None:
    """Make `block` run `forward(block, x)` in place of its own forward: the same function, written to end in
    residual_end() (endings.py). `forward` must be importable by name, so that the block pickles."""
    _subclassed_dict(block)[_ENDING] = forward


def _rebuild(original: type) -> nn.Module:
    """An empty instance of the gated subclass of `original`, for pickle to fill with the saved state."""
    gated = _gated_class(original)
    return gated.__new__(gated)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    return _rebuild, (own_class(self),), self.__dict__


def _extra_repr(self: nn.Module) -> str:
    own = own_class(self).extra_repr(self)
    before = ", ".join(type(g).__name__ for g in self.__dict__.get(_GATES_BEFORE, ()))
    after = ", ".join(type(g).__name__ for g in self.__dict__[_GATES])
    parts = [own] + ([f"input through {before}"] if before else []) + ([f"then {after}"] if after else [])
    return ", ".join(p for p in parts if p)


def _gated_class(original: type) -> type:
    if original not in _GATED_CLASSES:
        _GATED_CLASSES[original] = type(original.__name__, (original,), {
            "forward": _gated_forward,
            "__reduce_ex__": _reduce_ex,
            "extra_repr": _extra_repr,
            "__module__": __name__,
            "__qualname__": original.__qualname__,
            "__doc__": f"{original.__qualname__}, with the attention modules attnkit.attach() put before and after it.",
        })
    return _GATED_CLASSES[original]


def is_gated(module: nn.Module) -> bool:
    """Whether attach() put attention after `module` or before it."""
    return bool(module.__dict__.get(_GATES) or module.__dict__.get(_GATES_BEFORE))


def gates_of(module: nn.Module) -> list[nn.Module]:
    """The attention modules attach() applies after `module`'s output (empty if none)."""
    return list(module.__dict__.get(_GATES, ()))


def gates_before(module: nn.Module) -> list[nn.Module]:
    """The attention modules attach() applies to `module`'s input, in order (empty if none)."""
    return list(module.__dict__.get(_GATES_BEFORE, ()))


def _subclassed_dict(layer: nn.Module) -> dict:
    """`layer`'s __dict__, its class made the gated subclass of its own (with no gates yet) if it was not."""
    if not _subclassed(layer):
        layer.__class__ = _gated_class(type(layer))
        layer.__dict__[_GATES] = []
    layer.__dict__.setdefault(_GATES_BEFORE, [])
    return layer.__dict__


def gate_after(layer: nn.Module, gate: nn.Module) -> None:
    """Make `layer` apply `gate` to its output (after any gates it already applies). `gate` must also be registered as
    a module somewhere in the model (attach() registers it in the block), so that it is saved, moved and switched to
    eval mode with the model."""
    _subclassed_dict(layer)[_GATES].append(gate)


def gate_before(layer: nn.Module, gate: nn.Module) -> None:
    """Make `layer` apply `gate` to its (first) input, after any gates it already applies there; `gate` registered as
    for gate_after()."""
    _subclassed_dict(layer)[_GATES_BEFORE].append(gate)


@contextlib.contextmanager
def ungated(module: nn.Module) -> Iterator[nn.Module]:
    """`module` as its original class, without its gates, inside the block (to copy or transform the layer alone);
    gated again after it."""
    if not _subclassed(module):
        yield module
        return
    gated, original = type(module), own_class(module)
    lists = {key: module.__dict__.pop(key) for key in (_GATES, _GATES_BEFORE, _ENDING) if key in module.__dict__}
    module.__class__ = original
    try:
        yield module
    finally:
        module.__class__ = gated
        module.__dict__.update(lists)


def with_gates_of(source: nn.Module, replacement: nn.Module) -> nn.Module:
    """`replacement`, made to apply the gates that follow `source` and those before it (when a gated layer is swapped,
    e.g. a BN folded into its convolution becomes an Identity that still gates)."""
    for gate in gates_before(source):
        gate_before(replacement, gate)
    for gate in gates_of(source):
        gate_after(replacement, gate)
    return replacement
