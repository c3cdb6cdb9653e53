"""Every fused module equals its reference path: outputs, input gradients, parameter gradients and BatchNorm running
statistics, float32 (1e-5 of the largest value) and bfloat16 (1e-2), NCHW and channels_last, odd shapes, train and
eval mode. The fused path is the default where a backend serves the input."""
from __future__ import annotations

import copy

import pytest
import torch

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu

from .modules import create, errors, randomised, run_in_mode
from .primitives import assert_close, feature_map

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

SPECS = [
    "se", "se(reduction=4, act='silu', gate='hard_sigmoid')", "eca", "eca(kernel_size=5)", "srm", "ge",
    "ge(variant='theta', spatial_size={hw})", "ge(variant='plus', spatial_size={hw}, reduction=4)",
    "cbam(reduction=4)", "cbam(reduction=4, spatial_pools=('max', 'mean'), pool_types=('max', 'avg'))",
    "cbam(reduction=4, pool_types=('avg',), residual=True)", "coord", "coord(bias=False, act='silu')",
    "triplet(kernel_size=3)", "triplet(no_spatial=True)", "gct", "gct(mode='l1')",
    "gct(mode='l1', after_relu=True)",
    "fca(reduction=4, frequencies='top{parts}')", "fca(frequencies='low{parts}', dct_size=14, bias=True)", "simam",
    "simam(e_lambda=0.1)", "scse", "scse(combine='add', reduction=4, act='silu')", "scse(combine='mul', bias=False)",
    "sge(groups={parts})", "sge(groups=1, gate='hard_sigmoid')", "ema(groups={parts})",
]
# the float32 comparison of the fused and the reference path against float64, where both lose more than 1e-5 to
# rounding: SRM's BatchNorm over a batch of 3 or 4 amplifies the last-bit differences of the pooled moments (up to
# ~1e-4 on some CPUs' kernels); FcaNet's DCT coefficients are sums of up to ±√(hw)-weighted terms
VERSUS_FLOAT64 = {"srm": "training", "fca(reduction=4, frequencies='top{parts}')": "always",
                  "fca(frequencies='low{parts}', dct_size=14, bias=True)": "always"}
SHAPES = [(3, 24, 7, 5), (3, 17, 1, 9), (4, 40, 6, 6)]  # batch >= 3: BatchNorm over two values is ill-conditioned
# Shuffle Attention splits every group into two halves: an even channel count
EVEN_SPECS = ["shuffle(groups=4)", "shuffle(groups=1, gate='hard_sigmoid')"]
EVEN_SHAPES = [(3, 24, 7, 5), (3, 16, 1, 9), (4, 40, 6, 6)]
# EMA's 3×3 branch, GroupNorm and cross-spatial sum run at full size in bfloat16 parameters on both paths, and which
# path a rounding hits harder varies more: over 8 seeds the ratio of their largest errors ranged 0.6-1.6 (both 1-5%)
BFLOAT16_PARAMS_RATIO = {"ema(groups={parts})": 2.0}
CASES = [(spec, shape) for spec in SPECS for shape in SHAPES] + [
    (spec, shape) for spec in EVEN_SPECS for shape in EVEN_SHAPES]


