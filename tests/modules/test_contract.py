"""The contract every registered module keeps: shapes and dtypes across odd
sizes, memory format, gradients (float64 gradcheck), torch.compile(fullgraph=True), torch.fx, autocast
numerics, and clear errors for wrong input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit
from attnkit import kernels

from .cases import CASES, DEFAULT_CASES, build, case_id
from .reference import randomize

C = 16
SIZES = [(1, 1), (7, 5), (13, 17)]
CASE_IDS = [case_id(c) for c in CASES]
DEFAULT_IDS = [case_id(c) for c in DEFAULT_CASES]


def out_channels(kwargs: dict) -> int:
    return kwargs.get("out_channels", C)


def out_size(kwargs: dict, size: tuple[int, int]) -> tuple[int, int]:
    stride = kwargs.get("stride", 1)
    return tuple(-(-s // stride) for s in size)


def test_every_registered_module_has_cases():
    assert sorted({name for name, _ in CASES}) == attnkit.list_modules()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shape_dtype_and_batch_sizes(case, size):
    name, kwargs = case
    module = randomize(build(name, kwargs, C, size))
    expected = (out_channels(kwargs), *out_size(kwargs, size))
    module.train()
    y = module(torch.randn(2, C, *size))
    assert y.shape == (2, *expected) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    module.eval()
    y1 = module(torch.randn(1, C, *size))  # evaluation works for any batch size and map size
    assert y1.shape == (1, *expected) and torch.isfinite(y1).all()
    assert module(torch.randn(3, C, *size, dtype=torch.float64).to(torch.float32)).dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_channels_last_in_channels_last_out(case):
    name, kwargs = case
    module = randomize(build(name, kwargs, C, (6, 5))).eval()
    x = torch.randn(2, C, 6, 5)
    y_ref = module(x)
    y = module(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_float64(case):
    name, kwargs = case
    if name == "sk":
        kwargs = {**kwargs, "groups": 4, "out_channels": 8}
    module = randomize(build(name, kwargs, C, (5, 4)), double=True)  # C: grouped modules' defaults need 16
    x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fx_symbolic_trace(case):
    name, kwargs = case
    module = randomize(build(name, kwargs, C, (7, 5))).eval()
    traced = torch.fx.symbolic_trace(module)
    x = torch.randn(2, C, 7, 5)
    torch.testing.assert_close(traced(x), module(x))
    with pytest.raises(ValueError, match=f"built for {C} channels"):
        traced(torch.randn(2, C + 1, 7, 5))  # the input check survives tracing


def _compiled_and_eager(case: tuple[str, dict], batch: int, **compile_options) -> tuple[torch.Tensor, ...]:
    """The case's randomised module compiled with fullgraph=True and run eagerly on the same N×C×7×5 input:
    (compiled output, eager output, compiled input gradient, eager input gradient) of sum(y²)."""
    name, kwargs = case
    torch._dynamo.reset()
    module = randomize(build(name, kwargs, C, (7, 5)))
    compiled = torch.compile(module, fullgraph=True, **compile_options)
    x = torch.randn(batch, C, 7, 5, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    with kernels.use("reference"):  # the formulas the compiler traces ('auto' may take equivalent faster ones)
        y_ref = module(x_ref)
    y_ref.square().sum().backward()
    return y, y_ref, x.grad, x_ref.grad


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compile_fullgraph_graph_capture(case):
    """Dynamo captures forward and backward without a graph break (aot_eager: no code generation)."""
    y, y_ref, grad, grad_ref = _compiled_and_eager(case, 2, backend="aot_eager")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=DEFAULT_IDS)
def test_compile_fullgraph_inductor(case):
    """Each module at its defaults compiles end to end with the default (inductor) backend."""
    y, y_ref, grad, grad_ref = _compiled_and_eager(case, 4)
    # inductor reorders float32 sums: agreement to float32 rounding, amplified a little by batch statistics
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-4)


AUTOCAST = pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
INPUT_DTYPES = pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)


def _autocast_module(name: str, kwargs: dict) -> nn.Module:
    module = build(name, kwargs, C, (9, 8)).eval()
    if name != "sk":  # SK's path convolutions follow autocast like any nn.Conv2d: keep their initial scale
        randomize(module)
    return module


def _expected_dtype(name: str, input_dtype: torch.dtype, autocast_dtype: torch.dtype) -> torch.dtype:
    # SK is a convolution layer, not a gate: autocast runs its convolutions, and so its output, in autocast_dtype
    return autocast_dtype if name == "sk" else input_dtype


@INPUT_DTYPES
@AUTOCAST
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autocast_large_inputs_stay_finite(case, autocast_dtype, input_dtype):
    """Under autocast, inputs up to 1e4 in magnitude give finite outputs in the input's dtype: pooled
    statistics and gate math run in float32 (in float16, 1e4² or a variance of 1e8 would overflow). Where the exact
    result itself leaves float16's range (the non-local block's unnormalised dot-product and concatenation sums, ~1e8
    here), a float16 output is inf there, never NaN."""
    name, kwargs = case
    torch.manual_seed(0)
    module = _autocast_module(name, kwargs)
    x = ((torch.rand(2, C, 9, 8) * 2 - 1) * 1e4).to(input_dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = module(x)
    assert y.dtype == _expected_dtype(name, input_dtype, autocast_dtype)
    inside = module.double()(x.double()).abs() < torch.finfo(y.dtype).max / 2  # clear of rounding up to inf
    assert torch.isfinite(y[inside]).all() and not torch.isnan(y).any()


@INPUT_DTYPES
@AUTOCAST
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autocast_agrees_with_float64(case, autocast_dtype, input_dtype):
    name, kwargs = case
    torch.manual_seed(0)
    module = _autocast_module(name, kwargs)
    x = torch.randn(2, C, 9, 8).to(input_dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = module(x)
    reference = module.double()(x.double())
    torch.testing.assert_close(y.double(), reference, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=DEFAULT_IDS)
def test_wrong_channel_count_names_both_numbers(case):
    name, kwargs = case
    module = build(name, kwargs, C, (5, 5))
    with pytest.raises(ValueError, match=rf"built for {C} channels but the input has {C + 8}"):
        module(torch.randn(2, C + 8, 5, 5))


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=DEFAULT_IDS)
def test_non_4d_and_non_float_input(case):
    name, kwargs = case
    module = build(name, kwargs, C, (5, 5))
    with pytest.raises(ValueError, match=r"4-D feature map .* got a 3-D tensor of shape \(16, 5, 5\)"):
        module(torch.randn(C, 5, 5))
    with pytest.raises(ValueError, match="got a 5-D tensor"):
        module(torch.randn(1, 2, C, 5, 5))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        module(torch.ones(2, C, 5, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        module([[1.0]])
    with pytest.raises(ValueError, match="empty tensor"):
        module(torch.randn(0, C, 5, 5))


def _cannot_train_on_one_pixel(name: str, kwargs: dict) -> bool:
    """Whether, for a 1×1 map and batch 1, some BatchNorm of the module sees a single value per channel."""
    if name in ("srm", "bam", "sk"):
        return True  # BatchNorm over per-sample pooled statistics
    if name == "ge":
        return kwargs.get("variant", "minus") != "minus"
    if name == "cbam":
        return not kwargs.get("no_spatial") and kwargs.get("spatial_norm", True)
    if name == "triplet":
        return not kwargs.get("no_spatial")  # the (H, W) branch normalises N·H·W values
    if name == "nam":
        return True  # NAM normalises x itself: N·H·W values
    if name in ("gam", "nonlocal"):  # the BatchNorm after GAM's convolutions, after the non-local block's W_z
        return kwargs.get("spatial_norm" if name == "gam" else "norm", True)
    return False  # coord normalises N·(H+W) >= 2 values; ema and shuffle use GroupNorm; the rest have no BatchNorm


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_single_value_batchnorm_says_so_and_eval_works(case):
    name, kwargs = case
    module = build(name, kwargs, C, (1, 1)).train()
    x = torch.randn(1, C, 1, 1)
    if _cannot_train_on_one_pixel(name, kwargs):
        with pytest.raises(ValueError, match="BatchNorm cannot train on one value.*call .eval\\(\\)"):
            module(x)
    else:
        assert torch.isfinite(module(x)).all()
    assert torch.isfinite(module.eval()(x)).all()


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=DEFAULT_IDS)
def test_docstring_cites_paper_and_code(case):
    cls = type(build(*case, C, (5, 5)))
    doc = cls.__doc__ or ""
    assert "github.com" in doc and any(str(year) in doc for year in range(2017, 2031))
