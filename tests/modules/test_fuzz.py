"""Property-based tests (hypothesis) over every registered module: random valid configurations and inputs never
crash and never give NaN or inf; random invalid arguments and inputs fail only with a ValueError or TypeError
that names what was wrong. 1,000 cases per property (3,000 in all, ~15 s; 20,000 more under the slow marker);
and every module in float16/bfloat16 stays finite."""
from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit

from .cases import CASES, build, case_id

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _accepted_channels(case: str) -> list[int]:
    """The channel counts in 1..48 that a configuration takes (a grouped module's, the multiples of its groups)."""
    name, kwargs = next(c for c in CASES if case_id(c) == case)
    accepted = []
    for channels in range(1, 49):
        try:
            build(name, kwargs, channels, (4, 4))
        except ValueError as error:
            assert any(reason in str(error) for reason in ("must divide", "does not divide", "must be a multiple of", "at least")), error
            continue
        accepted.append(channels)
    assert 16 in accepted, f"{case} refuses the contract's 16 channels"
    return accepted


def _channels(name: str, kwargs: dict) -> st.SearchStrategy[int]:
    if name in ("sk", "ema"):  # grouped convolutions: channels a multiple of the groups
        return st.integers(1, 6).map(lambda k: k * kwargs["groups"])
    return st.sampled_from(_accepted_channels(case_id((name, kwargs))))


@st.composite
def valid_calls(draw):
    name, kwargs = draw(st.sampled_from(CASES))
    channels = draw(_channels(name, kwargs))
    if "out_channels" in kwargs:
        channels = kwargs["groups"] * draw(st.integers(1, 6))
        kwargs = {**kwargs, "out_channels": kwargs["groups"] * draw(st.integers(1, 6))}
    size = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    batch = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    train = draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return name, kwargs, channels, size, batch, dtype, train, scale


def _valid_input_is_finite(call, seed):
    name, kwargs, channels, size, batch, dtype, train, scale = call
    torch.manual_seed(seed)
    module = build(name, kwargs, channels, size).to(dtype).train(train)
    x = scale * torch.randn(batch, channels, *size, dtype=dtype)
    try:
        y = module(x)
    except ValueError as error:  # the one refusal a valid module may give: training BatchNorm on single values
        assert train and "BatchNorm cannot train on one value" in str(error), error
        return
    assert torch.isfinite(y).all(), (name, kwargs, channels, size)
    assert y.dtype == dtype
    if name != "sk":
        assert y.shape == x.shape


@FUZZ
@given(valid_calls(), st.integers(0, 2**31 - 1))
def test_valid_input_is_finite_and_keeps_shape(call, seed):
    _valid_input_is_finite(call, seed)


@pytest.mark.slow
@settings(FUZZ, max_examples=20_000)
@given(valid_calls(), st.integers(0, 2**31 - 1))
def test_valid_input_is_finite_and_keeps_shape_20000_cases(call, seed):
    _valid_input_is_finite(call, seed)


# Where the exact result itself leaves float16's range (±65,504) at |x| ≈ 4e4: CBAM's L2 and log-sum-exp pools
# of a whole map, and the zoo's residual variant (y + x ≈ 2x).
_BEYOND_HALF = [("cbam", {"pool_types": ("avg", "max", "lp", "lse"), "kernel_size": 3}),
                ("cbam", {"residual": True, "spatial_norm": False, "bias": False})]
# The non-local block's dot-product sum y = Σ_j θ_iᵀφ_j g_j / N grows as |x|³: at |x| ≈ 4e3 it leaves float16's range
# inside the block (the softmax of the Gaussian forms and the ReLU of the concatenation keep it near |g|).
_CUBIC_IN_X = [("nonlocal", {"pairwise": "dot_product", "norm": False})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + str(CASES.index(c)))
def test_half_precision_modules_stay_finite(case, dtype):
    """A module converted to float16/bfloat16 (no autocast) gives finite outputs for inputs up to 1e4 in magnitude
    (randn · 1e4: values to about 4e4), in training and in eval mode."""
    name, kwargs = case
    channels = kwargs.get("groups", 8) * 2 if name == "sk" else 16
    scales = [1e-3, 1.0, 1e3] + ([] if case in _BEYOND_HALF and dtype == torch.float16 else [1e4])
    if case in _CUBIC_IN_X and dtype == torch.float16:
        scales = [1e-3, 1.0]
    for seed, scale, train in [(s, c, t) for s in range(2) for c in scales for t in (False, True)]:
        torch.manual_seed(seed)
        module = build(name, kwargs, channels, (7, 5)).to(dtype).train(train)
        y = module((scale * torch.randn(2, channels, 7, 5)).to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all(), (scale, train)


_ANY = st.one_of(
    st.integers(-4, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.tuples(st.integers(-2, 9), st.integers(-2, 9)),
    st.lists(st.sampled_from(["avg", "max", "lp", "lse", "mean", "add", "mul", "x"]), max_size=3).map(tuple),
)


def _options(name: str) -> list[str]:
    params = list(inspect.signature(attnkit.get_module_class(name)).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@FUZZ
@given(st.sampled_from(attnkit.list_modules()), st.data())
def test_any_argument_builds_a_working_module_or_is_a_clear_error(name, data):
    option = data.draw(st.sampled_from(_options(name)))
    value = data.draw(_ANY)
    channels = 128  # divisible by SK's default 32 groups and by Shuffle Attention's 2·64: the defaults are valid
    try:
        module = attnkit.create(name, channels, **{option: value})
    except (ValueError, TypeError) as error:
        assert option in str(error), (option, value, str(error))
        return
    # accepted: then it must work (or refuse a size it cannot take, saying so) on an ordinary input
    x = torch.randn(2, channels, 8, 8)  # 8×8: GE θ's global gather needs spatial_size=(8, 8)
    try:
        y = module.eval()(x)
    except ValueError as error:
        assert "spatial" in str(error) or "size" in str(error), (option, value, error)
        return
    assert torch.isfinite(y).all(), (name, option, value)


@FUZZ
@given(st.sampled_from([c for c in CASES if c[0] != "sk"]), st.lists(st.integers(0, 5), min_size=0, max_size=6),
       st.sampled_from([torch.float32, torch.int64, torch.bool, torch.complex64]))
def test_any_input_is_processed_or_a_clear_error(case, shape, dtype):
    name, kwargs = case
    module = build(name, kwargs, 16, (4, 4)).eval()  # 16: the grouped modules' cases take it
    x = torch.zeros(shape, dtype=dtype)
    try:
        y = module(x)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(word in message for word in ("4-D", "channels", "floating-point", "empty", "spatial", "size")), message
        return
    assert len(shape) == 4 and shape[1] == 16 and math.prod(shape) > 0 and dtype.is_floating_point
    assert torch.isfinite(y).all()