@pytest.mark.parametrize("spec, shape", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_reference_in_float32(spec, shape, channels_last, training):
    module = randomised(create(spec, shape), seed=0).train(training)
    x = feature_map(shape, torch.float32, channels_last, ties=False, seed=1)
    dy = feature_map(shape, torch.float32, channels_last, ties=False, seed=2)
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    got = run_in_mode(copy.deepcopy(module), x, dy, "cpu")
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if VERSUS_FLOAT64.get(spec) in ("always", "training" if training else None):
        # both paths are measured against float64, and the fused path is as exact as the reference (within 1.5 times
        # its error, as in bfloat16 below)
        exact = run_in_mode(copy.deepcopy(module).double(), x.double(), dy.double(), "reference")
        assert max(errors(_float64(got), exact)) <= max(1e-5, 1.5 * max(errors(_float64(want), exact)))
    else:
        assert max(errors(got, want)) <= 1e-5


@pytest.mark.parametrize("spec, shape", [(spec, shape) for spec, shape in CASES if shape[2] != 6])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_is_as_exact_as_the_reference_in_bfloat16(spec, shape, params_dtype, channels_last):
    """bfloat16 input (with tied maxima), float32 or bfloat16 parameters: measured against the float32 evaluation of
    the same values, the fused path's largest error (over the output and every gradient) is within 1e-2, or within
    1.5 times the reference path's (whose own reductions round to bfloat16; which gradient a rounding hits most
    varies between the two)."""
    module = randomised(create(spec, shape), seed=0).to(params_dtype)
    x = feature_map(shape, torch.bfloat16, channels_last, ties=True, seed=1)
    dy = feature_map(shape, torch.bfloat16, channels_last, ties=False, seed=2)
    exact = run_in_mode(copy.deepcopy(module).float(), x.float(), dy.float(), "reference")
    reference = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    fused = run_in_mode(copy.deepcopy(module), x, dy, "cpu")
    assert fused[0].dtype == torch.bfloat16
    fused_error, reference_error = max(errors(_float(fused), exact)), max(errors(_float(reference), exact))
    ratio = BFLOAT16_PARAMS_RATIO.get(spec, 1.5) if params_dtype == torch.bfloat16 else 1.5
    assert fused_error <= max(1e-2, ratio * reference_error), (fused_error, reference_error)


def _float64(run):
    y, grads, buffers = run
    return y.double(), [None if g is None else g.double() for g in grads], [b.double() for b in buffers]


def _float(run):
    y, grads, buffers = run
    return y.float(), [None if g is None else g.float() for g in grads], [b.float() for b in buffers]


@pytest.mark.parametrize("spec", ["srm", "ge(variant='theta', spatial_size={hw})", "cbam(reduction=4)", "coord",
                                  "triplet"])
def test_fused_is_the_default_and_runs_without_autograd(spec):
    x = torch.randn(2, 24, 80, 80)  # 1.2 MiB: at least dispatch.CPU_MIN_BYTES
    module = randomised(create(spec, x.shape), seed=3).eval()
    assert kernels.get_mode() == "auto" and kernels.backend_for(x) is cpu
    with torch.no_grad():
        y = module(x)
        with kernels.use("reference"):
            y_ref = module(x)
    # GE θ's gather sums 6,400 float32 products per channel, in another order than the convolution: up to ~2e-5
    assert_close(y, y_ref, 5e-5, spec)


def test_auto_leaves_small_inputs_to_the_reference_formulas():
    small = torch.randn(2, 24, 5, 6)
    assert kernels.backend_for(small) is None
    with kernels.use("cpu"):
        assert kernels.backend_for(small) is cpu
    calls, pool_hw = [], cpu.pool_hw
    module = attnkit.create("srm", 24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "pool_hw", lambda *args: calls.append(args) or pool_hw(*args))
        module(small)
        assert not calls
        module(torch.randn(2, 24, 80, 80))
        assert len(calls) == 1


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("grad", [True, False])
def test_auto_runs_the_whole_module_kernel_at_any_size(name, grad):
    """SE's and ECA's whole-module kernel costs less than the formulas from the smallest maps on (threshold.py), with
    autograd and without; where it does not serve the input (fewer samples than threads), the other paths run."""
    calls, whole = [], cpu.channel_gate_module
    module = attnkit.create(name, 24)
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, torch.set_grad_enabled(grad):
        patch.setattr(cpu, "channel_gate_module", lambda *args: calls.append(args) or whole(*args))
        module(torch.randn(2, 24, 5, 6))
        assert len(calls) == 1
        try:
            torch.set_num_threads(2)
            module(torch.randn(1, 24, 96, 96))  # 864 KiB: 2 threads, 1 sample
        finally:
            torch.set_num_threads(before)
        assert len(calls) == 1


def test_auto_keeps_the_reference_forward_of_mean_then_product_gates_without_autograd():
    """SE, ECA and GE θ⁻ forward without autograd: their reference formula makes the fused passes already, so 'auto'
    keeps it but where the output is large enough for the CPU backend's allocation to pay."""
    x = torch.randn(2, 24, 80, 80)  # 1.2 MiB
    assert kernels.backend_for(x, forward_pays=False) is cpu  # recording autograd: the backward pays
    with torch.no_grad():
        assert kernels.backend_for(x, forward_pays=False) is None and kernels.backend_for(x) is cpu
        assert kernels.backend_for(torch.empty(40, 256, 32, 32), forward_pays=False) is cpu  # 40 MiB
    calls, pool_hw = [], cpu.pool_hw
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(cpu, "pool_hw", lambda *args: calls.append(args) or pool_hw(*args))
        for spec in ["se", "eca", "ge"]:
            attnkit.create(spec, 24)(x)
        assert not calls
        attnkit.create("srm", 24).eval()(x)
        assert len(calls) == 1
    module = randomised(attnkit.create("se", 24), seed=5)
    with torch.no_grad(), kernels.use("cpu"):  # forced, the fused forward runs and equals the reference
        y = module(x)
    with torch.no_grad(), kernels.use("reference"):
        assert_close(y, module(x), 1e-5, "se without autograd")


def test_parameters_that_do_not_train_get_no_gradient_and_frozen_input_gets_none():
    module = randomised(attnkit.create("se", 16), seed=4)
    module.fc1.weight.requires_grad_(False)
    x = torch.randn(2, 16, 4, 4)  # no gradient wanted for x
    module(x).sum().backward()
    assert module.fc1.weight.grad is None and module.fc2.weight.grad is not None


@pytest.mark.parametrize("spec", ["se", "cbam", "ge(variant='theta', spatial_size={hw})"])
def test_saved_for_backward_is_x_and_small_tensors(spec):
    """The fused Function keeps x and the parameters, nothing else full-size (the reference keeps several maps)."""
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    module = create(spec, x.shape)
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with kernels.use("cpu"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    full = [s for s in sizes if s >= x.numel()]
    assert full == [x.numel()], f"full-size tensors saved: {len(full)}"


def test_mode_names_are_checked_and_forced_backends_say_why_they_cannotrun():
    with pytest.raises(ValueError, match="mode must be one of"):
        kernels.set_mode("fast")
    module = attnkit.create("se", 8)
    with kernels.use("cpu"), pytest.raises(RuntimeError, match="float64"):
        module(torch.randn(2, 8, 3, 3, dtype=torch.float64))
    strided = torch.randn(2, 8, 6, 6)[:, :, ::2]
    with kernels.use("cpu"), pytest.raises(RuntimeError, match="contiguous NCHW or channels_last"):
        module(strided)
    assert_close(module(strided), module(strided.contiguous()), 1e-6, "auto falls back to the reference")


def test_tracing_and_export_see_the_reference_formula():
    module = attnkit.create("se", 8).eval()
    traced = torch.jit.trace(module, torch.randn(1, 8, 4, 4))
    assert "aten::mean" in str(traced.graph) and "PythonOp" not in str(traced.graph)
