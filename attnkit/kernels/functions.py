"""Fused forward and backward of the gate modules, as autograd Functions over a backend's primitives.

Each module is `y = x · G(pool(x))` with a small gate network G. The forward records three steps in the ordinary
autograd graph: a pooling Function (x to the pooled statistics, one pass), G's own operations on those small tensors,
and a scaling Function (x and the gates to y, one pass). The backward runs them in reverse: the scaling node reduces
dy·x to the gates' gradients in one pass and hands dy over to the pooling node, which, once G's backward has given
it the statistics' gradients, writes dx in one pass from dy, the gates and those gradients: the gradient through the
product and the one through the pools are summed as dx is written, never as two full-size tensors. G's operations,
parameter gradients included, run in the network's own backward, with no second autograd call. Saved for the
backward: x, once, and the small tensors.

A scaling node may also end a residual block: y + r, then the block's ReLU, in the pass that writes y (`_ended`;
SE's family also masks dy by the ReLU in the pass that reduces it, `_ScaleC`); r's gradient is the masked dy.

Where G's backward is written out (GateNetwork: SE's and ECA's), channel_gate records all of it as one node instead,
whose backward runs the same three steps with the same operations: a graph of one node where G's would have a dozen.
Where a backend also runs G itself (GateWeights: SE's and ECA's, the CPU's channel_gate_module), that node's forward
and backward are one kernel call each, sample by sample (_ModuleNode).

The hand-over relies on the order autograd guarantees: a pooling node's gradients come through G from the gates, so it
runs after the scaling node that consumed them. Every gate must therefore depend on the pooled statistics when x
requires grad (each module's gate network does; `_check_gates` says so otherwise).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu
from .backend import Backend, GateWeights, in_layout_of


class _Handoff:
    """What a scaling node passes to the pooling nodes before it in the graph, which run after it in the backward."""

    __slots__ = ("dy", "x", "gates", "channel_pool")

    def __init__(self) -> None:
        self.dy: Tensor | None = None
        self.x: Tensor | None = None
        self.gates: tuple[Tensor, ...] = ()
        self.channel_pool: tuple[Tensor, Tensor, Tensor] | None = None  # CBAM: u, v and the argmax of its pool over C


def _check_gates(x: Tensor, gates: Sequence[Tensor]) -> None:
    if x.requires_grad and not all(g.requires_grad for g in gates):
        raise RuntimeError("attnkit.kernels: a gate computed from the pooled statistics does not require grad while "
                           "the input does; the fused backward needs every gate to depend on the statistics. Run "
                           "this module in mode 'reference'.")


def _ended(ctx, backend_add: Callable[..., Tensor], backend_scale: Callable[..., Tensor], x: Tensor,
           gates: tuple[Tensor, ...], r: Tensor | None, relu: bool) -> Tensor:
    """A scaling node's forward: y = backend_scale(x, *gates), or, with a residual r, the block's end
    backend_add(x, *gates, r, relu) in the same pass. Saves x, the gates and, for the ReLU's backward, y."""
    ctx.relu = r is not None and relu
    y = backend_scale(x, *gates) if r is None else backend_add(x, *gates, r, relu)
    ctx.save_for_backward(x, *gates, *((y,) if ctx.relu else ()))
    return y


