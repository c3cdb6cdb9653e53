"""The attached model is an ordinary PyTorch model: saved whole and loaded in a fresh process with the same outputs,
traced by torch.fx with the gate where the layer was, printed with its gates, in the mode, dtype and device of the
layer each gate follows; forward hooks on a gated layer see the gated output; detectors with FrozenBatchNorm2d and
segmentation models take attention like their backbones."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import attnkit
from attnkit.surgery import gates_of, is_gated

pytestmark = pytest.mark.usefixtures("one_thread")


def _gates_active(model: nn.Module) -> nn.Module:
    """Random BN affine parameters, so that no gate's effect is hidden by a zero-initialised norm."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


def test_saved_whole_it_loads_in_a_fresh_process_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    models = {}
    for name, build, spec in [("resnet18_cbam", lambda: torchvision.models.resnet18(num_classes=4), "cbam"),
                              ("mobilenet_v3_coord", lambda: torchvision.models.mobilenet_v3_small(num_classes=4), "coord"),
                              ("cifar_resnet20_srm", lambda: attnkit.create_model("resnet20", num_classes=4), "srm"),
                              ("densenet_eca", lambda: torchvision.models.DenseNet(8, (2, 2), 16, num_classes=4), "eca")]:
        model = _gates_active(build())
        attnkit.attach(model, spec)
        models[name] = model.eval()
    x = torch.randn(2, 3, 64, 64)
    for name, model in models.items():
        torch.save(model, tmp_path / f"{name}.pt")
        with torch.no_grad():
            torch.save(model(x), tmp_path / f"{name}.out")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)  # as the test's process: the same kernels, bit for bit
        x = torch.load({str(tmp_path / 'x.pt')!r})
        for name in {list(models)!r}:
            model = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
            with torch.no_grad():
                same = torch.equal(model(x), torch.load({str(tmp_path)!r} + f"/{{name}}.out"))
            print(name, same, type(model).__module__, "attnkit" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert [line.split()[:2] for line in lines if line] == [[name, "True"] for name in models]


def test_fx_traces_the_gate_where_the_layer_was_and_feature_extraction_sees_it():
    torch.manual_seed(0)
    model = _gates_active(torchvision.models.resnet18()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.layer1[0].bn2(model.layer1[0].conv2(model.layer1[0].relu(model.layer1[0].bn1(
            model.layer1[0].conv1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))))
    attnkit.attach(model, "cbam")
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls.count("layer1.0.bn2") == 1  # torch.nn's BatchNorm stays one call, which includes its gate
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    from torchvision.models.feature_extraction import create_feature_extractor

    features = create_feature_extractor(model, {"layer1.0.bn2": "gated"})
    with torch.no_grad():
        gated = features(x)["gated"]
    torch.testing.assert_close(gated, model.layer1[0].attn(plain))


def test_a_forward_hook_on_a_gated_layer_sees_the_gated_output():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    attnkit.attach(model, "ge", where=["layer2.0.bn2"])  # θ⁻: x·σ(mean)
    seen = {}

    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        seen.update(inputs=inputs[0].clone(), out=out.clone())  # the block then adds to `out` in place

    model.layer2[0].bn2.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        bn = nn.BatchNorm2d(128).eval()
        bn.load_state_dict(model.layer2[0].bn2.state_dict())
        normalised = bn(seen["inputs"])
    torch.testing.assert_close(seen["out"], normalised * torch.sigmoid(normalised.mean((2, 3), keepdim=True)))


def test_repr_shows_each_gate_and_keys_are_unchanged():
    model = torchvision.models.resnet18()
    keys = list(model.state_dict())
    attnkit.attach(model, "se")
    attnkit.attach(model, "eca", allow_multiple=True)
    text = repr(model.layer1[0])
    assert "(attn): SqueezeExcite(" in text and "(attn1): ECA(" in text
    assert "then SqueezeExcite, ECA)" in text  # on the gated BatchNorm's line
    assert [k for k in model.state_dict() if ".attn" not in k] == keys
    assert isinstance(model.layer1[0].bn2, nn.BatchNorm2d) and type(model.layer1[0].bn2).__name__ == "BatchNorm2d"
    assert is_gated(model.layer1[0].bn2) and [type(g).__name__ for g in gates_of(model.layer1[0].bn2)] == ["SqueezeExcite", "ECA"]


@pytest.mark.parametrize("convert", ["eval", "double", "bfloat16"])
def test_new_modules_follow_the_model_mode_and_dtype(convert):
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    model = getattr(model, convert)()
    report = attnkit.attach(model, "cbam")
    dtype = torch.float32 if convert == "eval" else getattr(torch, {"double": "float64"}.get(convert, convert))
    for site in report:
        gate = model.get_submodule(site.module)
        assert {p.dtype for p in gate.parameters()} == {dtype}
        assert gate.training == (convert != "eval")
    x = torch.randn(3, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype
    if convert == "eval":  # evaluation is per image: one image alone gives what it gives in a batch
        with torch.no_grad():
            torch.testing.assert_close(model(x[:1]), out[:1], rtol=1e-5, atol=1e-6)


def test_a_detector_with_frozen_batchnorm_takes_attention_in_its_backbone():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    detector = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96).eval()
    images = [torch.rand(3, 96, 80)]
    report = attnkit.attach(detector, "se", identity_init=True)
    assert len(report) == 8 and report.sites[0].after == "backbone.body.layer1.0.bn2"
    assert isinstance(detector.backbone.body.layer1[0].bn2, FrozenBatchNorm2d)
    with torch.no_grad():
        for site in report:
            detector.get_submodule(site.module).alpha.fill_(0.5)
        detections = detector(images)
    assert set(detections[0]) == {"boxes", "labels", "scores"}
    detector.train()
    losses = detector(images, [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert detector.backbone.body.layer1[0].attn.alpha.grad is not None


def test_a_segmentation_model_takes_attention_and_trains():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)["out"]
    report = attnkit.attach(model, "coord", identity_init=True)
    assert len(report) == 15 and {s.rule for s in report} == {"block layout: MobileNetV3/EfficientNet block"}
    with torch.no_grad():
        assert torch.equal(model(x)["out"], before)
    model.train()
    model(x)["out"].mean().backward()
    assert all(model.get_submodule(s.module).alpha.grad is not None for s in report)
