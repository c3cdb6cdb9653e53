"""The gate convolution of CBAM and Triplet Attention (attnkit.modules._common.gate_conv): on the CPU in float32 the
backend's direct kernels compute conv2d(maps, w, padding=k // 2) of a few maps into one, forward and both gradients,
as PyTorch's convolution does in float64; independently of the thread count; and only where the reference formulas
are not required and no hook observes the convolution."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit import kernels
from attnkit.kernels import cpu
from attnkit.kernels.functions import conv_planes
from attnkit.modules._common import gate_conv

from .modules import errors, randomised, run_in_mode

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

# (N, P, H, W, k): CBAM's and Triplet's 2 maps and 7×7, maps narrower and smaller than the kernel, 1×1 maps and
# kernels, other plane and kernel counts, a Triplet (C, W) plane
CASES = [(4, 2, 32, 32, 7), (3, 2, 5, 7, 7), (2, 2, 1, 1, 7), (2, 3, 6, 4, 3), (1, 1, 9, 9, 1), (2, 2, 13, 3, 5),
         (2, 2, 64, 8, 7), (5, 2, 2, 11, 3)]


def _float64_conv(maps: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    """Output, d maps and d weight of PyTorch's convolution in float64."""
    m, w = maps.double().requires_grad_(), weight.double().requires_grad_()
    out = F.conv2d(m, w, padding=w.shape[-1] // 2)
    out.backward(dout.double())
    return [out.detach(), m.grad, w.grad]


def _direct(maps: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor) -> list[torch.Tensor]:
    m, w = maps.clone().requires_grad_(), weight.clone().requires_grad_()
    out = conv_planes(m, w)
    out.backward(dout)
    return [out.detach(), m.grad, w.grad]


def _inputs(n: int, p: int, h: int, w: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, p, h, w, generator=generator)
    return maps, torch.randn(1, p, k, k, generator=generator), torch.randn(n, 1, h, w, generator=generator)


def _within_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """|got − want| within 1e-5 of the sum of the terms' magnitudes, element by element: float32 rounding of sums of
    up to a few thousand terms (a wrong tap or a missed border moves a result by the size of its terms)."""
    return bool(((got.double() - want).abs() <= 1e-5 * magnitude).all())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_direct_kernels_equal_the_convolution_in_float64(case):
    maps, weight, dout = _inputs(*case)
    magnitudes = _float64_conv(maps.abs(), weight.abs(), dout.abs())
    for got, want, magnitude, name in zip(_direct(maps, weight, dout), _float64_conv(maps, weight, dout), magnitudes,
                                          ("out", "dmaps", "dweight")):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert _within_rounding(got, want, magnitude), name


def test_only_the_gradients_asked_for_are_computed():
    maps, weight, dout = _inputs(3, 2, 6, 5, 7)
    _, dmaps, dweight = _float64_conv(maps, weight, dout)
    _, dmaps_size, dweight_size = _float64_conv(maps.abs(), weight.abs(), dout.abs())
    for with_dmaps, with_dweight in [(True, False), (False, True)]:
        got = cpu.conv_planes_backward(dout, maps, weight, with_dmaps, with_dweight)
        for g, want, size, asked in zip(got, (dmaps, dweight), (dmaps_size, dweight_size), (with_dmaps, with_dweight)):
            assert (g is None) == (not asked)
            assert g is None or _within_rounding(g, want, size)
    w = weight.clone().requires_grad_()
    conv_planes(maps, w).backward(dout)  # maps without a gradient: only the weight's
    assert _within_rounding(w.grad, dweight, dweight_size)


def test_results_do_not_depend_on_the_thread_count():
    maps, weight, dout = _inputs(8, 2, 32, 32, 7, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _direct(maps, weight, dout)
        torch.set_num_threads(2)
        assert cpu._conv_threads(maps, 7) == 2
        two = _direct(maps, weight, dout)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def _spatial_conv(**options) -> nn.Conv2d:
    return nn.Conv2d(2, 1, options.pop("kernel_size", 7), padding=options.pop("padding", 3), bias=False, **options)


@pytest.fixture
def direct_calls(monkeypatch):
    """The calls of the direct kernels' forward."""
    calls = []
    forward = cpu.conv_planes
    monkeypatch.setattr(cpu, "conv_planes", lambda *args: calls.append(args[0].shape) or forward(*args))
    return calls


def test_the_gate_convolution_runs_the_direct_kernels_in_modes_auto_and_cpu_only(direct_calls):
    conv, maps = _spatial_conv(), torch.randn(2, 2, 5, 5)
    want = conv(maps)
    for mode in ("auto", "cpu"):
        with kernels.use(mode):
            assert torch.allclose(gate_conv(conv, maps), want, atol=1e-5)
    assert len(direct_calls) == 2
    with kernels.use("reference"):
        assert torch.equal(gate_conv(conv, maps), want)
    assert gate_conv(conv.double(), maps.double()).dtype == torch.float64  # float64: PyTorch's convolution
    assert len(direct_calls) == 2


@pytest.mark.parametrize("options", [dict(stride=2), dict(dilation=2, padding=6), dict(padding=0),
                                     dict(kernel_size=(7, 5), padding=(3, 2)), dict(padding_mode="reflect")], ids=str)
def test_other_convolutions_run_pytorchs(direct_calls, options):
    conv, maps = _spatial_conv(**options), torch.randn(2, 2, 9, 9)
    # from channels_last maps, as gate_conv gives them to PyTorch (whose AVX2 kernels round some of these shapes
    # differently from NCHW maps)
    assert torch.equal(gate_conv(conv, maps), conv(maps.contiguous(memory_format=torch.channels_last)))
    assert not direct_calls


def test_a_bias_is_added(direct_calls):
    conv, maps = nn.Conv2d(2, 1, 7, padding=3), torch.randn(3, 2, 6, 6)
    assert torch.allclose(gate_conv(conv, maps), conv(maps), atol=1e-5) and direct_calls


def test_a_hook_on_the_convolution_sees_it_run(direct_calls):
    conv, maps = _spatial_conv(), torch.randn(2, 2, 5, 5)
    seen = []
    handle = conv.register_forward_hook(lambda m, inputs, out: seen.append(out.shape))
    gate_conv(conv, maps)
    handle.remove()
    assert seen == [(2, 1, 5, 5)] and not direct_calls
    handle = nn.modules.module.register_module_forward_hook(lambda m, inputs, out: seen.append(out.shape))
    try:
        gate_conv(conv, maps)
    finally:
        handle.remove()
    assert len(seen) == 2 and not direct_calls


def test_tracing_and_export_see_the_convolution(direct_calls):
    module = attnkit.create("cbam", 8).eval()
    x = torch.randn(2, 8, 6, 6)
    # check_trace=False: the check runs the module again outside tracing
    assert "aten::_convolution" in str(torch.jit.trace(module, x, check_trace=False).inlined_graph)
    assert "spatial_gate.conv" in {n.target for n in torch.fx.symbolic_trace(module).graph.nodes}
    assert not direct_calls


@pytest.mark.parametrize("spec", ["cbam(reduction=4)", "cbam(reduction=4, spatial_norm=False)", "triplet",
                                  "triplet(kernel_size=3, no_spatial=True)"])
@pytest.mark.parametrize("mode", ["auto", "cpu"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_modules_compute_what_the_reference_does(spec, mode, autocast, direct_calls):
    """Outputs, every gradient and the BatchNorm statistics of CBAM and Triplet Attention with the direct kernels,
    against mode 'reference', in float32 and under bfloat16 autocast (their gate networks run in float32 there)."""
    shape = (6, 16, 9, 7)
    module = randomised(attnkit.create(spec, shape[1]), seed=0)
    x, dy = torch.randn(shape), torch.randn(shape)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
        got = run_in_mode(copy.deepcopy(module), x, dy, mode)
    assert direct_calls and max(errors(got, want)) <= 2e-5


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_multiply_adds_count_the_gate_convolution(mode):
    """attnkit.cost counts with torch.utils.flop_counter, whose module hooks switch the direct kernels off: the
    spatial convolution's k·k·2 multiply-adds per position are counted in every mode."""
    from attnkit.cost import count_macs

    channels, hidden, (h, w) = 32, 2, (6, 5)
    mlp = 2 * (channels * hidden + hidden * channels)  # the shared MLP on the average and the max pool
    with kernels.use(mode):
        assert count_macs(attnkit.create("cbam", channels), (1, channels, h, w)) == mlp + 2 * 49 * h * w
        # Triplet: its branches over (C, W), (H, C) and (H, W) planes
        assert count_macs(attnkit.create("triplet", channels), (1, channels, h, w)) == 2 * 49 * (
            channels * w + h * channels + h * w)