def _hand_over(ctx, dy: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """A scaling node's dy in x's layout, x and the gates, recorded for the pooling nodes (dy only where x requires
    grad: the pooling nodes that write dx run only then). Where the node ended a block with a ReLU (`_ended`), dy is
    first masked by its output, as the ReLU's own backward would (the residual's gradient is this dy)."""
    x, *gates = ctx.saved_tensors
    if getattr(ctx, "relu", False):
        *gates, y = gates
        dy = torch.ops.aten.threshold_backward(dy, y, 0)
    dy = in_layout_of(dy, x)
    _record(ctx, dy, x, gates)
    return dy, x, gates


def _record(ctx, dy: Tensor, x: Tensor, gates: Sequence[Tensor]) -> None:
    """Record a scaling node's dy (where x requires grad), x and gates in its hand-over."""
    handoff = ctx.handoff
    handoff.x, handoff.gates = x, tuple(gates)
    if ctx.needs_input_grad[2]:
        handoff.dy = dy


def _taken(handoff: _Handoff) -> _Handoff:
    """The hand-over's contents, released from it for the last node that reads them (the graph, and with it the
    hand-over, may outlive the backward)."""
    taken = _Handoff()
    taken.dy, taken.x, taken.gates, taken.channel_pool = handoff.dy, handoff.x, handoff.gates, handoff.channel_pool
    handoff.dy = handoff.x = handoff.channel_pool = None
    handoff.gates = ()
    return taken


# --- one gate per channel: SE, ECA, SRM, Gather-Excite ---

class _ScaleC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, g: Tensor, r: Tensor | None,
                relu: bool) -> Tensor:
        ctx.backend, ctx.handoff = backend, handoff
        return _ended(ctx, backend.scale_c_add, backend.scale_c, x, (g,), r, relu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        if ctx.relu:  # the ReLU's mask in the pass that reduces dy against x, rather than _hand_over's own pass
            x, g, y = ctx.saved_tensors
            dg, dy = ctx.backend.dot_hw_relu(in_layout_of(dy, x), y, x)
            _record(ctx, dy, x, (g,))
        else:
            dy, x, (g,) = _hand_over(ctx, dy)
            dg = ctx.backend.dot_hw(dy, x) if ctx.needs_input_grad[3] else None
        return (None, None, None, dg.to(g.dtype) if ctx.needs_input_grad[3] else None,
                dy if ctx.needs_input_grad[4] else None, None)


class _PoolHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, with_m2: bool, x: Tensor):
        mean, m2 = backend.pool_hw(x, with_m2)
        ctx.backend, ctx.handoff, ctx.hw = backend, handoff, x.shape[2] * x.shape[3]
        if m2 is None:
            return mean
        ctx.save_for_backward(mean)
        return mean, m2

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean: Tensor, dm2: Tensor | None = None):
        h = _taken(ctx.handoff)
        a = dmean / ctx.hw
        if dm2 is None:
            dx = ctx.backend.grad_c(h.dy, h.gates[0], a)
        else:  # M2 = Σ(x − μ)², ∂M2/∂x = 2(x − μ)
            dx = ctx.backend.grad_c(h.dy, h.gates[0], a, h.x, 2 * dm2, ctx.saved_tensors[0])
        return None, None, None, dx


