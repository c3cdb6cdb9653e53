"""A residual block's end, max(gate(x) + residual, 0), fused into the gate's passes (forward_residual and
attnkit.surgery.gating.residual_end): the same numbers as the separate operations, bit for bit, in the module and
in a whole training run of attnkit's ResNets; the separate operations wherever the fused path must not run (another
dtype or layout of the residual, hooks, tracing), and nothing else changes for a model that has no such gate."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu
from attnkit.models.resnet import Bottleneck, ResNet

from .modules import create, randomised
from .primitives import feature_map

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

FUSING = ["se", "eca", "srm", "ge", "se(reduction=4, act='silu', gate='hard_sigmoid')", "cbam(reduction=4)",
          "cbam(reduction=4, spatial_pools=('max', 'mean'), pool_types=('max', 'avg'))", "coord"]
SHAPE = (3, 24, 7, 5)


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls of the CPU kernels that end a block (scale_c_add, scale_cs_add, scale_hw_add), by name."""
    calls = []
    for name in ("scale_c_add", "scale_cs_add", "scale_hw_add"):
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    return calls


def run(module: torch.nn.Module, x: torch.Tensor, r: torch.Tensor, dy: torch.Tensor, fused: bool, relu: bool,
        mode: str = "cpu"):
    """(output, gradients of x, r and the parameters) of the block's end, fused or as separate operations."""
    xg, rg = x.detach().requires_grad_(), r.detach().requires_grad_()
    with kernels.use(mode):
        if fused:
            y = module.forward_residual(xg, rg, relu)
        else:
            y = module(xg) + rg
            y = torch.relu(y) if relu else y
    y.backward(dy)
    return [y, xg.grad, rg.grad] + [p.grad for p in module.parameters()]


def assert_identical(got: list, want: list) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), k
        if b is not None:
            assert a.dtype == b.dtype and a.stride() == b.stride(), k
            assert torch.equal(a, b), f"result {k}: {(a != b).sum()} elements differ"


