"""The fast formulas equal the reference: outside mode 'reference' the modules compute their gate networks as linear
algebra on the pooled N×C statistics, without calling the 1×1 convolutions that hold the weights, both in the fused
path and in the plain torch formulas that mode 'auto' runs below the fused path's threshold. Outputs, input and
parameter gradients and BatchNorm statistics match the reference path; hooks on the gate submodules, tracing and
export keep the submodules; the fused backward releases what it hands from node to node."""
from __future__ import annotations

import copy
import gc
import weakref
from unittest import mock

import pytest
import torch
from torch import nn

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu, dispatch
from attnkit.modules.coord import BATCHED_UP_TO_CHANNELS

from .modules import create, errors, randomised, run_in_mode
from .primitives import assert_close, feature_map

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

SPECS = [
    "se", "se(reduction=4, act='silu', gate='hard_sigmoid', bias=False)", "eca", "eca(kernel_size=5)", "srm", "ge",
    "cbam(reduction=4)", "cbam(reduction=4, spatial_pools=('max', 'mean'), pool_types=('max', 'avg'))", "coord",
    "coord(bias=False, act='silu')",
]
SHAPES = [(16, 24, 5, 4), (20, 17, 1, 9)]
MODES = ["auto", "cpu"]  # the fast torch formulas (these inputs are below the fused path's threshold), the fused path


def _pointwise_convolutions(module: nn.Module) -> list[nn.Module]:
    """The convolutions a fast gate network replaces: 1×1 ones and ECA's 1-D one."""
    return [m for m in module.modules() if isinstance(m, nn.Conv1d)
            or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]


def _count_calls(module: nn.Module) -> list[str]:
    """Record each call of the module's pointwise convolutions (through their forward, not a hook, which would switch
    the fast formulas off)."""
    calls: list[str] = []
    for conv in _pointwise_convolutions(module):
        conv.forward = lambda x, conv=conv, forward=conv.forward: calls.append(type(conv).__name__) or forward(x)
    return calls


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_fast_formulas_equal_the_reference_in_float32(spec, shape, channels_last, training, mode):
    module = randomised(create(spec, shape), seed=0).train(training)
    x = feature_map(shape, torch.float32, channels_last, ties=False, seed=1)
    dy = feature_map(shape, torch.float32, channels_last, ties=False, seed=2)
    assert kernels.backend_for(x) is None  # 'auto' runs the torch formulas here, not the fused path
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    fast = copy.deepcopy(module)
    calls = _count_calls(fast)
    got = run_in_mode(fast, x, dy, mode)
    assert calls == [], f"the fast path called {calls}"
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert max(errors(got, want)) <= 2e-5


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_fast_formulas_are_as_exact_as_the_reference_in_bfloat16(spec, params_dtype, mode):
    """bfloat16 input with tied maxima: the largest error against the float32 evaluation is within 1e-2, or within 1.5
    times the reference path's, as for the fused path (test_fused_modules.py)."""
    shape = SHAPES[0]
    module = randomised(create(spec, shape), seed=0).to(params_dtype)
    x = feature_map(shape, torch.bfloat16, False, ties=True, seed=1)
    dy = feature_map(shape, torch.bfloat16, False, ties=False, seed=2)
    exact = run_in_mode(copy.deepcopy(module).float(), x.float(), dy.float(), "reference")
    reference = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    fast = run_in_mode(copy.deepcopy(module), x, dy, mode)
    assert fast[0].dtype == torch.bfloat16
    fast_error, reference_error = max(errors(_float(fast), exact)), max(errors(_float(reference), exact))
    assert fast_error <= max(1e-2, 1.5 * reference_error), (fast_error, reference_error)


def _float(run):
    y, grads, buffers = run
    return y.float(), [None if g is None else g.float() for g in grads], [b.float() for b in buffers]


@pytest.mark.parametrize("spec", SPECS)
def test_fast_formulas_under_bfloat16_autocast(spec):
    """Autocast stays off inside the gate network, as in the reference formulas: the same output and gradients (the
    backward outside autocast, as PyTorch recommends; inside, autocast would run the linear layers' backward matrix
    products in bfloat16, where the reference's convolution backward stays in float32)."""
    shape = SHAPES[0]
    module = randomised(create(spec, shape), seed=0)
    x, dy = feature_map(shape, torch.float32, False, False, seed=1), feature_map(shape, torch.float32, False, False, 2)
    runs = []
    for mode in ["reference", "auto", "cpu"]:
        copied, xg = copy.deepcopy(module), x.detach().requires_grad_()
        with kernels.use(mode), torch.autocast("cpu", torch.bfloat16):
            y = copied(xg)
        y.backward(dy)
        runs.append((y, [xg.grad] + [p.grad for p in copied.parameters()], list(copied.buffers())))
    assert max(errors(runs[1], runs[0])) <= 2e-5 and max(errors(runs[2], runs[0])) <= 2e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_wide_coordinate_attention_computes_its_gate_network_as_rows(channels_last, mode):
    """Above BATCHED_UP_TO_CHANNELS the fast gate network is F.linear over rows of channels, not batched products:
    the same function as the reference."""
    shape = (3, BATCHED_UP_TO_CHANNELS + 8, 4, 3)
    module = randomised(create("coord", shape), seed=0)
    x = feature_map(shape, torch.float32, channels_last, ties=False, seed=1)
    dy = feature_map(shape, torch.float32, channels_last, ties=False, seed=2)
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    fast = copy.deepcopy(module)
    calls = _count_calls(fast)
    with mock.patch.object(torch, "baddbmm", side_effect=AssertionError("a batched product")):
        got = run_in_mode(fast, x, dy, mode)
    assert calls == [] and max(errors(got, want)) <= 2e-5


