"""export(): every module and every built-in backbone with every module exports to ONNX and torch.export; the files
are read back here with their runtimes (independently of export()'s own check) and match the PyTorch model at
two input sizes; bad input gets a clear error."""
from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import attnkit
from tests.deploy.common import BACKBONES, SPECS, randomise, rel_error
from tests.modules.cases import CASES, DEFAULT_CASES, INPUT_SIZE, build, case_id

SIZES = ((9, 7), (13, 10))  # odd sizes on purpose


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def onnx_run(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def program_run(path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(x)


def _fixed_size(kwargs: dict) -> bool:
    return INPUT_SIZE in kwargs.values()  # GE θ with a global gather takes one size


def _module_exports(case, tmp_path, fmt: str, run) -> None:
    name, kwargs = case
    size = SIZES[0]
    module = randomise(build(name, kwargs, 16, size))
    dynamic = not _fixed_size(kwargs)
    path = tmp_path / f"m{attnkit.deploy.FORMATS[fmt]}"
    report = attnkit.export(module, path, fmt, input_shape=(16, *size), dynamic_batch=True, dynamic_size=dynamic)
    assert len(report.checks) == (4 if dynamic else 2) and report.max_rel_error < 1e-4
    for n, (h, w) in [(2, size), (5, SIZES[1] if dynamic else size)]:
        x = torch.randn(n, 16, h, w)
        assert rel_error(run(path, x), _reference(module, x)) < 1e-4


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_id)
def test_every_module_exports_to_onnx(case, tmp_path):
    _module_exports(case, tmp_path, "onnx", onnx_run)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_id)
def test_every_module_exports_to_torch_export(case, tmp_path):
    _module_exports(case, tmp_path, "exported-program", program_run)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c not in DEFAULT_CASES], ids=case_id)
@pytest.mark.parametrize("fmt, run", [("onnx", onnx_run), ("exported-program", program_run)], ids=["onnx", "pt2"])
def test_every_module_option_exports(case, fmt, run, tmp_path):
    _module_exports(case, tmp_path, fmt, run)


def _inside(shape: tuple[int, ...], ranges: dict) -> tuple[int, ...]:
    n, c, h, w = shape
    clamp = {axis: (lambda v, lo_hi=ranges[axis]: int(min(max(v, lo_hi[0]), lo_hi[1]))) for axis in ranges}
    keep = lambda v: v  # noqa: E731
    return clamp.get("batch", keep)(n), c, clamp.get("height", keep)(h), clamp.get("width", keep)(w)


def _backbone_exports(backbone: str, attn: str | None, tmp_path, fmt: str, run) -> None:
    # weights drawn from a fixed seed, not from whatever state earlier tests left: a randomly initialised deep network
    # with random BatchNorm statistics can have a gain of thousands (logits up to ~2,600), and folding its BatchNorms
    # then moves the output by up to 3.5e-4 of its largest logit (ResNet-56 with scSE over seeds 0-8: 4e-7 to 8e-5,
    # and 3.5e-4 in one run of the slow suite), while both eager paths stay within 7e-6 of float64
    torch.manual_seed(0)
    model = randomise(attnkit.create_model(backbone, attn=SPECS.get(attn), num_classes=10))
    size = 32 if backbone in ("resnet20", "resnet56") else 64  # CIFAR ResNets at 32; 64: no 1×1 map at the end
    path = tmp_path / f"m{attnkit.deploy.FORMATS[fmt]}"
    report = attnkit.export(model, path, fmt, input_shape=(3, size, size), dynamic_batch=True, dynamic_size=True)
    smaller = size - 26  # onnxruntime runs any size; check one where the deepest maps shrink below the example's
    for shape in [(1, 3, size, size), (3, 3, size + 13, smaller if fmt == "onnx" else size + 6)]:
        if fmt == "exported-program":  # the program refuses sizes outside what torch.export traced it for
            shape = _inside(shape, report.ranges)
        x = torch.randn(shape)
        assert rel_error(run(path, x), _reference(model, x)) < 1e-4


# a few pairings in the default run (torch.export of a deep network with dynamic sizes takes a minute on 2 cores);
# every backbone with every module in the slow one
@pytest.mark.parametrize("backbone, attn", [("resnet18", "cbam"), ("resnet20", "coord")])
def test_backbones_export_to_onnx(backbone, attn, tmp_path):
    _backbone_exports(backbone, attn, tmp_path, "onnx", onnx_run)


@pytest.mark.parametrize("backbone, attn", [("mobilenet_v2", "srm")])
def test_backbones_export_to_torch_export(backbone, attn, tmp_path):
    _backbone_exports(backbone, attn, tmp_path, "exported-program", program_run)


@pytest.mark.slow
@pytest.mark.parametrize("attn", [None, *SPECS], ids=str)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("fmt, run", [("onnx", onnx_run), ("exported-program", program_run)], ids=["onnx", "pt2"])
def test_every_backbone_with_every_module_exports(backbone, attn, fmt, run, tmp_path):
    _backbone_exports(backbone, attn, tmp_path, fmt, run)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript(tmp_path):
    model = randomise(attnkit.create_model("resnet20", attn="coord", num_classes=10))
    path = tmp_path / "m.ts"
    report = attnkit.export(model, path, "torchscript", input_shape=(3, 32, 32), dynamic_batch=True, dynamic_size=True)
    assert [c.input_shape for c in report.checks] == [(2, 3, 32, 32), (3, 3, 32, 32), (3, 3, 49, 40), (3, 3, 17, 15)]
    loaded = torch.jit.load(str(path))
    x = torch.randn(4, 3, 40, 36)
    assert rel_error(loaded(x), _reference(model, x)) < 1e-4


