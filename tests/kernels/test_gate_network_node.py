"""SE's and ECA's fused paths as one autograd node (kernels.functions.GateNetwork; modules.se.PointwiseMLP,
modules.eca.ChannelWindows): the pooling, the gate network with its backward written out and the scaling make a single
node, whose results equal those of the pooling node, the gate network's graph of small operations and the scaling node,
bit for bit."""
from __future__ import annotations

import itertools

import pytest
import torch

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu
from attnkit.modules._common import DERIVATIVES

from .modules import randomised

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

NODE = "_ChannelGateNodeBackward"


@pytest.fixture(autouse=True)
def without_the_whole_module_kernel(monkeypatch):
    """SE and ECA as the node, which they are where the CPU's whole-module kernel does not run them
    (test_channel_gate_module.py)."""
    monkeypatch.setattr(cpu, "MODULE_MAX_WEIGHTS", 0)
MODULES = [("se", {}), ("se", {"bias": False}), ("se", {"act": "silu", "gate": "hard_sigmoid"}),
           ("se", {"act": "hard_swish", "reduction": 4}), ("eca", {}), ("eca", {"kernel_size": 5}),
           ("eca", {"kernel_size": 1, "gate": "hard_sigmoid"})]
SHAPES = [(4, 32, 6, 5), (1, 16, 8, 8), (3, 64, 1, 7)]  # SE's hidden widths 2, 1 and 4; a batch of one


def _run(module, x, dy, residual=None, relu=True, x_trains=True):
    """y, its grad_fn's name, and x's, the residual's and each parameter's gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x_trains)
    r = None if residual is None else residual.detach().requires_grad_()
    with kernels.use("cpu"):
        y = module(x) if r is None else module.forward_residual(x, r, relu)
    name = type(y.grad_fn).__name__
    y.backward(dy)
    return y.detach(), name, [x.grad, None if r is None else r.grad, *(p.grad for p in module.parameters())]


def _as_graph(monkeypatch):
    """No derivative written out: the modules compute their gates as a graph of small operations."""
    for layer in list(DERIVATIVES):
        monkeypatch.delitem(DERIVATIVES, layer)


@pytest.mark.parametrize("name, config, shape, dtype, channels_last, ending",
                         [(*module, *case) for module, *case in itertools.product(
                             MODULES, SHAPES, [torch.float32, torch.bfloat16], [False, True], [None, "relu", "sum"])])
def test_one_node_equals_the_graph_bit_for_bit(name, config, shape, dtype, channels_last, ending, monkeypatch):
    module = randomised(attnkit.create(name, shape[1], **config), seed=1)
    g = torch.Generator().manual_seed(2)
    x, dy, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    if channels_last:
        x, dy, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy, r))
    residual = None if ending is None else r
    y, node, grads = _run(module, x, dy, residual, ending == "relu")
    _as_graph(monkeypatch)
    y_graph, node_graph, grads_graph = _run(module, x, dy, residual, ending == "relu")
    assert node == NODE and node_graph != NODE
    assert torch.equal(y, y_graph)
    for got, want in zip(grads, grads_graph):
        assert (got is None) == (want is None)
        assert got is None or (got.dtype == want.dtype and torch.equal(got, want))


@pytest.mark.parametrize("name, leaves", [("se", 5), ("eca", 2)])
def test_the_node_is_all_the_graph_there_is(name, leaves):
    """The output's node leads straight to x's and the parameters' gradient accumulators (SE: x and fc1's and fc2's
    weights and biases; ECA: x and the kernel): no small operations."""
    module = attnkit.create(name, 32)
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    with kernels.use("cpu"):
        y = module(x)
    assert type(y.grad_fn).__name__ == NODE
    following = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert following == ["AccumulateGrad"] * leaves


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("ending", [None, "relu"])
def test_one_node_equals_the_graph_under_bfloat16_autocast(name, ending, monkeypatch):
    """Autocast is on in the node's forward too: its gate network runs with it off, in the parameters' float32."""
    module = randomised(attnkit.create(name, 32), seed=5)
    x, dy, r = (torch.randn(4, 32, 6, 6).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, node, grads = _run(module, x, dy, None if ending is None else r)
        _as_graph(monkeypatch)
        y_graph, node_graph, grads_graph = _run(module, x, dy, None if ending is None else r)
    assert node == NODE and node_graph != NODE and torch.equal(y, y_graph)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads, grads_graph))


FROZEN = [("se", "fc1", True, True), ("se", "", False, True), ("eca", "", False, True),
          ("eca", "conv", True, False)]  # a frozen kernel: matmul rounds _excite_rows's product otherwise: the graph


@pytest.mark.parametrize("name, frozen, x_trains, node, ending", [
    *[(*case, ending) for case in FROZEN for ending in (None, "relu", "sum")],
    ("se", "fc1,fc2", False, True, "relu"), ("se", "fc1,fc2", False, True, "sum"),  # the residual's gradient alone
])
def test_frozen_parameters_or_input_equal_the_graph(name, frozen, x_trains, node, ending, monkeypatch):
    """What gets no gradient gets None; the rest, down to the residual's alone, equals the graph's bit for bit."""
    module = randomised(attnkit.create(name, 32, **({"reduction": 4} if name == "se" else {})), seed=3)
    for layer in filter(None, frozen.split(",")):
        module.get_submodule(layer).requires_grad_(False)
    x, dy, r = (torch.randn(4, 32, 5, 5) for _ in range(3))
    residual = None if ending is None else r
    y, got_node, grads = _run(module, x, dy, residual, ending == "relu", x_trains)
    _as_graph(monkeypatch)
    y_graph, _, grads_graph = _run(module, x, dy, residual, ending == "relu", x_trains)
    assert (got_node == NODE) == node and torch.equal(y, y_graph)
    assert (grads[0] is None) == (not x_trains)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads, grads_graph))


@pytest.mark.parametrize("name, config", MODULES)
@pytest.mark.parametrize("ending", [None, "relu"])
def test_without_autograd_the_gate_network_is_the_graphs_function(name, config, ending, monkeypatch):
    """Inference calls the gate network as a function: the same numbers as the graph path's operations."""
    module = randomised(attnkit.create(name, 32, **config), seed=6).eval()
    x, r = torch.randn(4, 32, 6, 6), torch.randn(4, 32, 6, 6)

    def run():
        with torch.no_grad(), kernels.use("cpu"):
            return module(x) if ending is None else module.forward_residual(x, r, ending == "relu")

    y = run()
    _as_graph(monkeypatch)
    assert torch.equal(y, run())