@pytest.mark.parametrize("spec", ["se", "cbam(reduction=4)", "coord"])
@pytest.mark.parametrize("mode", MODES)
def test_a_hook_on_a_gate_submodule_sees_it_run(spec, mode):
    """attnkit.capture, prune and explain observe submodules with forward hooks: where one is set, the module calls
    its submodules, in the fused path too, and computes the same."""
    shape = SHAPES[0]
    module = randomised(create(spec, shape), seed=0)
    x, dy = feature_map(shape, torch.float32, False, False, seed=1), feature_map(shape, torch.float32, False, False, 2)
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    seen = []
    hooked = copy.deepcopy(module)
    first = _pointwise_convolutions(hooked)[0]
    handle = first.register_forward_hook(lambda m, inputs, out: seen.append(tuple(out.shape)))
    got = run_in_mode(hooked, x, dy, mode)
    handle.remove()
    assert seen and all(len(s) == 4 for s in seen)  # the convolution ran, on pooled maps
    assert max(errors(got, want)) <= 2e-5


def test_a_global_module_hook_switches_the_fast_formulas_off():
    module = create("se", SHAPES[0])
    calls = _count_calls(module)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, inputs, out: None)
    try:
        module(torch.randn(SHAPES[0]))
    finally:
        handle.remove()
    assert calls == ["Conv2d", "Conv2d"]
    module(torch.randn(SHAPES[0]))
    assert calls == ["Conv2d", "Conv2d"]


def test_tracing_and_export_keep_the_submodules():
    module = attnkit.create("se", 16).eval()
    x = torch.randn(16, 16, 4, 4)
    graph = torch.fx.symbolic_trace(module).graph
    assert {n.target for n in graph.nodes if n.op == "call_module"} >= {"fc1", "fc2"}
    assert "aten::_convolution" in str(torch.jit.trace(module, x).inlined_graph)
    graphs = " ".join(str(m.graph) for m in torch.export.export(module, (x,)).graph_module.modules()
                      if isinstance(m, torch.fx.GraphModule))
    assert "conv2d" in graphs and "addmm" not in graphs and "linear" not in graphs


def test_the_state_dict_keeps_the_convolutions():
    module = attnkit.create("se", 64)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        "fc1.weight": (4, 64, 1, 1), "fc1.bias": (4,), "fc2.weight": (64, 4, 1, 1), "fc2.bias": (64,)}


@pytest.mark.parametrize("spec", ["se", "srm", "cbam(reduction=4)", "coord", "triplet(kernel_size=3)",
                                  "ge(variant='theta', spatial_size={hw})"])
def test_the_fused_backward_releases_what_it_hands_over(spec):
    """The scaling node hands dy to the pooling node; once the backward has run, nothing keeps it, although the
    graph (held by y) lives on."""
    shape = (4, 24, 6, 5)
    module = create(spec, shape)
    x = torch.randn(shape, requires_grad=True)
    with kernels.use("cpu"):
        y = module(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    released = weakref.ref(dy)
    del dy
    gc.collect()
    assert released() is None and y.grad_fn is not None


def test_a_gate_cut_from_the_statistics_is_refused():
    class DetachedSigmoid(nn.Sigmoid):
        def forward(self, z):
            return super().forward(z).detach()

    module = attnkit.create("se", 8, gate=DetachedSigmoid)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    with kernels.use("cpu"), pytest.raises(RuntimeError, match="does not require grad"):
        module(x)
    with kernels.use("reference"):
        module(x).sum().backward()  # the reference formulas take the gate as a constant


def test_auto_chooses_by_size_and_autograd():
    """While autograd records, the fused path from CPU_MIN_BYTES (CPU_MIN_BYTES_BACKWARD for SE, ECA and GE θ⁻,
    whose reference forward already is the fused forward's passes); without autograd at any size, but for those."""
    small = torch.empty(16, 64, 8, 8)  # 256 KiB
    assert small.nbytes == dispatch.CPU_MIN_BYTES < dispatch.CPU_MIN_BYTES_BACKWARD
    assert kernels.backend_for(small) is cpu and kernels.backend_for(small, forward_pays=False) is None
    assert kernels.backend_for(torch.empty(16, 64, 8, 7)) is None
    assert kernels.backend_for(torch.empty(32, 64, 8, 8), forward_pays=False) is cpu
    with torch.no_grad():
        assert kernels.backend_for(torch.empty(2, 3, 4, 4)) is cpu
        assert kernels.backend_for(torch.empty(32, 64, 8, 8), forward_pays=False) is None
    calls = []
    module = randomised(attnkit.create("cbam", 16, reduction=4), seed=1).eval()
    x = torch.randn(2, 16, 5, 5)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(cpu, "pool_hw_avgmax", lambda *args, f=cpu.pool_hw_avgmax: calls.append(1) or f(*args))
        y = module(x)
    assert calls == [1]
    with torch.no_grad(), kernels.use("reference"):
        assert_close(y, module(x), 1e-5, "cbam without autograd")