class GateNetwork:
    """A gate network from the means [N, C] to the gate [N, C] with its backward written out, for channel_gate to
    run with the pooling and the scaling as a single autograd node: one node instead of a graph of a dozen small
    operations, whose per-operation cost dominates in small networks. `params` are the tensors it computes with (None
    for an absent bias), in the order `backward` returns their gradients."""

    params: tuple[Tensor | None, ...] = ()
    #: the network as a backend that runs the whole module in one call each way takes it (GateWeights: SE's and
    #: ECA's, for the CPU's channel_gate_module), else None
    weights: GateWeights | None = None

    def __call__(self, mean: Tensor) -> Tensor:
        return self.forward(mean)[0]

    def forward(self, mean: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The gate, and the tensors its backward needs."""
        raise NotImplementedError

    def backward(self, dgate: Tensor, saved: Sequence[Tensor],
                 needs: Sequence[bool]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """The gradients of the means and of `params` (None where `needs` says not needed) from the gate's."""
        raise NotImplementedError


class _ChannelGateNode(torch.autograd.Function):
    """channel_gate with a GateNetwork, as one node: its backward reduces dy against x (masked by the block's ReLU
    where it ends one), runs the network's backward and writes dx, with the same primitives and operations as the
    pooling node, the gate network's graph and the scaling node make, so with the same results bit for bit."""

    @staticmethod
    def forward(ctx, backend: Backend, net: GateNetwork, x: Tensor, r: Tensor | None, relu: bool,
                *params: Tensor | None) -> Tensor:
        mean, _ = backend.pool_hw(x, False)
        g, saved = net.forward(mean)
        ctx.backend, ctx.net, ctx.hw, ctx.stat_dtype = backend, net, x.shape[2] * x.shape[3], mean.dtype
        ctx.relu = r is not None and relu
        y = backend.scale_c(x, g) if r is None else backend.scale_c_add(x, g, r, relu)
        ctx.save_for_backward(x, g, y if ctx.relu else None, *saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, g, y, *saved = ctx.saved_tensors
        dy, needs = in_layout_of(dy, x), ctx.needs_input_grad
        if not (needs[2] or any(needs[5:])):  # the residual's gradient alone: dy, masked where the block's ReLU was
            dr = torch.ops.aten.threshold_backward(dy, y, 0) if ctx.relu else dy
            return None, None, None, dr, None, *[None] * len(needs[5:])
        dg, dy = ctx.backend.dot_hw_relu(dy, y, x) if ctx.relu else (ctx.backend.dot_hw(dy, x), dy)
        dmean, dparams = ctx.net.backward(dg.to(g.dtype), saved, needs[5:])
        dx = ctx.backend.grad_c(dy, g, dmean.to(ctx.stat_dtype) / ctx.hw) if needs[2] else None
        return None, None, dx, dy if needs[3] else None, None, *dparams


class _ModuleNode(torch.autograd.Function):
    """channel_gate where the backend runs the whole module in one call each way (channel_gate_module: SE's and ECA's
    on the CPU): the same passes sample by sample, each sample's map re-read from cache, and the gate network in the
    kernel rather than a dozen small operations."""

    @staticmethod
    def forward(ctx, backend: Backend, net: GateWeights, x: Tensor, r: Tensor | None, relu: bool,
                *weights: Tensor | None) -> Tensor:
        y, work = backend.channel_gate_module(x, r, relu, net)
        ctx.backend, ctx.net, ctx.relu = backend, net, r is not None and relu
        ctx.save_for_backward(x, y if ctx.relu else None, work, *weights)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, y, work, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with_weights = any(needs[5:])
        if not (needs[2] or with_weights):  # the residual's gradient alone: dy, masked where the block's ReLU was
            dr = torch.ops.aten.threshold_backward(dy, y, 0) if ctx.relu else dy
            return None, None, None, dr, None, *[None] * len(weights)
        net = ctx.net._replace(w1=weights[0], b1=weights[1], w2=weights[2], b2=weights[3])
        dx, dr, grads = ctx.backend.channel_gate_module_backward(dy, y, x, work, net, needs[2], with_weights)
        return (None, None, dx, (dy if dr is None else dr) if needs[3] else None, None,
                *(grad if need else None for grad, need in zip(grads, needs[5:])))


def channel_gate(backend: Backend, x: Tensor, gate: Callable[..., Tensor] | GateNetwork, with_m2: bool = False,
                 residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """y = x · gate(mean_hw(x)[, M2_hw(x)]), where gate maps float [N, C] statistics to the [N, C] gate and M2 is
    the sum of squared deviations from the mean. With a `residual` (x's shape, dtype and layout), y + residual, and
    max(y + residual, 0) with `relu`: the end of a residual block, in the same passes. A GateNetwork (means only)
    makes the whole of it one autograd node; one whose `weights` the backend's channel_gate_module takes, one kernel
    call each way."""
    net = gate.weights if isinstance(gate, GateNetwork) and not with_m2 else None
    if net is not None and hasattr(backend, "channel_gate_module") and backend.module_fits(x, net):
        if not torch.is_grad_enabled():
            return backend.channel_gate_module(x, residual, relu, net)[0]
        return _ModuleNode.apply(backend, net, x, residual, relu, *net.weights)
    if not torch.is_grad_enabled():
        mean, m2 = backend.pool_hw(x, with_m2)
        g = gate(mean) if m2 is None else gate(mean, m2)
        return backend.scale_c(x, g) if residual is None else backend.scale_c_add(x, g, residual, relu)
    if isinstance(gate, GateNetwork) and not with_m2:  # (with M2: the call below, which it does not take, says so)
        return _ChannelGateNode.apply(backend, gate, x, residual, relu, *gate.params)
    handoff = _Handoff()
    pooled = _PoolHW.apply(backend, handoff, with_m2, x)
    g = gate(pooled) if not with_m2 else gate(*pooled)
    _check_gates(x, [g])
    return _ScaleC.apply(backend, handoff, x, g, residual, relu)


class _PoolAbsHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor) -> Tensor:
        ctx.backend, ctx.handoff, ctx.hw = backend, handoff, x.shape[2] * x.shape[3]
        return backend.pool_abs_hw(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean: Tensor):
        h = _taken(ctx.handoff)  # ∂|x|/∂x = sign(x)
        return None, None, ctx.backend.grad_c_sign(h.dy, h.gates[0], dmean / ctx.hw, h.x)


def abs_channel_gate(backend: Backend, x: Tensor, gate: Callable[[Tensor], Tensor]) -> Tensor:
    """y = x · gate(mean_hw |x|), gate mapping the float [N, C] means of |x| to the [N, C] gate."""
    if not torch.is_grad_enabled():
        return backend.scale_c(x, gate(backend.pool_abs_hw(x)))
    handoff = _Handoff()
    g = gate(_PoolAbsHW.apply(backend, handoff, x))
    _check_gates(x, [g])
    return _ScaleC.apply(backend, handoff, x, g, None, False)


# --- Gather-Excite θ and θ⁺ with the global extent: the gather is a depthwise kernel covering the map ---

class _PoolK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, kernel: Tensor) -> Tensor:
        ctx.backend, ctx.handoff = backend, handoff
        ctx.save_for_backward(kernel)
        return backend.pool_k(x, kernel[:, 0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dgathered: Tensor):
        (kernel,), h = ctx.saved_tensors, _taken(ctx.handoff)
        dx, dk = ctx.backend.grad_k(h.dy, h.gates[0], dgathered, h.x, kernel[:, 0], *ctx.needs_input_grad[2:4])
        return None, None, dx, None if dk is None else dk[:, None].to(kernel.dtype)


def gathered_channel_gate(backend: Backend, x: Tensor, kernel: Tensor, gate: Callable[[Tensor], Tensor]) -> Tensor:
    """y = x · gate(Σ_hw x·kernel[c, 0, h, w]), kernel being the [C, 1, H, W] weight of a depthwise convolution
    covering the map and gate mapping the float [N, C] gathered values to the [N, C] gate."""
    if not torch.is_grad_enabled():
        return backend.scale_c(x, gate(backend.pool_k(x, kernel[:, 0])))
    handoff = _Handoff()
    g = gate(_PoolK.apply(backend, handoff, x, kernel))
    _check_gates(x, [g])
    return _ScaleC.apply(backend, handoff, x, g, None, False)


# --- Coordinate Attention: a gate per row and per column of each channel ---

class _ScaleHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, ah: Tensor, aw: Tensor, r: Tensor | None,
                relu: bool) -> Tensor:
        ctx.backend, ctx.handoff = backend, handoff
        return _ended(ctx, backend.scale_hw_add, backend.scale_hw, x, (ah, aw), r, relu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dy, x, (ah, aw) = _hand_over(ctx, dy)
        dah, daw = ctx.backend.dot_h_w(dy, x, ah, aw)
        return None, None, None, dah.to(ah.dtype), daw.to(aw.dtype), dy if ctx.needs_input_grad[5] else None, None


class _PoolHAndW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor) -> Tensor:
        ctx.backend, ctx.handoff, ctx.hw = backend, handoff, x.shape[2:]
        return backend.pool_h_w(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dz: Tensor):
        h, (height, width) = _taken(ctx.handoff), ctx.hw
        return None, None, ctx.backend.grad_hw(h.dy, *h.gates, dz[..., :height] / width, dz[..., height:] / height)


def row_column_gate(backend: Backend, x: Tensor, gate: Callable[[Tensor, int], tuple[Tensor, Tensor]],
                    residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """y = x · aʰ · aʷ with (aʰ [N, C, H], aʷ [N, C, W]) = gate(z, H), z [N, C, H + W] the joined pools: the mean over
    W of each row, then the mean over H of each column. With a `residual`, y + residual (then max(·, 0) with `relu`)
    in the same pass."""
    height = x.shape[2]
    if not torch.is_grad_enabled():
        ah, aw = gate(backend.pool_h_w(x), height)
        return backend.scale_hw(x, ah, aw) if residual is None else backend.scale_hw_add(x, ah, aw, residual, relu)
    handoff = _Handoff()
    ah, aw = gate(_PoolHAndW.apply(backend, handoff, x), height)
    _check_gates(x, [ah, aw])
    return _ScaleHW.apply(backend, handoff, x, ah, aw, residual, relu)


# --- CBAM: channel gate, then a spatial gate pooled over the channels of the channel-gated map ---

class _ScaleCS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, mc: Tensor, ms: Tensor, r: Tensor | None,
                relu: bool) -> Tensor:
        ctx.backend, ctx.handoff = backend, handoff
        return _ended(ctx, backend.scale_cs_add, backend.scale_cs, x, (mc, ms), r, relu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dy, x, (mc, ms) = _hand_over(ctx, dy)
        dmc, dms = ctx.backend.dot_cs(dy, x, mc, ms)
        return None, None, None, dmc.to(mc.dtype), dms.to(ms.dtype), dy if ctx.needs_input_grad[5] else None, None


class _PoolCGated(torch.autograd.Function):
    """Mean and max over C of x·mc; its backward adds the pools' share of mc's gradient and hands u = ∂/∂mean / C,
    v = ∂/∂max and the argmax to the first pool's node, which writes dx."""

    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, mc: Tensor) -> tuple[Tensor, Tensor]:
        mean, top, top_at = backend.pool_c_gated(x, mc)
        ctx.backend, ctx.handoff, ctx.top_at, ctx.channels = backend, handoff, top_at, x.shape[1]
        return mean, top

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean: Tensor, dtop: Tensor):
        h = ctx.handoff
        u = dmean / ctx.channels
        h.channel_pool = (u, dtop, ctx.top_at)
        dmc = ctx.backend.dot_x_s(h.x, u, dtop, ctx.top_at) if ctx.needs_input_grad[3] else None
        h.x = None
        return None, None, None, dmc


