"""Record what the attention modules compute: their gates, by module name, during forward passes."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import kernels
from .modules import (
    BAM,
    CBAM,
    ECA,
    SRM,
    CoordAttention,
    GatherExcite,
    GlobalContext,
    SelectiveKernel,
    SqueezeExcite,
    TripletAttention,
)

__all__ = ["Gates", "capture"]

Gates = dict[str, dict[str, list[Tensor]]]
# (submodule whose forward is observed, gate name, its value from the submodule's inputs and output)
Probe = tuple[nn.Module, str, Callable[[tuple, Tensor], Tensor]]


def _output(inputs: tuple, out: Tensor) -> Tensor:
    return out


def _coord(m: CoordAttention) -> list[Probe]:
    return [(m.conv_h, "a_h", lambda i, o: m.gate(o)), (m.conv_w, "a_w", lambda i, o: m.gate(o))]


def _gc(m: GlobalContext) -> list[Probe]:
    probes: list[Probe] = []
    if m.conv_mask is not None:  # softmax of the mask logits over the H·W positions, as GlobalContext.context()
        probes.append((m.conv_mask, "weights",
                       lambda i, o: o.to(torch.promote_types(o.dtype, torch.float32)).flatten(1).softmax(1).view(o.shape)))
    transforms = [(m.channel_mul_conv, "mul", lambda i, o: torch.sigmoid(o)), (m.channel_add_conv, "add", _output)]
    transforms = [(t, name, f) for t, name, f in transforms if t is not None]
    probes.append((transforms[0][0], "context", lambda i, o: i[0]))  # the context is each transform's input
    return probes + transforms


def _sk(m: SelectiveKernel) -> list[Probe]:
    return [(m.fc_select, "paths", lambda i, o: o.unflatten(1, (len(m.paths), m.out_channels)).softmax(dim=1))]


_PROBES: list[tuple[type, Callable[[nn.Module], list[Probe]]]] = [
    (SqueezeExcite, lambda m: [(m.gate, "channel", _output)]),
    (ECA, lambda m: [(m.gate, "channel", lambda i, o: o[:, 0, :, None, None])]),  # N×1×C -> N×C×1×1
    (SRM, lambda m: [(m.gate, "channel", _output)]),
    (GatherExcite, lambda m: [(m.gate, "gate", _output)]),
    (CBAM, lambda m: [(m.channel_gate, "channel", _output)]
     + ([(m.spatial_gate, "spatial", _output)] if m.spatial_gate is not None else [])),
    (BAM, lambda m: [(m.gate, "attention", _output)]),
    (CoordAttention, _coord),
    (TripletAttention, lambda m: [
        (m.cw, "cw", lambda i, o: o.transpose(1, 2)),  # N×1×C×W -> N×C×1×W
        (m.hc, "hc", lambda i, o: o.permute(0, 3, 2, 1)),  # N×1×H×C -> N×C×H×1
        *([(m.hw, "hw", _output)] if m.hw is not None else []),
    ]),
    (GlobalContext, _gc),
    (SelectiveKernel, _sk),
]


def _probes(module: nn.Module) -> list[Probe] | None:
    return next((probes(module) for cls, probes in _PROBES if isinstance(module, cls)), None)


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[Gates]:
    """Record the gates of every attention module in `model` during the forward passes run inside the block.

        with attnkit.capture(net) as gates:
            net(x)
        gates["layer1.0.attn"]["channel"][0]   # SE's channel weights s in the first pass, N×C×1×1

    `gates[name][gate]` is a list with one detached tensor per forward pass of that module, in call order;
    `name` is the attention module's name in model.named_modules() (with attach(identity_init=True) the
    wrapped module's, `layer1.0.attn.module`). Each module's entry is there, empty, before it runs. Gates:

        se, eca, srm   channel             N×C×1×1
        ge             gate                N×C×h×w, before upsampling (h = w = 1 for the global extent)
        cbam           channel, spatial    Mc N×C×1×1, Ms N×1×H×W (no spatial with no_spatial=True)
        bam            attention           σ(Mc + Ms) (or σ(Mc·Ms)), N×C×H×W; the module returns x·(1 + this)
        coord          a_h, a_w            N×C×H×1, N×C×1×W
        triplet        cw, hc, hw          N×C×1×W, N×C×H×1, N×1×H×W (no hw with no_spatial=True)
        gc             weights, context,   attention pooling softmax N×1×H×W (pooling='att'), c N×C×1×1,
                       mul, add            σ(transform(c)) and transform(c) N×C×1×1, for the fusions used
        sk             paths               softmax over the M paths, N×M×C×1×1

    Forward hooks on the submodules that compute the gates are registered on entering the block and removed
    on leaving it, also when it raises; outside the block nothing is registered. The hooks read what the
    modules compute and change no output; inside the block the modules run their reference formulas (see
    attnkit.kernels), which call those submodules. Modules of other classes are not recorded; a network without
    attention gives an empty dict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: `model` must be an nn.Module, got {type(model).__name__}.")
    gates: Gates = {}
    handles = []
    try:
        for name, module in model.named_modules():
            probes = _probes(module)
            if probes is None:
                continue
            gates[name] = {}
            for submodule, gate, value in probes:
                records = gates[name].setdefault(gate, [])

                def hook(m: nn.Module, inputs: tuple, out: Tensor, value=value, records=records) -> None:
                    with torch.no_grad():
                        records.append(value(inputs, out.detach()).detach())

                handles.append(submodule.register_forward_hook(hook))
        with kernels.use("reference"):  # the fused paths skip the submodules the probes observe
            yield gates
    finally:
        for handle in handles:
            handle.remove()
