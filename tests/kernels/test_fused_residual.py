"""A residual block's end, max(gate(x) + residual, 0), fused into the gate's passes (forward_residual and
attnkit.surgery.gating.residual_end): the same numbers as the separate operations, bit for bit, in the module and
in a whole training run of attnkit's, torchvision's and timm's ResNets; the separate operations wherever the fused path must not run (another
dtype or layout of the residual, hooks, tracing), and nothing else changes for a model that has no such gate."""
from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu
from attnkit.models.resnet import Bottleneck, ResNet
from attnkit.surgery.endings import ending_of

from .modules import create, randomised
from .primitives import feature_map

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

FUSING = ["se", "eca", "srm", "ge", "se(reduction=4, act='silu', gate='hard_sigmoid')", "cbam(reduction=4)",
          "cbam(reduction=4, spatial_pools=('max', 'mean'), pool_types=('max', 'avg'))", "coord"]
SHAPE = (3, 24, 7, 5)


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls of the CPU kernels that end a block (scale_c_add, scale_cs_add, scale_hw_add; SE's and ECA's
    whole-module channel_gate_module given a residual), by name."""
    calls = []

    def recorded(kernel, name):
        def call(*args):
            if name != "channel_gate_module" or args[1] is not None:
                calls.append(name)
            return kernel(*args)
        return call

    for name in ("scale_c_add", "scale_cs_add", "scale_hw_add", "channel_gate_module"):
        monkeypatch.setattr(cpu, name, recorded(getattr(cpu, name), name))
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


def ending_relu(block: torch.nn.Module) -> torch.nn.Module:
    """The ReLU module that ends a residual block (attnkit.surgery.endings.ENDINGS names it for each class)."""
    return getattr(block, ending_of(block).activation)


def block_relus(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ReLUs that end the residual blocks of a ResNet (attnkit's, torchvision's or timm's) or a RegNet."""
    return [ending_relu(block) for block in model.modules() if ending_of(block) is not None]


def attached(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    attnkit.attach(model, attn)
    return model


def timm_resnet(block: str, **kwargs) -> torch.nn.Module:
    from timm.models import resnet

    return resnet.ResNet(getattr(resnet, block), [1, 1, 1, 1], num_classes=10, **kwargs)


# network: (the network with attention `attn`, calls of the ReLU that ends a block per block and forward pass)
NETWORKS = {
    "cifar-resnet": (lambda attn: attnkit.create_model("resnet20", attn=attn, num_classes=10), 2),
    "bottleneck-resnet": (lambda attn: attached(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10), attn), 3),
    "torchvision-basic": (lambda attn: attached(torchvision.models.resnet18(num_classes=10), attn), 2),
    "torchvision-bottleneck": (lambda attn: attached(torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10), attn), 3),
    "timm-basic": (lambda attn: attached(timm_resnet("BasicBlock"), attn), 1),
    "timm-bottleneck": (lambda attn: attached(timm_resnet("Bottleneck"), attn), 1),
    "torchvision-regnet": (lambda attn: attached(torchvision.models.regnet_x_400mf(num_classes=10), attn), 1),
}


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("attn", ["se", "srm", "cbam", "coord"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_a_resnet_with_the_fused_ends_is_bit_for_bit_the_same(network, attn, channels_last, fused_calls):
    """The blocks' ReLUs observed by a hook make the blocks end as written; the parameters, BN statistics and the
    evaluation outputs after three steps are the same either way. torchvision's and timm's blocks end in the gate
    through attach()'s rewrite of their forward (attnkit.surgery.endings)."""
    build, relu_calls = NETWORKS[network]
    torch.manual_seed(0)
    model = build(attn)
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
        assert len(fused_calls) == 3 * len(block_relus(model)) and len(seen) == relu_calls * len(fused_calls)
        with torch.no_grad():
            outputs = model.eval()(x), separate.eval()(x)
    assert all(torch.equal(fused_state[k], separate_state[k]) for k in fused_state)
    assert torch.equal(*outputs)


def fused_ends(model: torch.nn.Module, calls: list, x: torch.Tensor) -> int:
    """How many blocks one forward pass of `model` ends in the fused kernels."""
    del calls[:]
    with torch.no_grad(), kernels.use("cpu"):
        model(x)
    return len(calls)


def test_the_rewritten_blocks_end_as_written_where_the_rewrite_would_differ(fused_calls):
    """A hook on any layer of a block, timm's own attention in the block, a drop path that drops, and a subclass of
    the block (its forward may be its own) leave the block's forward as its library wrote it."""
    x = torch.randn(2, 3, 32, 32)
    model = attached(torchvision.models.resnet18(num_classes=10), "se").eval()
    assert fused_ends(model, fused_calls, x) == 8
    handle = model.layer2[1].conv1.register_forward_hook(lambda m, i, o: None)
    assert fused_ends(model, fused_calls, x) == 7
    handle.remove()

    dropping = attached(timm_resnet("BasicBlock", drop_path_rate=0.2), "se")
    assert fused_ends(dropping.train(), fused_calls, x) == 1  # the first block's drop rate is 0
    assert fused_ends(dropping.eval(), fused_calls, x) == 4
    own_se = attached(timm_resnet("BasicBlock", block_args={"attn_layer": "se"}), "eca")
    assert fused_ends(own_se.eval(), fused_calls, x) == 0

    class MyBlock(torchvision.models.resnet.BasicBlock):
        pass

    mine = attached(torchvision.models.resnet.ResNet(MyBlock, [1, 1, 1, 1], num_classes=10), "se").eval()
    assert fused_ends(mine, fused_calls, x) == 0


def test_a_rewritten_block_pickles_traces_and_prints_as_before(fused_calls):
    """torch.save and deepcopy keep the ending; torch.fx traces the block's own forward (its addition and ReLU);
    the block prints as the plain block and keeps its class name."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model = attached(torchvision.models.resnet18(num_classes=10), "cbam").eval()
    assert repr(model.layer1[0]).splitlines()[0] == "BasicBlock("
    assert type(model.layer1[0]).__name__ == "BasicBlock" and isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        assert fused_ends(copied, fused_calls, x) == 8
    traced = fx.symbolic_trace(model)
    adds = sum(n.op == "call_function" and n.target in (operator.add, operator.iadd) for n in traced.graph.nodes)
    assert adds == 8 and fused_ends(traced, fused_calls, x) == 0
    with torch.no_grad(), kernels.use("cpu"):
        assert torch.equal(traced(x), model(x))


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