class _PoolAvgMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, top, top_at = backend.pool_hw_avgmax(x)
        ctx.backend, ctx.handoff, ctx.top_at, ctx.hw = backend, handoff, top_at, x.shape[2] * x.shape[3]
        return mean, top

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean: Tensor, dtop: Tensor):
        h = _taken(ctx.handoff)
        u, v, c_top_at = h.channel_pool
        dx = ctx.backend.grad_cs(h.dy, *h.gates, u, v, c_top_at, dmean / ctx.hw, dtop, ctx.top_at)
        return None, None, dx


def channel_spatial_gate(backend: Backend, x: Tensor, channel: Callable[[Tensor, Tensor], Tensor],
                         spatial: Callable[[Tensor, Tensor], Tensor], residual: Tensor | None = None,
                         relu: bool = False) -> Tensor:
    """y = x' · ms, x' = x · mc, with mc [N, C] = channel(mean_hw x, max_hw x) and ms [N, H, W] =
    spatial(mean_c x', max_c x'). With a `residual`, y + residual (then max(·, 0) with `relu`) in the same pass."""
    if not torch.is_grad_enabled():
        mean, top, _ = backend.pool_hw_avgmax(x)
        mc = channel(mean, top)
        c_mean, c_top, _ = backend.pool_c_gated(x, mc)
        ms = spatial(c_mean, c_top)
        return backend.scale_cs(x, mc, ms) if residual is None else backend.scale_cs_add(x, mc, ms, residual, relu)
    handoff = _Handoff()
    mc = channel(*_PoolAvgMax.apply(backend, handoff, x))
    ms = spatial(*_PoolCGated.apply(backend, handoff, x, mc))
    _check_gates(x, [mc, ms])
    return _ScaleCS.apply(backend, handoff, x, mc, ms, residual, relu)