@pytest.mark.parametrize("spec", FUSING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_the_fused_end_equals_the_separate_operations_bit_for_bit(spec, dtype, channels_last, relu, fused_calls):
    module = randomised(create(spec, SHAPE), seed=0).to(dtype if dtype == torch.float32 else torch.float32)
    x, r, dy = (feature_map(SHAPE, dtype, channels_last, ties=False, seed=s) for s in (1, 2, 3))
    want = run(copy.deepcopy(module), x, r, dy, fused=False, relu=relu)
    got = run(copy.deepcopy(module), x, r, dy, fused=True, relu=relu)
    assert len(fused_calls) == 1
    assert_identical(got, want)
    if relu:
        assert (want[0] == 0).any() and (want[0] > 0).any()  # the ReLU cut some values and passed others


@pytest.mark.parametrize("spec", ["se", "srm"])
def test_without_autograd_the_fused_end_equals_too(spec):
    module = randomised(create(spec, SHAPE), seed=0).eval()
    x, r = (feature_map(SHAPE, torch.float32, False, ties=False, seed=s) for s in (1, 2))
    with torch.no_grad(), kernels.use("cpu"):
        assert torch.equal(module.forward_residual(x, r), torch.relu(module(x) + r))


@pytest.mark.parametrize("residual", ["float64", "channels_last", "broadcast", "hooked"])
def test_the_separate_operations_run_where_the_fused_pass_cannot(residual, fused_calls):
    module = randomised(create("se", SHAPE), seed=0)
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    r = feature_map(SHAPE, torch.float32, False, ties=False, seed=2)
    seen = []
    if residual == "float64":
        r = r.double()
    elif residual == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    elif residual == "broadcast":
        r = r[:, :, :1, :1]
    else:
        module.register_forward_hook(lambda m, i, o: seen.append(o))
    with kernels.use("cpu"):
        got = module.forward_residual(x, r)
        want = torch.relu(module(x) + r)
    assert fused_calls == [] and torch.equal(got, want) and got.dtype == want.dtype
    assert len(seen) == (2 if residual == "hooked" else 0)  # the hook saw both calls


def test_the_other_modules_end_a_block_as_the_separate_operations_would(fused_calls):
    x, r = (feature_map(SHAPE, torch.float32, False, ties=False, seed=s) for s in (1, 2))
    for spec in ["cbam(reduction=4, residual=True)", "cbam(reduction=4, pool_types=('avg', 'lse'))",
                 "cbam(reduction=4, no_spatial=True)",
                 "ge(variant='theta', spatial_size={hw})", "triplet(kernel_size=3)", "simam", "bam"]:
        module = randomised(create(spec, SHAPE), seed=0)
        with kernels.use("cpu"):
            assert torch.equal(module.forward_residual(x, r, relu=False), module(x) + r), spec
    assert fused_calls == []


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def block_relus(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ReLUs that end the residual blocks of attnkit's ResNets."""
    return [block.relu for block in model.modules() if hasattr(block, "downsample") and hasattr(block, "relu")]


def bottleneck_resnet(attn: str) -> torch.nn.Module:
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)
    attnkit.attach(model, attn)
    return model


NETWORKS = {
    "cifar-resnet": lambda attn: attnkit.create_model("resnet20", attn=attn, num_classes=10),
    "bottleneck-resnet": bottleneck_resnet,
}
RELU_CALLS = {"cifar-resnet": 2, "bottleneck-resnet": 3}  # per block: a block's one ReLU module runs after each BN


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("attn", ["se", "srm", "cbam", "coord"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_a_resnet_with_the_fused_ends_is_bit_for_bit_the_same(network, attn, channels_last, fused_calls):
    """The blocks' ReLUs observed by a hook make the blocks end as written; the parameters, BN statistics and the
    evaluation outputs after three steps are the same either way."""
    torch.manual_seed(0)
    model = NETWORKS[network](attn)
    separate = copy.deepcopy(model)
    seen = []
    for relu in block_relus(separate):
        relu.register_forward_hook(lambda m, i, o: seen.append(1))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, model, separate = x.contiguous(memory_format=layout), model.to(memory_format=layout), separate.to(memory_format=layout)
    with kernels.use("cpu"):
        fused_state = train(model, x, y)
        assert len(fused_calls) == 3 * len(block_relus(model)) and seen == []
        separate_state = train(separate, x, y)
        assert len(fused_calls) == 3 * len(block_relus(model)) and len(seen) == RELU_CALLS[network] * len(fused_calls)
        with torch.no_grad():
            outputs = model.eval()(x), separate.eval()(x)
    assert all(torch.equal(fused_state[k], separate_state[k]) for k in fused_state)
    assert torch.equal(*outputs)


def test_a_plain_network_and_traced_ones_end_their_blocks_as_written(fused_calls):
    """No gate: the block's own operations; torch.fx keeps the blocks' structure (BN, the addition, the ReLU module)
    and torch.jit.trace the same outputs, both without the fused Function."""
    def ends(graph: fx.Graph) -> tuple[int, int]:
        """(calls of the blocks' ReLU modules, additions)"""
        return (sum(n.op == "call_module" and n.target.endswith(".relu") for n in graph.nodes),
                sum(n.op == "call_function" and n.target is operator.add for n in graph.nodes))

    assert ends(fx.symbolic_trace(attnkit.create_model("resnet20", num_classes=10)).graph) == (2 * 9, 9)
    gated = attnkit.create_model("resnet20", attn="se", num_classes=10).eval()
    traced = fx.symbolic_trace(gated)
    assert ends(traced.graph) == (2 * 9, 9)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), kernels.use("cpu"):
        jit = torch.jit.trace(gated, x, check_trace=False)  # the check would run the model eagerly
        assert fused_calls == []
        assert torch.equal(traced(x), gated(x)) and torch.allclose(jit(x), gated(x), atol=1e-5)
    assert len(fused_calls) == 2 * 9  # the blocks of the eager model, run twice; the fx graph ends them as written


def test_flop_counting_sees_the_separate_operations():
    """A global module hook (torch.utils.flop_counter sets them) makes the blocks end as written, so every
    operation is counted in either mode."""
    model = attnkit.create_model("resnet20", attn="se", num_classes=10)
    with kernels.use("cpu"):
        fused = attnkit.cost.count_macs(model, (1, 3, 32, 32))
    with kernels.use("reference"):
        assert attnkit.cost.count_macs(model, (1, 3, 32, 32)) == fused
