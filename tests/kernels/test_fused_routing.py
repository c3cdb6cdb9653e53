"""GCT, FcaNet (on the per-channel primitives), SimAM, scSE, SGE, Shuffle Attention and EMA (on their own) route as the
other fused modules: the fused path in mode 'cpu' (and 'auto' above the size threshold), the reference formulas in mode
'reference' and while traced, exported or compiled; a hook on a gate submodule sees it run; a configuration without a
fused pass (SimAM with another gate function) takes the reference formulas in every mode."""
from __future__ import annotations

import copy

import pytest
import torch

from attnkit import kernels
from attnkit.kernels import cpu

from .modules import create, errors, randomised, run_in_mode
from .primitives import assert_close, feature_map

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

SPECS = ["gct", "gct(mode='l1')", "gct(mode='l1', after_relu=True)", "fca(reduction=4, frequencies='top8')", "simam",
         "scse", "sge(groups=4)", "shuffle(groups=4)", "ema(groups=4)"]
PRIMITIVES = ["pool_hw", "pool_k", "scale_c", "scale_energy", "scale_pair", "scale_groups", "scale_affine"]
SCALES = {"scale_c", "scale_energy", "scale_pair", "scale_groups", "scale_affine"}
SHAPE = (2, 16, 6, 5)


@pytest.fixture
def backend_calls(monkeypatch) -> list[str]:
    """The names of the CPU backend's primitives as they are called."""
    calls: list[str] = []
    for name in PRIMITIVES:
        monkeypatch.setattr(cpu, name, lambda *args, name=name, f=getattr(cpu, name): calls.append(name) or f(*args))
    return calls


@pytest.mark.parametrize("spec", SPECS)
def test_the_modes_choose_the_path(spec, backend_calls):
    module = randomised(create(spec, SHAPE), seed=0).eval()
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    with kernels.use("reference"):
        want = module(x)
    assert backend_calls == []
    with kernels.use("cpu"):
        got = module(x)
    assert SCALES & set(backend_calls)
    assert_close(got, want, 1e-5, spec)
    backend_calls.clear()
    large = feature_map((2, 16, 64, 64), torch.float32, False, ties=False, seed=2)  # 512 KiB: fused in 'auto'
    with torch.no_grad():
        module(large)
    assert SCALES & set(backend_calls)


@pytest.mark.parametrize("spec", SPECS)
def test_tracing_and_export_see_the_reference_formula(spec, backend_calls):
    module = randomised(create(spec, SHAPE), seed=0).eval()
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    with kernels.use("cpu"):
        traced = torch.jit.trace(module, x, check_trace=False)  # the check reruns it untraced
        graph = torch.fx.symbolic_trace(module).graph
        exported = torch.export.export(module, (x,))
    assert backend_calls == []
    assert "PythonOp" not in str(traced.inlined_graph)
    assert not [n for n in graph.nodes if "Function" in str(n.target)]
    exported_graphs = " ".join(str(m.graph) for m in exported.graph_module.modules()
                               if isinstance(m, torch.fx.GraphModule))
    assert "aten" in exported_graphs and "autograd_function" not in exported_graphs
    with kernels.use("reference"):
        want = module(x)
    assert_close(traced(x), want, 1e-5, f"{spec} traced")
    assert_close(exported.module()(x), want, 1e-5, f"{spec} exported")


@pytest.mark.parametrize("spec", SPECS)
def test_compile_sees_the_reference_formula(spec, backend_calls):
    module = randomised(create(spec, SHAPE), seed=0)
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    dy = feature_map(SHAPE, torch.float32, False, ties=False, seed=2)
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True, backend="aot_eager")
    got = run_in_mode(compiled, x, dy, "cpu")
    assert backend_calls == []
    assert max(errors(got, want)) <= 1e-5


@pytest.mark.parametrize("spec, submodule, shape", [
    ("gct", "gate", (SHAPE[0], SHAPE[1], 1, 1)),
    ("fca(reduction=4, frequencies='top8')", "gate", (SHAPE[0], SHAPE[1], 1, 1)),
    ("sge(groups=4)", "gate", (SHAPE[0], 4, *SHAPE[2:])), ("ema(groups=4)", "gate", (SHAPE[0] * 4, 1, *SHAPE[2:])),
    ("ema(groups=4)", "conv1x1", (SHAPE[0] * 4, 4, SHAPE[2] + SHAPE[3], 1))])
def test_a_hook_on_the_gate_sees_it_run_on_the_fused_path(spec, submodule, shape, backend_calls):
    """attnkit.capture records the gate with a forward hook: it runs, on maps of the reference's shape (EMA's 1×1
    convolution, computed as F.linear when no hook observes it, runs as a layer)."""
    module = randomised(create(spec, SHAPE), seed=0)
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    dy = feature_map(SHAPE, torch.float32, False, ties=False, seed=2)
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    hooked, seen = copy.deepcopy(module), []
    getattr(hooked, submodule).register_forward_hook(lambda m, inputs, out: seen.append(tuple(out.shape)))
    got = run_in_mode(hooked, x, dy, "cpu")
    assert SCALES & set(backend_calls) and seen == [shape]
    assert max(errors(got, want)) <= 1e-5


@pytest.mark.parametrize("spec, submodule, shape", [("simam", "gate", SHAPE), ("scse", "conv", (2, 1, 6, 5)),
                                                     ("scse", "channel_gate", (2, 16, 1, 1)),
                                                     ("shuffle(groups=4)", "gn", (8, 2, 6, 5))])
def test_a_hook_on_a_gate_submodule_runs_the_reference(spec, submodule, shape, backend_calls):
    """SimAM's and Shuffle Attention's fused passes compute σ (and the GroupNorm) themselves, scSE's its 1×1
    convolution: where a hook observes one of those submodules, the reference runs, and the hook sees its output."""
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    hooked, seen = create(spec, SHAPE), []
    getattr(hooked, submodule).register_forward_hook(lambda m, inputs, out: seen.append(tuple(out.shape)))
    with kernels.use("cpu"):
        hooked(x)
    assert backend_calls == [] and seen == [shape]


def test_simam_with_another_gate_function_runs_the_reference(backend_calls):
    x = feature_map(SHAPE, torch.float32, False, ties=False, seed=1)
    module = create("simam(gate='hard_sigmoid')", SHAPE)
    with kernels.use("cpu"):
        y = module(x)
    with kernels.use("reference"):
        assert_close(y, module(x), 0, "simam with a hard sigmoid")
    assert backend_calls == []