# --- Triplet Attention: Z-pools over H, W and C; the mean of the three gates ---

class _ScaleMean3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, *gates: Tensor) -> Tensor:
        ctx.backend, ctx.handoff = backend, handoff
        ctx.save_for_backward(x, *gates)
        return backend.scale_mean3(x, gates[0], gates[1], gates[2] if len(gates) == 3 else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dy, x, gates = _hand_over(ctx, dy)
        sums = ctx.backend.dot3(dy, x, len(gates) == 3)
        return (None, None, None, *[(s / len(gates)).to(g.dtype) for s, g in zip(sums, gates)])


class _ZPool3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, spatial: bool, x: Tensor) -> tuple[Tensor, ...]:
        pools = backend.zpool3(x, spatial)
        ctx.backend, ctx.handoff, ctx.indices = backend, handoff, [index for _, index, _ in pools]
        ctx.lengths = (x.shape[2], x.shape[3], x.shape[1])
        return tuple(t for top, _, mean in pools for t in (top, mean))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        h = _taken(ctx.handoff)
        pools = [(grads[2 * i], index, grads[2 * i + 1] / ctx.lengths[i]) for i, index in enumerate(ctx.indices)]
        gates = h.gates
        dx = ctx.backend.grad_mean3(h.dy, gates[0], gates[1], gates[2] if len(gates) == 3 else None, pools)
        return None, None, None, dx