def test_unfolded_export_keeps_the_batchnorms(tmp_path):
    model = randomise(attnkit.create_model("resnet20", attn="srm", num_classes=10))
    folded = attnkit.export(model, tmp_path / "a.pt2", "exported-program", input_shape=(3, 32, 32))
    kept = attnkit.export(model, tmp_path / "b.pt2", "exported-program", input_shape=(3, 32, 32), fold=False)
    assert folded.batchnorms_folded == 19 + 9 and kept.batchnorms_folded == 0  # 19 backbone BNs, 9 SRM BNs
    ops = str(torch.export.load(str(tmp_path / "b.pt2")).graph)
    assert "batch_norm" in ops and "batch_norm" not in str(torch.export.load(str(tmp_path / "a.pt2")).graph)


def test_global_gather_refuses_a_dynamic_size_clearly(tmp_path):
    model = attnkit.create_model("resnet20", num_classes=10)
    attnkit.attach(model, "ge(variant='theta', spatial_size=8)", stages=(3,))
    with pytest.raises(ValueError, match=r"layer3\.\d\.attn \(GatherExcite\) takes 8×8 feature maps only .* Export with a fixed size"):
        attnkit.export(model, tmp_path / "m.onnx", input_shape=(3, 32, 32), dynamic_size=True)
    report = attnkit.export(model, tmp_path / "m.onnx", input_shape=(3, 32, 32), dynamic_batch=True)
    assert report.max_rel_error < 1e-4


def test_a_model_that_takes_one_size_refuses_a_dynamic_size(tmp_path):
    model = attnkit.create_model("lenet", attn="se", num_classes=10, in_chans=1, input_size=28)
    with pytest.raises(ValueError, match=r"does not run on an input of shape 1×1×43×35.*Export with fixed axes"):
        attnkit.export(model, tmp_path / "m.onnx", input_shape=(1, 28, 28), dynamic_size=True)


def test_tracing_dynamic_sizes_at_a_degenerate_example_is_caught(tmp_path):
    """At 32×32 MobileNetV2's last maps are 1×1, and torch.export's program holds for sizes up to 32 only: the
    check outside that range finds the ONNX file wrong (the gate's broadcast was traced for 1×1 maps), and the
    error says why."""
    model = attnkit.create_model("mobilenet_v2", attn="se", num_classes=10)
    with pytest.raises(ValueError, match=r"(?s)valid for .*height 2\.\.32.*shrinks to 1×1.*larger input size"):
        attnkit.export(model, tmp_path / "m.onnx", input_shape=(3, 32, 32), dynamic_size=True)


def test_a_mismatch_above_the_tolerance_is_an_error(tmp_path):
    model = randomise(attnkit.create_model("resnet20", attn="se", num_classes=10))
    with pytest.raises(ValueError, match="more than the tolerance"):
        attnkit.export(model, tmp_path / "m.pt2", "exported-program", input_shape=(3, 32, 32), tolerance=1e-15)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"format": "tflite"}, ValueError, r"`format` must be one of \['onnx', 'exported-program', 'torchscript'\]"),
        ({}, ValueError, r"needs `input_shape`=\(C, H, W\)"),
        ({"input_shape": (3, 32)}, ValueError, r"`input_shape` must be \(C, H, W\).*got \(3, 32\)"),
        ({"input_shape": (3, 32, 32), "batch_size": 0}, ValueError, r"`batch_size` must be a positive integer, got 0"),
        ({"input_shape": (3, 32, 32), "format": "exported-program"}, ValueError, r"\.pt2 files"),
    ],
)
def test_bad_arguments(kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        attnkit.export(attnkit.create_model("resnet20"), tmp_path / "m.onnx", **kwargs)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        attnkit.export(tmp_path / "missing.pt")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ValueError, match="is not a readable attnkit checkpoint"):
        attnkit.export(tmp_path / "noise.pt")
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="is not an attnkit training checkpoint"):
        attnkit.export(tmp_path / "weights.pt")
    with pytest.raises(TypeError, match="an nn.Module or a checkpoint path, got int"):
        attnkit.export(3)


def test_a_program_refusing_a_size_is_reported_not_hidden(tmp_path):
    """torch.export guards an intermediate size (GE's gathered map at width 1 at a 5×2 input): the .pt2 program
    raises there rather than compute something wrong; the report says so, and the other checks still count."""
    module = randomise(attnkit.create("ge", 16, extent=2))
    report = attnkit.export(module, tmp_path / "m.pt2", "exported-program", input_shape=(16, 9, 7), dynamic_size=True)
    refused = [c for c in report.checks if c.refused]
    assert [c.input_shape for c in refused] == [(1, 16, 5, 2)] and "Guard failed" in refused[0].refused
    assert "input 1×16×5×2: refused by the program (Guard failed" in str(report)
    assert report.max_rel_error < 1e-4 and len(report.checks) == 3
