"""Record what the attention modules compute: their gates, by module name, during forward passes."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import kernels
from .hooks import forward_hooks
from .modules.base import gate_probes, is_attention_module

__all__ = ["Gates", "capture"]

Gates = dict[str, dict[str, list[Tensor]]]


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[Gates]:
    """Record the gates of every attention module in `model` during the forward passes run inside the block.

        with attnkit.capture(net) as gates:
            net(x)
        gates["layer1.0.attn"]["channel"][0]   # SE's channel weights s in the first pass, N×C×1×1

    `gates[name][gate]` is a list with one detached tensor per forward pass of that module, in call order;
    `name` is the attention module's name in model.named_modules() (with attach(identity_init=True) the
    wrapped module's, `layer1.0.attn.module`). Each module's entry is there, empty, before it runs. Each module
    declares its gates (`gate_probes()`, attnkit.modules.base); those of attnkit's modules:

        se, eca, srm   channel             N×C×1×1
        ge             gate                N×C×h×w, before upsampling (h = w = 1 for the global extent)
        cbam           channel, spatial    Mc N×C×1×1, Ms N×1×H×W (no spatial with no_spatial=True)
        bam            attention           σ(Mc + Ms) (or σ(Mc·Ms)), N×C×H×W; the module returns x·(1 + this)
        coord          a_h, a_w            N×C×H×1, N×C×1×W
        triplet        cw, hc, hw          N×C×1×W, N×C×H×1, N×1×H×W (no hw with no_spatial=True)
        gc             weights, context,   attention pooling softmax N×1×H×W (pooling='att'), c N×C×1×1,
                       mul, add            σ(transform(c)) and transform(c) N×C×1×1, for the fusions used
        sk             paths               softmax over the M paths, N×M×C×1×1
        simam          attention           σ(1/e*), N×C×H×W
        ema            attention           σ(w), one map per group, N×G×H×W
        gam            channel, spatial    Mc and Ms, N×C×H×W each
        shuffle        channel, spatial    each group's halves' gates, N×C/2×1×1 and N×C/2×H×W
        nam            channel, spatial    Mc, and Ms with the spatial submodule, N×C×H×W each
        nonlocal       attention,          the pairwise weights each position of x̂ receives, averaged over the
                       response            positions of x, N×1×h×w; BN(W_z y), added to x, N×C×H×W
        sge            spatial             σ(γ ĉ + β), one map per group, N×G×H×W
        gct            channel             1 + tanh(ŝ + β), N×C×1×1
        fca            channel             N×C×1×1
        scse           channel, spatial    s N×C×1×1, q N×1×H×W (before they are combined)
        ela            a_h, a_w            N×C×H×1, N×C×1×W
        psa            channel, spatial    Aᶜʰ N×C×1×1, Aˢᵖ N×1×H×W (of x·Aᶜʰ in the sequential layout)

    Forward hooks on the submodules that compute the gates are registered on entering the block and removed
    on leaving it, also when it raises; outside the block nothing is registered. The hooks read what the
    modules compute and change no output; inside the block the modules run their reference formulas (see
    attnkit.kernels), which call those submodules. A module registered with attnkit.register that declares no
    gates has its child `gate` recorded as "gate" (or an empty entry without one); modules that are not
    attention modules are not recorded, and a network without attention gives an empty dict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: `model` must be an nn.Module, got {type(model).__name__}.")
    gates: Gates = {}

    def probes() -> Iterator[tuple[nn.Module, Callable[..., None]]]:
        for name, module in model.named_modules():
            if not is_attention_module(module):
                continue
            gates[name] = {}
            for submodule, gate, value in gate_probes(module):
                records = gates[name].setdefault(gate, [])

                def hook(m: nn.Module, inputs: tuple, out: Tensor, value=value, records=records) -> None:
                    with torch.no_grad():
                        records.append(value(inputs, out.detach()).detach())

                yield submodule, hook

    with forward_hooks(probes()), kernels.use("reference"):  # the fused paths skip the submodules the probes observe
        yield gates