def triplet_gate(backend: Backend, x: Tensor, gates: Callable[..., Sequence[Tensor]], spatial: bool) -> Tensor:
    """y = x · mean(a_cw [N, C, W], a_hc [N, C, H], a_hw [N, H, W]) with the gates computed by
    gates(max_h, mean_h, max_w, mean_w[, max_c, mean_c]) from the Z-pools over H, W and C."""
    if not torch.is_grad_enabled():
        pools = backend.zpool3(x, spatial)
        outs = gates(*[t for top, _, mean in pools for t in (top, mean)])
        return backend.scale_mean3(x, outs[0], outs[1], outs[2] if spatial else None)
    handoff = _Handoff()
    outs = list(gates(*_ZPool3.apply(backend, handoff, spatial, x)))
    _check_gates(x, outs)
    return _ScaleMean3.apply(backend, handoff, x, *outs)


# --- SimAM: x · σ((x − μ)² / (4(σ̂² + λ)) + ½), μ and the unbiased variance σ̂² of each channel ---

class _EnergyGate(torch.autograd.Function):
    """With q = 4(M2 / (HW − 1) + λ) and d = x − μ, the gate's gradient t = dy·x·s·(1 − s) reaches x directly
    (2t·d / q), through μ (−2 Σ t·d / q, spread as 1/HW) and through M2 (−4 Σ t·d² / (q²·(HW − 1)), times 2d):
    one pass over dy and x sums Σ t·d and Σ t·d², one writes dx."""

    @staticmethod
    def forward(ctx, backend: Backend, e_lambda: float, x: Tensor) -> Tensor:
        mean, m2 = backend.pool_hw(x, True)
        ctx.backend, ctx.hw = backend, x.shape[2] * x.shape[3]
        ctx.bessel = max(ctx.hw - 1, 1)  # HW − 1, taken as 1 for a 1×1 map (where d = 0)
        q = 4 * (m2 / ctx.bessel + e_lambda)
        ctx.save_for_backward(x, mean, q)
        return backend.scale_energy(x, mean, q)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, mean, q = ctx.saved_tensors
        dy = in_layout_of(dy, x)
        td, td2 = ctx.backend.dot_energy(dy, x, mean, q)
        dmean = -2 * td / q
        dm2 = -4 * td2 / (q * q * ctx.bessel)
        return None, None, ctx.backend.grad_energy(dy, x, mean, q, dmean / ctx.hw, 2 * dm2)


def energy_gate(backend: Backend, x: Tensor, e_lambda: float) -> Tensor:
    """SimAM's y = x · σ(1/e*), 1/e* = (x − μ)² / (4(σ̂² + λ)) + ½ per channel over H×W."""
    if not torch.is_grad_enabled():
        mean, m2 = backend.pool_hw(x, True)
        return backend.scale_energy(x, mean, 4 * (m2 / max(x.shape[2] * x.shape[3] - 1, 1) + e_lambda))
    return _EnergyGate.apply(backend, e_lambda, x)


# --- scSE: a channel gate from the means and a spatial gate from a 1×1 convolution C -> 1, combined ---

class _ScalePair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, s: Tensor, q: Tensor, combine: str) -> Tensor:
        ctx.backend, ctx.handoff, ctx.combine = backend, handoff, combine
        ctx.save_for_backward(x, s, q)
        return backend.scale_pair(x, s, q, combine)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dy, x, (s, q) = _hand_over(ctx, dy)
        ds, dq = ctx.backend.dot_pair(dy, x, s, q, ctx.combine)
        return None, None, None, ds.to(s.dtype), dq.to(q.dtype), None


