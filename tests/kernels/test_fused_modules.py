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

from .primitives import assert_close, feature_map

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

SPECS = [
    "se", "se(reduction=4, act='silu', gate='hard_sigmoid')", "eca", "eca(kernel_size=5)", "srm", "ge",
    "cbam(reduction=4)", "cbam(reduction=4, spatial_pools=('max', 'mean'), pool_types=('max', 'avg'))",
    "cbam(reduction=4, pool_types=('avg',), residual=True)", "coord", "coord(bias=False, act='silu')",
    "triplet(kernel_size=3)", "triplet(no_spatial=True)",
]
SHAPES = [(3, 24, 7, 5), (3, 17, 1, 9), (4, 40, 6, 6)]  # batch >= 3: BatchNorm over two values is ill-conditioned


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random parameters (zero-initialised ones such as SRM's would hide mistakes) and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.8 + 0.2)
    return module


def _run(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str):
    xg = x.detach().requires_grad_()
    with kernels.use(mode):
        y = module(xg)
    y.backward(dy)
    grads = [xg.grad] + [p.grad for p in module.parameters()]
    buffers = [b.clone() for b in module.buffers() if b.is_floating_point()]
    return y, grads, buffers


def _errors(got, want) -> list[float]:
    """For the output and each gradient, max |got − want| over the larger of max |want| and a tenth of the run's
    largest gradient (a gradient that is zero but for rounding, as a bias's before a BatchNorm, has no scale of
    its own)."""
    (y, grads, buffers), (y_want, grads_want, buffers_want) = got, want
    floor = 0.1 * max(g.abs().max().item() for g in grads_want if g is not None)
    errors = []
    for a, b in zip([y, *grads, *buffers], [y_want, *grads_want, *buffers_want]):
        assert (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype))
        if b is not None:
            scale = max(b.abs().max().item(), floor)
            errors.append((a.double() - b.double()).abs().max().item() / scale)
    return errors


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_reference_in_float32(spec, shape, channels_last, training):
    module = _randomised(attnkit.create(spec, shape[1]), seed=0).train(training)
    x = feature_map(shape, torch.float32, channels_last, ties=False, seed=1)
    dy = feature_map(shape, torch.float32, channels_last, ties=False, seed=2)
    want = _run(copy.deepcopy(module), x, dy, "reference")
    got = _run(copy.deepcopy(module), x, dy, "cpu")
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # SRM's BatchNorm normalises C statistics over a batch of 3 or 4: it amplifies the last-bit differences of the
    # pooled moments (the fused ones, summed in float64, are the closer to exact)
    rtol = 1e-4 if spec == "srm" and training else 1e-5
    assert max(_errors(got, want)) <= rtol


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_is_as_exact_as_the_reference_in_bfloat16(spec, shape, params_dtype, channels_last):
    """bfloat16 input (with tied maxima), float32 or bfloat16 parameters: measured against the float32 evaluation of
    the same values, the fused path's largest error (over the output and every gradient) is within 1e-2, or within
    1.5 times the reference path's (whose own reductions round to bfloat16; which gradient a rounding hits most
    varies between the two)."""
    module = _randomised(attnkit.create(spec, shape[1]), seed=0).to(params_dtype)
    x = feature_map(shape, torch.bfloat16, channels_last, ties=True, seed=1)
    dy = feature_map(shape, torch.bfloat16, channels_last, ties=False, seed=2)
    exact = _run(copy.deepcopy(module).float(), x.float(), dy.float(), "reference")
    reference = _run(copy.deepcopy(module), x, dy, "reference")
    fused = _run(copy.deepcopy(module), x, dy, "cpu")
    assert fused[0].dtype == torch.bfloat16
    fused_error, reference_error = max(_errors(_float(fused), exact)), max(_errors(_float(reference), exact))
    assert fused_error <= max(1e-2, 1.5 * reference_error), (fused_error, reference_error)


def _float(run):
    y, grads, buffers = run
    return y.float(), [None if g is None else g.float() for g in grads], [b.float() for b in buffers]


@pytest.mark.parametrize("spec", ["se", "srm", "cbam(reduction=4)", "coord", "triplet"])
def test_fused_is_the_default_and_runs_without_autograd(spec):
    module = _randomised(attnkit.create(spec, 24), seed=3).eval()
    x = torch.randn(2, 24, 5, 6)
    assert kernels.get_mode() == "auto" and kernels.backend_for(x) is cpu
    with torch.no_grad():
        y = module(x)
        with kernels.use("reference"):
            y_ref = module(x)
    assert_close(y, y_ref, 1e-5, spec)


def test_parameters_that_do_not_train_get_no_gradient_and_frozen_input_gets_none():
    module = _randomised(attnkit.create("se", 16), seed=4)
    module.fc1.weight.requires_grad_(False)
    x = torch.randn(2, 16, 4, 4)  # no gradient wanted for x
    module(x).sum().backward()
    assert module.fc1.weight.grad is None and module.fc2.weight.grad is not None


def test_saved_for_backward_is_x_and_small_tensors():
    """The fused Function keeps x and the parameters, nothing else full-size (the reference keeps several maps)."""
    module = attnkit.create("cbam", 64)
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    full = [s for s in sizes if s >= x.numel()]
    assert full == [x.numel()], f"full-size tensors saved: {len(full)}"


def test_mode_names_are_checked_and_forced_backends_say_why_they_cannot_run():
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
