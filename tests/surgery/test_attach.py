"""attach() into torchvision, timm and hand-made models; identity start; load_pretrained() and its errors."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

import attnkit
import pytest


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "factory, spec, sites, first",
    [
        (torchvision.models.resnet18, "se", 8, "layer1.0.bn2"),
        (torchvision.models.resnet50, "eca", 16, "layer1.0.bn3"),
        (torchvision.models.mobilenet_v2, "coord", 16, "features.2.conv.1"),
        (lambda: timm.create_model("resnet26", pretrained=False), "cbam", 8, "layer1.0.bn3"),
    ],
    ids=["tv-resnet18", "tv-resnet50", "tv-mobilenet_v2", "timm-resnet26"],
)
def test_attach_auto_into_library_models(factory, spec, sites, first):
    model = factory()
    keys_before, params_before = list(model.state_dict()), n_params(model)
    report = attnkit.attach(model, spec)
    assert len(report) == sites and report.sites[0].after == first
    assert n_params(model) - params_before == report.params_added == sum(s.params for s in report)
    assert [k for k in model.state_dict() if ".attn" not in k] == keys_before  # original names unchanged
    y = model(torch.randn(2, 3, 64, 64))
    y.sum().backward()
    gate = model.get_submodule(report.sites[0].module)
    assert all(p.grad is not None for p in gate.parameters())
    assert spec in str(report) and first in str(report)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_attach_by_names_and_by_pattern():
    model = TinyNet()
    report = attnkit.attach(model, "se(reduction=4)", where=["features.2", "features.4"])
    assert [(s.module, s.after, s.channels) for s in report] == [("attn", "features.2", 8), ("attn1", "features.4", 16)]
    assert report.params_added == (2 * 8 * 2 + 2 + 8) + (2 * 16 * 4 + 4 + 16)
    assert model(torch.randn(2, 3, 9, 9)).shape == (2, 4)
    pattern = attnkit.attach(TinyNet(), "eca", where=r"features\.[24]")
    assert [s.after for s in pattern] == ["features.2", "features.4"]


def test_gate_changes_the_output_it_is_attached_to():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    attnkit.attach(model, "ge", where=["features.4"])  # θ⁻: x·σ(mean), parameter-free
    feats = model.features(x)
    plain = nn.Sequential(*list(model.features)[:4])(x).relu()
    torch.testing.assert_close(feats, plain * torch.sigmoid(plain.mean((2, 3), keepdim=True)))
    assert not torch.allclose(model(x), before)


def test_attach_twice_is_an_error_unless_asked():
    model = torchvision.models.resnet18()
    attnkit.attach(model, "se")
    with pytest.raises(ValueError, match="already has an attention module; pass allow_multiple=True"):
        attnkit.attach(model, "eca")
    report = attnkit.attach(model, "eca", allow_multiple=True)
    assert report.sites[0].module == "layer1.0.attn1"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_stages_and_output_position():
    report = attnkit.attach(torchvision.models.resnet50(), "se", stages=[3, 4])
    assert len(report) == 9 and report.sites[0].after == "layer3.0.bn3"
    report = attnkit.attach(torchvision.models.resnet18(), "se", position="output")
    assert report.sites[0].after == "layer1.0" and report.sites[0].module == "layer1.0.attn"


def test_a_network_of_plain_layers_gets_its_stage_output_and_bad_names_are_refused():
    report = attnkit.attach(TinyNet(), "se")  # no blocks, no residuals: the last layer at the one resolution
    assert [(s.after, s.rule) for s in report] == [("features.4", "stage output")]
    with pytest.raises(ValueError, match=r"has no module 'features.9'. Close names: features\.4, "):
        attnkit.attach(TinyNet(), "se", where=["features.9"])
    with pytest.raises(ValueError, match="matches no module"):
        attnkit.attach(TinyNet(), "se", where=r"layer\d")
    with pytest.raises(ValueError, match="position='residual' places attention inside blocks of known families, but "
                                         "'features' is a Sequential"):
        attnkit.attach(TinyNet(), "se", where=["features"], position="residual")


def test_fx_and_compile_see_the_gate():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(2, 3, 9, 9)
    plain = model(x)
    attnkit.attach(model, "cbam(reduction=4)", where=["features.4"])
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"].count("features.4") == 1
    torch.testing.assert_close(traced(x), model(x))
    assert not torch.allclose(traced(x), plain)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def saved_resnet18(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A torchvision ResNet-18 and its state dict saved to a file (once: 45 MB)."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=5).eval()
    path = tmp_path_factory.mktemp("pretrained") / "resnet18.pth"
    torch.save(original.state_dict(), path)
    return original, path


@pytest.mark.parametrize("spec", ["se", "cbam", "eca", "coord", "srm", "ge", "gc", "triplet", "bam"])
def test_pretrained_weights_load_and_identity_start_keeps_outputs(saved_resnet18, spec):
    original, path = saved_resnet18
    model = attnkit.create_model("resnet18", attn=spec, num_classes=5, identity_init=True).eval()
    report = attnkit.load_pretrained(model, path)
    assert sorted(report.loaded) == sorted(original.state_dict())
    assert report.unexpected == [] and report.mismatched == []
    assert report.missing and all(".attn" in k for k in report.missing)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model(x), original(x), rtol=1e-6, atol=1e-6)


def test_identity_start_trains_away_from_identity():
    model = attnkit.create_model("resnet18", attn="se", num_classes=5, identity_init=True)
    alpha = model.layer1[0].attn.alpha
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert alpha.item() == 0 and alpha.grad is not None and alpha.grad.abs() > 0


def test_load_pretrained_handles_wrappers_and_reports_mismatches():
    source = torchvision.models.resnet18(num_classes=10)
    wrapped = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    model = attnkit.create_model("resnet18", attn="se", num_classes=5)
    report = attnkit.load_pretrained(model, wrapped)
    assert [(k, want, got) for k, want, got in report.mismatched] == [("fc.weight", (5, 512), (10, 512)), ("fc.bias", (5,), (10,))]
    assert "shape mismatch, not loaded: fc.weight" in str(report)
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_load_pretrained_errors(tmp_path):
    model = attnkit.create_model("resnet18")
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        attnkit.load_pretrained(model, tmp_path / "missing.pth")
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mbv2.pth")
    with pytest.raises(ValueError, match="from another architecture"):
        attnkit.load_pretrained(model, tmp_path / "mbv2.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*junk.pth.* as a weights-only PyTorch checkpoint"):
        attnkit.load_pretrained(model, tmp_path / "junk.pth")