class _PoolPair(torch.autograd.Function):
    """The means over H×W and Σ_c w·x; its backward writes dx and sums w's gradient Σ_n,hw dz·x."""

    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, w: Tensor, combine: str):
        ctx.backend, ctx.handoff, ctx.combine, ctx.hw = backend, handoff, combine, x.shape[2] * x.shape[3]
        ctx.save_for_backward(w)
        return backend.pool_hw(x, False)[0], backend.pool_c_weighted(x, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean: Tensor, dz: Tensor):
        (w,), h = ctx.saved_tensors, _taken(ctx.handoff)
        dx = dw = None
        if ctx.needs_input_grad[2]:
            dx = ctx.backend.grad_pair(h.dy, h.x, *h.gates, ctx.combine, dmean / ctx.hw, w, dz)
        if ctx.needs_input_grad[3]:  # Σ_hw x·(dz + 0·[c = 0]): CBAM's pass with no maximum's share
            dw = ctx.backend.dot_x_s(h.x, dz, torch.zeros_like(dz), torch.zeros(dz.shape, dtype=torch.int64,
                                                                                  device=dz.device)).sum(0)
        return None, None, dx, None if dw is None else dw.to(w.dtype), None


def pair_gate(backend: Backend, x: Tensor, w: Tensor, channel: Callable[[Tensor], Tensor],
              spatial: Callable[[Tensor], Tensor], combine: str) -> Tensor:
    """y = max(x·s, x·q), x·s + x·q or x·s·q ('max', 'add', 'mul'), with s [N, C] = channel(mean_hw x) and
    q [N, H, W] = spatial(Σ_c w[c]·x) for a weight w [C]."""
    if not torch.is_grad_enabled():
        mean, _ = backend.pool_hw(x, False)
        return backend.scale_pair(x, channel(mean), spatial(backend.pool_c_weighted(x, w)), combine)
    handoff = _Handoff()
    mean, z = _PoolPair.apply(backend, handoff, x, w, combine)
    s, q = channel(mean), spatial(z)
    _check_gates(x, [s, q])
    return _ScalePair.apply(backend, handoff, x, s, q, combine)


# --- SGE: a gate per group and position, from the similarity of each position to its group's mean feature ---

class _ScaleGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, a: Tensor) -> Tensor:
        ctx.backend, ctx.handoff = backend, handoff
        ctx.save_for_backward(x, a)
        return backend.scale_groups(x, a)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dy, x, (a,) = _hand_over(ctx, dy)
        return None, None, None, ctx.backend.dot_groups(dy, x, a.shape[1]).to(a.dtype)


class _PoolGroups(torch.autograd.Function):
    """sim[n, g, hw] = Σ_{c in g} m[n, c]·x with m the channel means; the backward writes
    dx = dy·a + dsim·m[n, c] + Σ_hw dsim·x / HW."""

    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, groups: int, x: Tensor) -> Tensor:
        mean, _ = backend.pool_hw(x, False)
        ctx.backend, ctx.handoff, ctx.hw = backend, handoff, x.shape[2] * x.shape[3]
        ctx.save_for_backward(mean)
        return backend.pool_groups(x, mean, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, dsim: Tensor):
        (mean,), h = ctx.saved_tensors, _taken(ctx.handoff)
        b = ctx.backend.dot_x_groups(h.x, dsim) / ctx.hw
        return None, None, None, ctx.backend.grad_groups(h.dy, h.gates[0], mean, dsim, b)


def group_gate(backend: Backend, x: Tensor, groups: int, gate: Callable[[Tensor], Tensor]) -> Tensor:
    """y = x · a[n, g, h, w] (g the group of the channel) with a = gate(sim), sim [N, G, H, W] the sum over each group's
    channels of x times the channel's mean over H×W."""
    if not torch.is_grad_enabled():
        mean, _ = backend.pool_hw(x, False)
        return backend.scale_groups(x, gate(backend.pool_groups(x, mean, groups)))
    handoff = _Handoff()
    a = gate(_PoolGroups.apply(backend, handoff, groups, x))
    _check_gates(x, [a])
    return _ScaleGroups.apply(backend, handoff, x, a)


