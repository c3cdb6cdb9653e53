"""Fused forward and backward of the gate modules, as autograd Functions over a backend's primitives.

Each module is `y = x · G(pool(x))` with a small gate network G. The forward pools x in one pass, runs G on the
pooled tensors (a small autograd graph kept for the backward) and scales x in one pass. The backward reduces
dy·x to the gate's gradient in one pass, back-propagates it through G's small graph (parameter gradients
included), and writes dx in one more pass. Saved for the backward: x itself and the small pooled tensors.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .backend import Backend


def _layout(x: Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _small_graph(fn: Callable[..., object], inputs: Sequence[Tensor]) -> tuple[list[Tensor], object]:
    """Run the gate network on detached copies of the pooled tensors, recording its graph for the backward."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        return leaves, fn(*leaves)


def _backprop(outputs: Sequence[Tensor], grads: Sequence[Tensor], leaves: Sequence[Tensor],
              params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
    """Gradients of the small graph: (for each leaf, zeros where unused), (for each parameter, or None)."""
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grads) if o.requires_grad]
    found = torch.autograd.grad([o for o, _ in pairs], [*leaves, *params], [g for _, g in pairs], allow_unused=True)
    leaf_grads = [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, found)]
    return leaf_grads, list(found[len(leaves):])


def _params(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _needs_graph(x: Tensor, params: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or bool(params))


def _add(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [u if v is None else v if u is None else u + v for u, v in zip(a, b)]


# --- one gate per channel: SE, ECA, SRM, Gather-Excite θ⁻ ---

class _ChannelGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, gate: Callable, with_m2: bool, x: Tensor, *params: Tensor) -> Tensor:
        mean, m2 = backend.pool_hw(x, with_m2)
        leaves, g = _small_graph(gate, [mean] if m2 is None else [mean, m2])
        ctx.backend, ctx.leaves, ctx.g, ctx.mean = backend, leaves, g, mean
        ctx.save_for_backward(x, *params)
        return backend.scale_c(x, g.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, *params = ctx.saved_tensors
        backend, g = ctx.backend, ctx.g
        dy = dy.contiguous(memory_format=_layout(x))
        (dmean, *dm2), dparams = _backprop([g], [backend.dot_hw(dy, x)], ctx.leaves, params)
        dx = None
        if ctx.needs_input_grad[3]:
            a = dmean / (x.shape[2] * x.shape[3])
            if dm2:  # M2 = Σ(x − μ)², ∂M2/∂x = 2(x − μ)
                dx = backend.grad_c(dy, g.detach(), a, x, 2 * dm2[0], ctx.mean)
            else:
                dx = backend.grad_c(dy, g.detach(), a)
        return (None, None, None, dx, *dparams)


def channel_gate(backend: Backend, x: Tensor, gate: Callable[..., Tensor], module: nn.Module,
                 with_m2: bool = False) -> Tensor:
    """y = x · gate(mean_hw(x)[, M2_hw(x)]), where gate maps float [N, C] statistics to the [N, C] gate and M2 is
    the sum of squared deviations from the mean."""
    params = _params(module)
    if _needs_graph(x, params):
        return _ChannelGate.apply(backend, gate, with_m2, x, *params)
    mean, m2 = backend.pool_hw(x, with_m2)
    return backend.scale_c(x, gate(mean) if m2 is None else gate(mean, m2))


# --- Gather-Excite θ and θ⁺ with the global extent: the gather is a depthwise kernel covering the map ---

class _GatheredChannelGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, gate: Callable, x: Tensor, kernel: Tensor, *params: Tensor) -> Tensor:
        leaves, g = _small_graph(gate, [backend.pool_k(x, kernel.detach()[:, 0])])
        ctx.backend, ctx.leaves, ctx.g = backend, leaves, g
        ctx.save_for_backward(x, kernel, *params)
        return backend.scale_c(x, g.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, kernel, *params = ctx.saved_tensors
        backend, g = ctx.backend, ctx.g
        dy = dy.contiguous(memory_format=_layout(x))
        (dgathered,), dparams = _backprop([g], [backend.dot_hw(dy, x)], ctx.leaves, params)
        dx, dk = backend.grad_k(dy, g.detach(), dgathered, x, kernel.detach()[:, 0], *ctx.needs_input_grad[2:4])
        return (None, None, dx, None if dk is None else dk[:, None].to(kernel.dtype), *dparams)


def gathered_channel_gate(backend: Backend, x: Tensor, kernel: Tensor, gate: Callable[[Tensor], Tensor],
                          module: nn.Module) -> Tensor:
    """y = x · gate(Σ_hw x·kernel[c, 0, h, w]), kernel being the [C, 1, H, W] weight of a depthwise convolution
    covering the map and gate mapping the float [N, C] gathered values to the [N, C] gate."""
    params = _params(module)
    if _needs_graph(x, params):
        return _GatheredChannelGate.apply(backend, gate, x, kernel, *[p for p in params if p is not kernel])
    return backend.scale_c(x, gate(backend.pool_k(x, kernel.detach()[:, 0])))


# --- Coordinate Attention: a gate per row and per column of each channel ---

class _RowColumnGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, gate: Callable, x: Tensor, *params: Tensor) -> Tensor:
        leaves, (ah, aw) = _small_graph(gate, backend.pool_h_w(x))
        ctx.backend, ctx.leaves, ctx.gates = backend, leaves, (ah, aw)
        ctx.save_for_backward(x, *params)
        return backend.scale_hw(x, ah.detach(), aw.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, *params = ctx.saved_tensors
        backend, (ah, aw) = ctx.backend, ctx.gates
        dy = dy.contiguous(memory_format=_layout(x))
        (dzh, dzw), dparams = _backprop([ah, aw], backend.dot_h_w(dy, x, ah.detach(), aw.detach()), ctx.leaves, params)
        dx = None
        if ctx.needs_input_grad[2]:
            dx = backend.grad_hw(dy, ah.detach(), aw.detach(), dzh / x.shape[3], dzw / x.shape[2])
        return (None, None, dx, *dparams)


def row_column_gate(backend: Backend, x: Tensor, gate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                    module: nn.Module) -> Tensor:
    """y = x · aʰ · aʷ with (aʰ [N, C, H], aʷ [N, C, W]) = gate(mean over W [N, C, H], mean over H [N, C, W])."""
    params = _params(module)
    if _needs_graph(x, params):
        return _RowColumnGate.apply(backend, gate, x, *params)
    return backend.scale_hw(x, *gate(*backend.pool_h_w(x)))


# --- CBAM: channel gate, then a spatial gate pooled over the channels of the channel-gated map ---

class _ChannelSpatialGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, channel: Callable, spatial: Callable, x: Tensor, *params: Tensor) -> Tensor:
        mean, top, top_at = backend.pool_hw_avgmax(x)
        leaves_c, mc = _small_graph(channel, [mean, top])
        c_mean, c_top, c_top_at = backend.pool_c_gated(x, mc.detach())
        leaves_s, ms = _small_graph(spatial, [c_mean, c_top])
        ctx.backend, ctx.leaves, ctx.gates, ctx.top_at = backend, (leaves_c, leaves_s), (mc, ms), (top_at, c_top_at)
        ctx.save_for_backward(x, *params)
        return backend.scale_cs(x, mc.detach(), ms.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, *params = ctx.saved_tensors
        backend, (mc, ms), (top_at, c_top_at) = ctx.backend, ctx.gates, ctx.top_at
        leaves_c, leaves_s = ctx.leaves
        n, c, h, w = x.shape
        dy = dy.contiguous(memory_format=_layout(x))
        dmc_direct, dms = backend.dot_cs(dy, x, mc.detach(), ms.detach())
        (dc_mean, dc_top), dparams_s = _backprop([ms], [dms], leaves_s, params)
        u = dc_mean / c
        dmc = dmc_direct + backend.dot_x_s(x, u, dc_top, c_top_at)
        (dmean, dtop), dparams_c = _backprop([mc], [dmc], leaves_c, params)
        dx = None
        if ctx.needs_input_grad[3]:
            dx = backend.grad_cs(dy, mc.detach(), ms.detach(), u, dc_top, c_top_at, dmean / (h * w), dtop, top_at)
        return (None, None, None, dx, *_add(dparams_c, dparams_s))


def channel_spatial_gate(backend: Backend, x: Tensor, channel: Callable[[Tensor, Tensor], Tensor],
                         spatial: Callable[[Tensor, Tensor], Tensor], module: nn.Module) -> Tensor:
    """y = x' · ms, x' = x · mc, with mc [N, C] = channel(mean_hw x, max_hw x) and ms [N, H, W] =
    spatial(mean_c x', max_c x')."""
    params = _params(module)
    if _needs_graph(x, params):
        return _ChannelSpatialGate.apply(backend, channel, spatial, x, *params)
    mean, top, _ = backend.pool_hw_avgmax(x)
    mc = channel(mean, top)
    c_mean, c_top, _ = backend.pool_c_gated(x, mc)
    return backend.scale_cs(x, mc, spatial(c_mean, c_top))


# --- Triplet Attention: Z-pools over H, W and C; the mean of the three gates ---

class _TripletGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, gates: Callable, spatial: bool, x: Tensor, *params: Tensor) -> Tensor:
        pools = backend.zpool3(x, spatial)
        leaves, outs = _small_graph(gates, [t for top, _, mean in pools for t in (top, mean)])
        ctx.backend, ctx.leaves, ctx.outs, ctx.indices = backend, leaves, outs, [index for _, index, _ in pools]
        ctx.save_for_backward(x, *params)
        return backend.scale_mean3(x, *_detached(outs, spatial))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, *params = ctx.saved_tensors
        backend, outs = ctx.backend, ctx.outs
        spatial = len(ctx.indices) == 3
        dy = dy.contiguous(memory_format=_layout(x))
        sums = [s / len(outs) for s in backend.dot3(dy, x, spatial)]
        dleaves, dparams = _backprop(outs, sums, ctx.leaves, params)
        dx = None
        if ctx.needs_input_grad[3]:
            lengths = (x.shape[2], x.shape[3], x.shape[1])
            pools = [(dleaves[2 * i], index, dleaves[2 * i + 1] / lengths[i]) for i, index in enumerate(ctx.indices)]
            dx = backend.grad_mean3(dy, *_detached(outs, spatial), pools)
        return (None, None, None, dx, *dparams)


def _detached(outs: Sequence[Tensor], spatial: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    return outs[0].detach(), outs[1].detach(), outs[2].detach() if spatial else None


def triplet_gate(backend: Backend, x: Tensor, gates: Callable[..., Sequence[Tensor]], module: nn.Module,
                 spatial: bool) -> Tensor:
    """y = x · mean(a_cw [N, C, W], a_hc [N, C, H], a_hw [N, H, W]) with the gates computed by
    gates(max_h, mean_h, max_w, mean_w[, max_c, mean_c]) from the Z-pools over H, W and C."""
    params = _params(module)
    if _needs_graph(x, params):
        return _TripletGate.apply(backend, gates, spatial, x, *params)
    pools = backend.zpool3(x, spatial)
    outs = gates(*[t for top, _, mean in pools for t in (top, mean)])
    return backend.scale_mean3(x, *_detached(outs, spatial))
