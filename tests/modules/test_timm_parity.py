"""Parity of attnkit's attention modules with timm's implementations of the same functions.

For each pair, attnkit's module is built with the options that make it compute what timm's computes
(timm follows zoo conventions in places: bias-free MLPs, widths rounded to a divisor of 8, (mean, max)
spatial pools, LayerNorm eps 1e-6, ...). attnkit's parameters and buffers are randomised (randn * 0.5;
BatchNorm running variances positive), copied into timm's module through an explicit name map that must
cover every parameter and buffer of both modules, and both modules run in float32, in train mode and in
eval mode, on the same random input of odd size with H != W. Outputs, input gradients and parameter
gradients of (y * w).sum() for a random w must agree to rtol 1e-5, atol 1e-6.

timm 1.0.31's GatherExcite cannot be constructed, so Gather-Excite is compared with timm 1.0.19, run in a
subprocess from the folder named by ATTNKIT_TIMM_LEGACY (`make test` sets it): two timm versions cannot be
imported into one process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from timm.layers.eca import EcaModule
from timm.layers.global_context import GlobalContext as TimmGlobalContext
from timm.layers.non_local_attn import NonLocalAttn
from timm.layers.squeeze_excite import SEModule
from torch import nn

import attnkit
from attnkit.modules import CBAM, CoordAttention, GlobalContext, NonLocal

from .reference import TRAIN_MODES, assert_close, randomize

RTOL, ATOL = 1e-5, 1e-6
N, H, W = 4, 7, 9  # odd spatial sizes with H != W


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def check_parity(
    ours: nn.Module,
    theirs: nn.Module,
    name_map: dict[str, str],
    *,
    train: bool,
    channels: int,
    reshaped: frozenset[str] = frozenset(),
    compare_buffers: bool = True,
    channels_last: bool = False,
    zero_grads: frozenset[str] = frozenset(),
    dtype: torch.dtype = torch.float32,
) -> None:
    """Copy attnkit's randomised tensors into timm's module and compare the two in float32.

    `name_map` maps each attnkit parameter/buffer name to timm's; it must cover both modules entirely.
    Shapes must match, except for the attnkit names in `reshaped` (same number of elements, e.g. a
    LayerNorm([C, 1, 1]) weight against LayerNorm2d's (C,)). With `compare_buffers`, the buffers
    (BatchNorm running statistics) must also agree after the forward pass. The attnkit parameters in `zero_grads` have
    a gradient of 0 in exact arithmetic (a bias the softmax or a BatchNorm cancels): both sides must be rounding noise,
    below RTOL times the largest parameter gradient. `dtype` float64 compares functions whose float32 rounding alone
    exceeds the tolerances (a softmax over large logits).
    """
    ours_t, theirs_t = _tensors(ours), _tensors(theirs)
    assert set(name_map) == set(ours_t), (
        f"attnkit tensors not mapped: {sorted(set(ours_t) - set(name_map))}, "
        f"mapped but absent: {sorted(set(name_map) - set(ours_t))}"
    )
    assert len(set(name_map.values())) == len(name_map), "two attnkit tensors map to one timm tensor"
    assert set(name_map.values()) == set(theirs_t), (
        f"timm tensors not mapped: {sorted(set(theirs_t) - set(name_map.values()))}, "
        f"mapped but absent: {sorted(set(name_map.values()) - set(theirs_t))}"
    )
    for a, b in name_map.items():
        ta, tb = ours_t[a], theirs_t[b]
        assert isinstance(ta, nn.Parameter) == isinstance(tb, nn.Parameter), f"{a} vs {b}: parameter vs buffer"
        same = ta.numel() == tb.numel() if a in reshaped else ta.shape == tb.shape
        assert same, f"{a} {tuple(ta.shape)} vs {b} {tuple(tb.shape)}"

    randomize(ours)
    with torch.no_grad():
        for a, b in name_map.items():
            theirs_t[b].copy_(ours_t[a].reshape(theirs_t[b].shape))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours.to(dtype=dtype, memory_format=fmt).train(train)
    theirs.to(dtype=dtype, memory_format=fmt).train(train)
    ours_t, theirs_t = _tensors(ours), _tensors(theirs)  # .to() may replace the tensors

    x = torch.randn(N, channels, H, W, dtype=dtype).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    assert ya.shape == x.shape
    assert not torch.allclose(ya, x, rtol=1e-3, atol=1e-3), "the module is (nearly) the identity: a vacuous test"
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()

    torch.testing.assert_close(ya, yb, rtol=RTOL, atol=ATOL, msg=lambda m: f"output: {m}")
    # relative to the gradient's largest value, as the parameters' below: CBAM's spatial gate convolution sums its 98
    # taps in another order than PyTorch's (its AVX2 and AVX512 kernels differ from each other too)
    assert_close(xa.grad, xb.grad, "input gradient", tol=RTOL)
    largest = max(float(t.grad.abs().max()) for t in ours_t.values() if isinstance(t, nn.Parameter))
    for a, b in name_map.items():
        ta, tb = ours_t[a], theirs_t[b]
        if a in zero_grads:
            assert max(float(ta.grad.abs().max()), float(tb.grad.abs().max())) < RTOL * largest, f"grad {a}, {b} not 0"
        elif isinstance(ta, nn.Parameter):
            assert ta.grad is not None and tb.grad is not None, f"{a} / {b}: no gradient"
            # relative to the tensor's largest value: the fused paths sum in another order than timm's
            assert_close(ta.grad.reshape(tb.shape), tb.grad, f"grad {a} vs {b}", tol=RTOL)
        elif compare_buffers:
            torch.testing.assert_close(
                ta.reshape(tb.shape), tb, rtol=RTOL, atol=ATOL, msg=lambda m: f"buffer {a} vs {b}: {m}"
            )


def _bn_map(ours_prefix: str, timm_prefix: str) -> dict[str, str]:
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return {f"{ours_prefix}.{n}": f"{timm_prefix}.{n}" for n in names}


# --------------------------------------------------------------------------------------------------------------
@TRAIN_MODES
@pytest.mark.parametrize("channels", [16, 64])
def test_se(channels: int, train: bool) -> None:
    ours = attnkit.create("se", channels)
    theirs = SEModule(channels, rd_channels=channels // 16)  # timm would round the width to a multiple of 8
    name_map = {f"{fc}.{p}": f"{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    check_parity(ours, theirs, name_map, train=train, channels=channels)


@TRAIN_MODES
@pytest.mark.parametrize("channels", [8, 16, 128, 2048])  # adaptive k = 3, 3, 5, 7: timm's clamp k >= 3 is inert
def test_eca_adaptive_kernel(channels: int, train: bool) -> None:
    ours = attnkit.create("eca", channels)
    theirs = EcaModule(channels=channels)
    check_parity(ours, theirs, {"conv.weight": "conv.weight"}, train=train, channels=channels)


@TRAIN_MODES
@pytest.mark.parametrize("channels", [16, 64])
def test_eca_fixed_kernel(channels: int, train: bool) -> None:
    ours = attnkit.create("eca", channels, kernel_size=3)
    theirs = EcaModule(kernel_size=3)
    check_parity(ours, theirs, {"conv.weight": "conv.weight"}, train=train, channels=channels)


@TRAIN_MODES
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [16, 64])
def test_cbam(channels: int, channels_last: bool, train: bool) -> None:
    ours = CBAM(channels, bias=False, spatial_pools=("mean", "max"))
    theirs = CbamModule(channels, rd_channels=channels // 16)
    name_map = {
        "channel_gate.fc1.weight": "channel.fc1.weight",
        "channel_gate.fc2.weight": "channel.fc2.weight",
        "spatial_gate.conv.weight": "spatial.conv.conv.weight",
        **_bn_map("spatial_gate.bn", "spatial.conv.bn"),
    }
    # BN momentum is 0.01 (official BasicConv) against timm's 0.1: running statistics differ after a
    # train-mode step by design, so only outputs and gradients are compared (eval copies them across).
    check_parity(
        ours, theirs, name_map, train=train, channels=channels, compare_buffers=False, channels_last=channels_last
    )


@TRAIN_MODES
@pytest.mark.parametrize("channels", [16, 64])
def test_coord_attention(channels: int, train: bool) -> None:
    mip = max(8, channels // 32)
    ours = CoordAttention(channels, bias=False, hidden_channels=mip)
    theirs = CoordAttn(channels, rd_channels=mip)  # act nn.Hardswish = h_swish, bias-free convs
    name_map = {
        "conv1.weight": "conv1.weight",
        "conv_h.weight": "conv_h.weight",
        "conv_w.weight": "conv_w.weight",
        **_bn_map("bn1", "bn1"),
    }
    check_parity(ours, theirs, name_map, train=train, channels=channels)  # same BN momentum: buffers compared


@TRAIN_MODES
@pytest.mark.parametrize("fusion", ["add", "mul"])
@pytest.mark.parametrize("channels", [64, 128])  # C/16 = 4, 8: a LayerNorm over 1 or 2 values is degenerate
def test_global_context(channels: int, fusion: str, train: bool) -> None:
    ours = GlobalContext(channels, fusion=(fusion,))
    theirs = TimmGlobalContext(
        channels, fuse_add=fusion == "add", fuse_scale=fusion == "mul", rd_channels=channels // 16
    )
    ours_mlp, timm_mlp = ("channel_add_conv", "mlp_add") if fusion == "add" else ("channel_mul_conv", "mlp_scale")
    ours_ln, timm_ln = getattr(ours, ours_mlp)[1], getattr(theirs, timm_mlp).norm
    assert (ours_ln.eps, timm_ln.eps) == (1e-5, 1e-6)
    timm_ln.eps = ours_ln.eps  # timm's LayerNorm2d uses 1e-6, the official LayerNorm 1e-5
    name_map = {
        "conv_mask.weight": "conv_attn.weight",
        "conv_mask.bias": "conv_attn.bias",
        f"{ours_mlp}.0.weight": f"{timm_mlp}.fc1.weight",
        f"{ours_mlp}.0.bias": f"{timm_mlp}.fc1.bias",
        f"{ours_mlp}.1.weight": f"{timm_mlp}.norm.weight",  # LayerNorm([C/r, 1, 1]) vs LayerNorm2d(C/r)
        f"{ours_mlp}.1.bias": f"{timm_mlp}.norm.bias",
        f"{ours_mlp}.3.weight": f"{timm_mlp}.fc2.weight",  # zero-initialised: randomised by check_parity
        f"{ours_mlp}.3.bias": f"{timm_mlp}.fc2.bias",
    }
    reshaped = frozenset({f"{ours_mlp}.1.weight", f"{ours_mlp}.1.bias"})
    check_parity(ours, theirs, name_map, train=train, channels=channels, reshaped=reshaped)


@TRAIN_MODES
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [16, 64])
def test_non_local(channels: int, channels_last: bool, train: bool) -> None:
    """timm's NonLocalAttn is the embedded-Gaussian block without subsampling, with inner width C/8 rounded to a
    multiple of 8 and the logits scaled by C^-1/2 (the official code: (C/2)^-1/2, after pooling x̂). Compared in
    float64: with logits up to ~35, float32 rounding alone differs by ~1e-7 of the largest input gradient between the
    two orders of the products."""
    inner = max(8, channels // 8)
    ours = NonLocal(channels, hidden_channels=inner, subsample="none", scale=channels ** -0.5)
    theirs = NonLocalAttn(channels)
    assert theirs.t.out_channels == inner
    name_map = {f"{a}.{p}": f"{b}.{p}" for a, b in [("theta", "t"), ("phi", "p"), ("g", "g"), ("w_z", "z")]
                for p in ("weight", "bias")}
    # φ's bias shifts every logit of a row alike (the softmax ignores it); in training, g's and W_z's biases add a
    # constant per channel, which the BatchNorm removes
    zero_grads = {"phi.bias", "g.bias", "w_z.bias"} if train else {"phi.bias"}
    check_parity(ours, theirs, {**name_map, **_bn_map("norm", "norm")}, train=train, channels=channels,
                 channels_last=channels_last, zero_grads=frozenset(zero_grads), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Gather-Excite θ⁻ against timm 1.0.19, in one subprocess for all cases.

GE_CASES = [  # (channels, extent, (H, W)): extents 2 and 4 on maps they divide (nearest upsampling is exact),
    (16, 0, (H, W)),  # and extent 2 on an odd map, where both sides call the same avg_pool2d and interpolate
    (64, 0, (H, W)),
    (16, 2, (8, 12)),
    (64, 2, (8, 12)),
    (16, 4, (8, 12)),
    (16, 2, (H, W)),
]

GE_SCRIPT = r"""
import sys
import torch
import timm
from timm.layers.gather_excite import GatherExcite

assert timm.__version__ == "1.0.19", f"ATTNKIT_TIMM_LEGACY gave timm {timm.__version__} ({timm.__file__})"
cases = torch.load(sys.argv[1])
results = []
for case in cases:
    m = GatherExcite(case["channels"], extra_params=False, extent=case["extent"], use_mlp=False).train(case["train"])
    x = case["x"].clone().requires_grad_(True)
    y = m(x)
    (y * case["w"]).sum().backward()
    results.append({"y": y.detach(), "grad": x.grad, "n_tensors": len(m.state_dict())})
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def legacy_timm_dir() -> str:
    legacy = os.environ.get("ATTNKIT_TIMM_LEGACY")
    if not legacy:
        pytest.skip("ATTNKIT_TIMM_LEGACY is not set: run `make test`, which installs timm 1.0.19 and sets it")
    if not (Path(legacy) / "timm" / "__init__.py").is_file():
        pytest.fail(
            f"ATTNKIT_TIMM_LEGACY={legacy!r} has no timm package; install it with "
            f"`pip install --no-deps --target {legacy} timm==1.0.19` (or delete .venv and rerun `make test`)"
        )
    return legacy


@pytest.fixture(scope="module")
def legacy_ge_runs(legacy_timm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{(channels, extent, size, train): (x, w, timm's output, timm's input gradient, timm's tensor count)}."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for channels, extent, size in GE_CASES:
        for train in (True, False):
            x = torch.randn(N, channels, *size, generator=gen)
            w = torch.randn(N, channels, *size, generator=gen)
            cases.append({"channels": channels, "extent": extent, "train": train, "x": x, "w": w})
    tmp = tmp_path_factory.mktemp("timm_legacy_ge")
    inputs, outputs = tmp / "inputs.pt", tmp / "outputs.pt"
    torch.save(cases, inputs)
    proc = subprocess.run(
        [sys.executable, "-c", GE_SCRIPT, str(inputs), str(outputs)],
        env={**os.environ, "PYTHONPATH": legacy_timm_dir},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"timm 1.0.19 subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = torch.load(outputs)
    assert len(results) == len(cases)
    return {
        (c["channels"], c["extent"], tuple(c["x"].shape[2:]), c["train"]):
            (c["x"], c["w"], r["y"], r["grad"], r["n_tensors"])
        for c, r in zip(cases, results)
    }


@TRAIN_MODES
@pytest.mark.parametrize(
    ("channels", "extent", "size"), GE_CASES, ids=[f"C{c}-e{e}-{h}x{w}" for c, e, (h, w) in GE_CASES]
)
def test_gather_excite_minus(
    legacy_ge_runs: dict, channels: int, extent: int, size: tuple[int, int], train: bool
) -> None:
    x, w, y_timm, grad_timm, n_timm = legacy_ge_runs[(channels, extent, size, train)]
    ours = attnkit.create("ge", channels, extent=extent).train(train)
    assert len(ours.state_dict()) == 0 and n_timm == 0, "θ⁻ is parameter-free on both sides"
    xa = x.clone().requires_grad_(True)
    y = ours(xa)
    assert not torch.allclose(y, x, rtol=1e-3, atol=1e-3)
    (y * w).sum().backward()
    torch.testing.assert_close(y, y_timm, rtol=RTOL, atol=ATOL, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(xa.grad, grad_timm, rtol=RTOL, atol=ATOL, msg=lambda m: f"input gradient: {m}")


# --------------------------------------------------------------------------------------------------------------
# sge, gct, fca, scse, ela, psa: timm computes ELA's unshared variant (SGE, GCT, FcaNet, scSE and PSA are not in timm;
# test_fca compares FcaNet's DC frequency with timm's SEModule, test_scse scSE's cSE with torchvision's SE).
@TRAIN_MODES
@pytest.mark.parametrize("kernel_size", [7, 3])
@pytest.mark.parametrize("channels", [16, 64])
def test_efficient_local_attention(channels: int, kernel_size: int, train: bool) -> None:
    from timm.layers.coord_attn import EfficientLocalAttn

    from attnkit.modules import EfficientLocalAttention

    # timm: one depthwise convolution (as a k×1 / 1×k Conv2d) and GroupNorm(1) per direction, then SiLU
    ours = EfficientLocalAttention(channels, kernel_size, shared=False, norm_groups=1, act="silu")
    theirs = EfficientLocalAttn(channels, kernel_size=kernel_size)
    names = ["conv_h.weight", "conv_w.weight", "norm_h.weight", "norm_h.bias", "norm_w.weight", "norm_w.bias"]
    check_parity(ours, theirs, {n: n for n in names}, train=train, channels=channels,
                 reshaped=frozenset({"conv_h.weight", "conv_w.weight"}))  # (C, 1, k) against (C, 1, k, 1) and (C, 1, 1, k)
