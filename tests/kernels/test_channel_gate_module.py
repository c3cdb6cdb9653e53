"""SE's and ECA's whole module in one CPU kernel call each way (cpu.channel_gate_module, sample by sample): against
their equations written out in float64, in every layout, dtype, activation, gate and block ending; results that do
not depend on the thread count; and the cases it leaves to the autograd node of the separate kernels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

NODE = "_ModuleNodeBackward"
ACTS = {"relu": torch.relu, "silu": F.silu, "hard_swish": F.hardswish}
GATES = {"sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid}


def create(name: str, channels: int, seed: int = 0, **config) -> torch.nn.Module:
    """SE or ECA with weights of both signs (so that SE's activation cuts some hidden units and passes others)."""
    module = attnkit.create(name, channels, **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def se(channels: int, seed: int = 0, **config) -> torch.nn.Module:
    return create("se", channels, seed, **config)


def equations(module, x, r, relu, act="relu", gate="sigmoid", passed=None):
    """The forward written out: s = mean_hw(x); SE: z = W₂ act(W₁ s + b₁) + b₂, ECA: z[c] = Σ_i w[i]·s[c + i − (k−1)/2]
    (zero beyond the channels); y = x·gate(z) (+ r, ReLU; where the ReLU `passed` is given, the sums it passed:
    bfloat16's rounding moves sums near 0 to either side)."""
    s = x.mean((2, 3))
    if hasattr(module, "fc1"):
        w1, w2 = module.fc1.weight.flatten(1), module.fc2.weight.flatten(1)
        b1 = 0 if module.fc1.bias is None else module.fc1.bias
        b2 = 0 if module.fc2.bias is None else module.fc2.bias
        z = ACTS[act](s @ w1.t() + b1) @ w2.t() + b2
    else:
        w = module.conv.weight.flatten()
        k = w.numel()
        padded = F.pad(s, ((k - 1) // 2, (k - 1) // 2))
        z = sum(w[i] * padded[:, i:i + s.shape[1]] for i in range(k))
    y = x * GATES[gate](z)[:, :, None, None]
    if r is not None:
        y = y + r
    if not (relu and r is not None):
        return y
    return torch.relu(y) if passed is None else y * passed


def run(module, x, dy, r=None, relu=False, mode="cpu"):
    """y, its grad_fn's name, and the gradients of x, r and the parameters."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    r = None if r is None else r.detach().requires_grad_()
    with kernels.use(mode):
        y = module(x) if r is None else module.forward_residual(x, r, relu)
    name = type(y.grad_fn).__name__
    y.backward(dy)
    return y.detach(), name, [x.grad, None if r is None else r.grad, *(p.grad for p in module.parameters())]


def maps(shape, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]
    return [t.contiguous(memory_format=torch.channels_last) if channels_last else t for t in out]


@pytest.mark.parametrize("name, config", [("se", {}), ("se", {"bias": False}),
                                          ("se", {"act": "silu", "gate": "hard_sigmoid", "reduction": 4}),
                                          ("se", {"act": "hard_swish", "reduction": 8}), ("eca", {}),
                                          ("eca", {"kernel_size": 5}),
                                          ("eca", {"kernel_size": 1, "gate": "hard_sigmoid"})], ids=str)
@pytest.mark.parametrize("shape", [(4, 70, 5, 3), (3, 16, 1, 1)], ids=str)  # NHWC: a block of 64 channels and 6
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ending", [None, "sum", "relu"])
def test_the_kernel_computes_the_modules_equations(name, config, shape, dtype, channels_last, ending):
    module = create(name, shape[1], **config)
    x, r, dy = maps(shape, dtype, channels_last, seed=1)
    r = None if ending is None else r
    y, node, grads = run(module, x, dy, r, ending == "relu")
    assert node == NODE
    x64, r64 = x.double().requires_grad_(), None if r is None else r.double().requires_grad_()
    module64 = copy.deepcopy(module).double()
    module64.zero_grad(set_to_none=True)
    want = equations(module64, x64, r64, ending == "relu", config.get("act", "relu"),
                     config.get("gate", "sigmoid"), passed=y > 0)
    want.backward(dy.double())
    wanted = [x64.grad, None if r is None else r64.grad, *(p.grad for p in module64.parameters())]
    # float32: the kernel's sums against float64's; bfloat16: x·g, the sum and dx are rounded to bfloat16
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), want.detach(), **tolerance)
    assert y.dtype == dtype and y.stride() == x.stride()
    for got, expected in zip(grads, wanted):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got.double(), expected, **tolerance)
    if ending == "relu":
        assert (y == 0).any() and (y > 0).any()


def test_the_gate_network_takes_both_sides_of_its_activation():
    """The case above cuts some hidden units and passes others, so the ReLU's backward is exercised both ways."""
    module = se(70, reduction=4)
    x = maps((4, 70, 5, 3), torch.float32, False, seed=1)[0]
    hidden = module.fc1(x.mean((2, 3), keepdim=True))
    assert (hidden < 0).any() and (hidden > 0).any()


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_thread_count_does_not_change_the_results(name, channels_last):
    """Each thread takes whole samples and each sum runs in a fixed order: 1 and 2 threads agree bit for bit."""
    module = create(name, 32, **({"reduction": 4} if name == "se" else {}))
    x, r, dy = maps((10, 32, 16, 16), torch.float32, channels_last, seed=2)  # 2 threads: 5 samples each
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu._threads(x) == 2
        y2, node, grads2 = run(module, x, dy, r, relu=True)
        torch.set_num_threads(1)
        y1, _, grads1 = run(module, x, dy, r, relu=True)
    finally:
        torch.set_num_threads(before)
    assert node == NODE and torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("ending", [None, "relu"])
def test_without_autograd_the_output_is_the_same(name, ending):
    module = create(name, 24).eval()
    x, r, _ = maps((4, 24, 6, 6), torch.float32, False, seed=3)
    with kernels.use("cpu"):
        with torch.no_grad():
            y = module(x) if ending is None else module.forward_residual(x, r)
        y_grad = module(x.requires_grad_()) if ending is None else module.forward_residual(x, r)
    assert type(y_grad.grad_fn).__name__ == NODE and torch.equal(y, y_grad.detach())


@pytest.mark.parametrize("frozen, x_trains, ending", [("fc1", True, "relu"), ("", False, "relu"), ("", False, None),
                                                      ("fc1,fc2", False, "relu"), ("fc1,fc2", False, "sum")])
def test_what_needs_no_gradient_gets_none_and_the_rest_is_unchanged(frozen, x_trains, ending):
    module = se(32, reduction=4)
    x, r, dy = maps((4, 32, 5, 5), torch.float32, False, seed=4)
    r = None if ending is None else r
    _, _, full = run(module, x, dy, r, ending == "relu")
    for layer in filter(None, frozen.split(",")):
        module.get_submodule(layer).requires_grad_(False)
    module.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_(x_trains)
    rg = None if r is None else r.detach().requires_grad_()
    with kernels.use("cpu"):
        y = module(xg) if rg is None else module.forward_residual(xg, rg, ending == "relu")
    y.backward(dy)
    got = [xg.grad, None if rg is None else rg.grad, *(p.grad for p in module.parameters())]
    trains = [x_trains, rg is not None, *(p.requires_grad for p in module.parameters())]
    for g, f, t in zip(got, full, trains):
        assert (g is not None) == t
        assert g is None or torch.equal(g, f)


@pytest.mark.parametrize("name, weight", [("se", "fc2.weight"), ("eca", "conv.weight")])
def test_a_weight_changed_in_place_before_the_backward_is_an_error(name, weight):
    module = create(name, 32)
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    with kernels.use("cpu"):
        y = module(x)
    assert type(y.grad_fn).__name__ == NODE
    with torch.no_grad():
        module.get_parameter(weight).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("case", ["fewer samples than threads", "large weights", "bfloat16 weights", "gelu"])
def test_the_other_cases_run_the_node_of_the_separate_kernels(case, monkeypatch):
    module = se(32, **({"act": "gelu"} if case == "gelu" else {}))
    x, r, dy = maps((1 if case.startswith("fewer") else 4, 32, 96, 96), torch.float32, False, seed=5)
    if case == "large weights":
        monkeypatch.setattr(cpu, "MODULE_MAX_WEIGHTS", module.fc1.weight.numel() - 1)
    if case == "bfloat16 weights":
        module, x, r, dy = module.bfloat16(), x.bfloat16(), r.bfloat16(), dy.bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, node, grads = run(module, x, dy, r, relu=True)
    finally:
        torch.set_num_threads(before)
    assert node != NODE
    y_ref, _, grads_ref = run(module, x, dy, r, relu=True, mode="reference")
    tolerance = dict(rtol=1e-4, atol=1e-5) if x.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(grads[0], grads_ref[0], **tolerance)