@pytest.mark.parametrize("name, weight", [("se", "fc2.weight"), ("eca", "conv.weight")])
def test_a_parameter_changed_in_place_before_the_backward_is_an_error(name, weight):
    """The node saves the weights it multiplied by, so autograd notices an optimizer step between forward and
    backward, as it would in the graph."""
    module = attnkit.create(name, 32)
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    with kernels.use("cpu"):
        y = module(x)
    with torch.no_grad():
        module.get_parameter(weight).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("name, config", [("se", {"act": "leaky_relu"}), ("se", {"act": "gelu"}),
                                          ("eca", {"gate": torch.nn.Tanh})])
def test_activations_without_a_written_out_derivative_keep_the_graph(name, config):
    module = randomised(attnkit.create(name, 32, **config), seed=4)
    x, dy = torch.randn(4, 32, 6, 6), torch.randn(4, 32, 6, 6)
    y, node, grads = _run(module, x, dy)
    assert node != NODE
    with kernels.use("reference"):
        xr = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        y_ref = module(xr)
        y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], xr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["se", "eca"])
def test_a_hook_on_the_gate_network_keeps_the_graph(name):
    """capture() and the pruning tools hook the gate's submodules: they must run, so no node."""
    module = attnkit.create(name, 32)
    seen = []
    module.gate.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    _, node, _ = _run(module, torch.randn(4, 32, 6, 6), torch.randn(4, 32, 6, 6))
    assert node != NODE and seen