# --- Shuffle Attention: x·σ(α·(x − μ) + β) with α, β from each channel's mean and M2, into shuffled channels ---

class _ScaleAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, alpha: Tensor, beta: Tensor, m: Tensor,
                perm: Tensor) -> Tensor:
        ctx.backend, ctx.handoff, ctx.perm = backend, handoff, perm
        ctx.save_for_backward(x, alpha, beta, m)
        return backend.scale_affine(x, alpha, beta, m, perm)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        dy, x, (alpha, beta, m) = _hand_over(ctx, dy)
        ta, tb = ctx.backend.dot_affine(dy, x, alpha, beta, m, ctx.perm)
        return None, None, None, ta.to(alpha.dtype), tb.to(beta.dtype), (-alpha * tb).to(m.dtype), None


class _PoolMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, handoff: _Handoff, x: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
        ctx.backend, ctx.handoff, ctx.perm, ctx.hw = backend, handoff, perm, x.shape[2] * x.shape[3]
        return backend.pool_hw(x, True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dmean: Tensor, dm2: Tensor):
        h = _taken(ctx.handoff)  # M2 = Σ(x − μ)², ∂M2/∂x = 2(x − μ)
        return None, None, ctx.backend.grad_affine(h.dy, h.x, *h.gates, dmean / ctx.hw, 2 * dm2, ctx.perm), None


def affine_gate(backend: Backend, x: Tensor, perm: Tensor,
                gate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """y[n, perm[c]] = x · σ(α·(x − μ) + β) with (α, β) [N, C] = gate(mean_hw x, M2_hw x) and μ the mean."""
    if not torch.is_grad_enabled():
        mean, m2 = backend.pool_hw(x, True)
        return backend.scale_affine(x, *gate(mean, m2), mean, perm)
    handoff = _Handoff()
    mean, m2 = _PoolMoments.apply(backend, handoff, x, perm)
    alpha, beta = gate(mean, m2)
    _check_gates(x, [alpha, beta])
    return _ScaleAffine.apply(backend, handoff, x, alpha, beta, mean, perm)


# --- EMA: a gate per group and position computed from x by layers of its own (the gate network is not small) ---

class _ScaleGroupsAlone(torch.autograd.Function):
    """x·a[n, g, h, w] with both gradients of its own (dx = dy·a, da = Σ over each group's channels of dy·x): for a
    gate that depends on x through full-size layers, whose gradients autograd sums with this one."""

    @staticmethod
    def forward(ctx, backend: Backend, x: Tensor, a: Tensor) -> Tensor:
        ctx.backend = backend
        ctx.save_for_backward(x, a)
        return backend.scale_groups(x, a)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, a = ctx.saved_tensors
        dy = in_layout_of(dy, x)
        dx = ctx.backend.scale_groups(dy, a) if ctx.needs_input_grad[1] else None
        da = ctx.backend.dot_groups(dy, x, a.shape[1]).to(a.dtype) if ctx.needs_input_grad[2] else None
        return None, dx, da


def scale_by_groups(backend: Backend, x: Tensor, a: Tensor) -> Tensor:
    """y = x · a[n, g, h, w], g the group of x's channel, one pass forward and one per gradient backward."""
    if not torch.is_grad_enabled():
        return backend.scale_groups(x, a)
    return _ScaleGroupsAlone.apply(backend, x, a)


# --- the gate convolution of CBAM and Triplet Attention, on the CPU: an operator of their gate networks ---

class _ConvPlanes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(maps, weight)
        return cpu.conv_planes(maps, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        maps, weight = ctx.saved_tensors
        return cpu.conv_planes_backward(dout.contiguous(), maps, weight, *ctx.needs_input_grad)


def conv_planes(maps: Tensor, weight: Tensor) -> Tensor:
    """F.conv2d(maps, weight, padding=k // 2) by the CPU backend's direct kernels, forward and backward: float32 maps
    [N, P, H, W] on the CPU and one filter [1, P, k, k], k odd."""
    return _ConvPlanes.apply(maps.contiguous(), weight.contiguous())
