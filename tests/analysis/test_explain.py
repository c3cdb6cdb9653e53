"""explain(): Grad-CAM through the grad-cam package (checked against a Grad-CAM computed here by hand), the
attention maps, the PNG grids and their size, the plain run found in a compare folder, image files, and the
errors a user can cause."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import attnkit
from attnkit import cli
from attnkit.analysis.explain import DPI, HEADER_INCHES, PANEL_INCHES, ROWS_PER_FILE, _attention, explain, find_baseline
from attnkit.analysis.explain import grad_cam
from attnkit.modules.base import AttentionModule
from attnkit.data import load_dataset
from attnkit.train import TrainConfig, model_from_checkpoint, train

from ..modules.reference import randomize


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    """A plain ResNet-20 and a CBAM one, 1 epoch on the digits at 16 px (the tiny fixture's options), laid out
    as `attnkit compare` lays out its runs: <out>/<variant>/seed0/last.pt."""
    out = tmp_path_factory.mktemp("compare")
    base = TrainConfig(model="resnet20", dataset="digits", image_size=16, epochs=1, batch_size=64, lr=0.05,
                       progress=False, tensorboard=False, threads=1)
    for attn in (None, "cbam"):
        config = replace(base, attn=attn)
        train(replace(config, run_dir=str(out / config.variant / "seed0")))
    return out


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _grid_size(rows: int, cols: int) -> tuple[int, int]:
    """Height and width in pixels of a grid of rows × cols panels."""
    return round((rows * PANEL_INCHES + HEADER_INCHES) * DPI), round(cols * PANEL_INCHES * DPI)


def test_compare_run_finds_its_plain_run_and_writes_grids(compare_dir, tmp_path):
    ckpt, plain = compare_dir / "cbam" / "seed0" / "last.pt", compare_dir / "plain" / "seed0" / "last.pt"
    assert find_baseline(ckpt) == plain.resolve() and find_baseline(plain) is None
    count = ROWS_PER_FILE + 2
    report = explain(ckpt, count=count)
    assert report.baseline.checkpoint == plain.resolve() and report.baseline.variant == "plain"
    assert report.model.variant == "cbam" and report.model.target_layer == report.baseline.target_layer == "layer3"
    assert [p.name for p in report.files] == ["gradcam-01.png", "gradcam-02.png", "predictions.csv"]
    assert all(p.parent == ckpt.parent / "explain" for p in report.files)

    # predictions and labels: those of the checkpoints' models on the same test images
    x, y = next(iter(load_dataset("digits", image_size=16).loader(False, count)))
    assert report.labels == y.tolist()
    for side, path in ((report.model, ckpt), (report.baseline, plain)):
        with torch.no_grad():
            probs = model_from_checkpoint(path)(x).softmax(1)
        assert side.predictions == probs.argmax(1).tolist()
        assert side.confidences == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)
        assert side.cams.shape == (count, 16, 16) and side.cams.min() >= 0 and side.cams.max() <= 1
        assert (side.cams.amax((1, 2)) > 0.99).all()  # each map scaled to its own maximum
    assert not torch.allclose(report.model.cams, report.baseline.cams, atol=1e-2)

    # CBAM's last spatial gate, upsampled to the image; σ values
    [site] = report.attention
    assert (site.site, site.gate, site.maps.shape) == ("layer3.2.attn", "spatial", (count, 16, 16))
    assert 0 < site.maps.min() and site.maps.max() < 1 and any("9 spatial attention sites" in n for n in report.notes)

    # grids: input, Grad-CAM plain, Grad-CAM cbam, the spatial map; ROWS_PER_FILE rows per file
    for path, rows in zip(report.files, (ROWS_PER_FILE, 2)):
        pixels = _png(path)
        assert pixels.shape[:2] == _grid_size(rows, 4)
        assert pixels.std() > 0
    lines = (ckpt.parent / "explain" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "image,true,cbam prediction,cbam confidence,plain prediction,plain confidence"
    assert len(lines) == count + 1 and lines[1].startswith(f"digits test #0,{y[0].item()},{report.model.predictions[0]},")
    assert str(report.files[0]) in str(report)

    everything = explain(ckpt, count=2, sites="all", method="gradcam++", target_layer="layer2", out_dir=tmp_path)
    assert [a.site for a in everything.attention] == [f"layer{s}.{b}.attn" for s in (1, 2, 3) for b in range(3)]
    assert everything.model.target_layer == "layer2" and everything.model.predictions == report.model.predictions[:2]
    assert _png(tmp_path / "gradcam++-01.png").shape[:2] == _grid_size(2, 3 + 9)


def test_image_files_are_read_as_the_test_images(compare_dir, tmp_path, capsys):
    """A test image written as an RGB PNG comes back as the same grey input: the same prediction and map."""
    ckpt = compare_dir / "cbam" / "seed0" / "last.pt"
    images, _ = load_dataset("digits", image_size=16).test
    grey = images[3, 0].numpy()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "digit.png")
    Image.fromarray(grey).resize((40, 40), Image.Resampling.NEAREST).save(tmp_path / "big.png")
    assert cli.main(["explain", str(ckpt), "--images", str(tmp_path / "digit.png"), str(tmp_path / "big.png"),
                     "--sites", "layer1.0.attn,layer3.2.attn", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out' / 'gradcam-01.png'}" in out and "plain:" not in out  # no labels, no score
    assert _png(tmp_path / "out" / "gradcam-01.png").shape[:2] == _grid_size(2, 3 + 2)

    files = explain(ckpt, images=[tmp_path / "digit.png"], out_dir=tmp_path / "py")
    from_set = explain(ckpt, count=4, out_dir=tmp_path / "set")
    assert files.labels == [None] and files.images == [str(tmp_path / "digit.png")]
    assert files.model.predictions == from_set.model.predictions[3:]
    assert torch.allclose(files.model.cams[0], from_set.model.cams[3], atol=1e-5)


def test_channel_attention_alone_says_what_is_missing(tiny, tmp_path):
    """LeNet with SE, outside a compare folder: no plain model and no spatial map, both said; the Grad-CAM
    target is the second conv stage's activation (where SE gates), the last map before the classifier."""
    train(tiny(attn="se", epochs=1))
    report = explain(tmp_path / "run" / "last.pt", count=3)
    assert report.baseline is None and report.attention == [] and report.model.target_layer == "relu2"
    assert any(n.startswith("no plain model") for n in report.notes)
    assert "SqueezeExcite (2 sites) gates channels only: no spatial map to draw." in report.notes
    assert "note: no plain model" in str(report)
    pixels = _png(report.files[0])
    assert pixels.shape[:2] == _grid_size(3, 2) and pixels.std() > 0


def _hand_cam(model: nn.Module, x: torch.Tensor, layer: str, classes: list[int], method: str) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2) and Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19) from the
    target layer's activations A and the gradients g = ∂score/∂A, upsampled bilinearly and min-max scaled."""
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.setdefault("A", o))
    scores = model(x)[torch.arange(len(x)), classes]
    handle.remove()
    a = seen["A"]
    (g,) = torch.autograd.grad(scores.sum(), a)
    if method == "gradcam":
        weights = g.mean((2, 3), keepdim=True)
    else:
        alpha = g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3 + 1e-6)
        weights = (g.clamp_min(0) * torch.where(g != 0, alpha, 0)).sum((2, 3), keepdim=True)
    cam = (weights * a).sum(1, keepdim=True).clamp_min(0)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return ((cam - low) / (high - low)).detach()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("layer", ["relu1", "relu2"])  # at the input's size, and at half of it (upsampled)
def test_grad_cam_of_the_package_equals_grad_cam_by_hand(layer, method):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 6, 3, padding=1), relu1=nn.ReLU(), pool=nn.MaxPool2d(2), conv2=nn.Conv2d(6, 8, 3, padding=1),
        relu2=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 3))).eval()
    x, classes = torch.randn(4, 2, 12, 12), [0, 1, 2, 1]
    cams = grad_cam(model, x, layer, classes, method)
    assert cams.shape == (4, 12, 12) and not cams.requires_grad and (cams.amax((1, 2)) > 0.99).all() and cams.std() > 0.1
    torch.testing.assert_close(cams, _hand_cam(model, x, layer, classes, method), atol=1e-4, rtol=0)


def test_user_errors_are_one_line_with_exit_code_2(compare_dir, tmp_path, capsys):
    ckpt = str(compare_dir / "cbam" / "seed0" / "last.pt")
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        (["explain", str(tmp_path / "missing.pt")], f"no checkpoint at {tmp_path / 'missing.pt'}"),
        (["explain", ckpt, "--dataset", "digitz"], "Unknown dataset 'digitz'"),
        (["explain", ckpt, "--images", str(tmp_path / "notes.png")], f"{tmp_path / 'notes.png'} is not a readable image"),
        (["explain", ckpt, "--images", str(tmp_path / "gone.png")], f"no image file at {tmp_path / 'gone.png'}"),
        (["explain", ckpt, "--images", str(tmp_path / "notes.png"), "--dataset", "digits"], "image files or a data set, not both"),
        (["explain", ckpt, "--dataset", "synthetic(channels=3)"], "trained on 1-channel images of 10 classes, but 'synthetic(channels=3)' has 3 channels"),
        (["explain", ckpt, "--target-layer", "layer3.2.relu"], "'layer3.2.relu' does not give one 4-D feature map"),
        (["explain", ckpt, "--target-layer", "layr3"], "no module is called 'layr3'. Did you mean 'layer3'?"),
        (["explain", ckpt, "--count", "0"], "count must be a positive integer, got 0"),
        (["explain", ckpt, "--count", "1", "--sites", "layer3.2.atn"], "got 'layer3.2.atn'. Did you mean 'layer3.2.attn'?"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("attnkit explain: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("attn", "gate", "sites"), [
    ("simam", "attention", 9), ("ema(groups=8)", "attention", 9), ("gam", "channel·spatial", 9),
    ("shuffle(groups=4)", "spatial", 9), ("nam", "channel", 9), ("nonlocal", "attention", 4),
])
def test_each_new_module_draws_its_spatial_map(attn, gate, sites):
    """One map per site at the images' size: SimAM's σ(1/e*), EMA's per-group maps, GAM's Mc·Ms, Shuffle Attention's
    spatial halves, NAM's Mc, each averaged over its channels; the attention each position of the non-local block's
    pooled map receives (resnet20: after every other block of stages 2 and 3)."""
    torch.manual_seed(0)
    model = attnkit.create_model("resnet20", attn=attn, num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, AttentionModule):  # Shuffle Attention's spatial gate starts constant: σ(0·GN + 1)
            randomize(module)
    _, maps, notes = _attention(model, torch.randn(2, 3, 32, 32))
    assert len(maps) == sites and {m.gate for m in maps} == {gate} and not notes
    assert all(m.maps.shape == (2, 32, 32) and torch.isfinite(m.maps).all() and m.maps.std() > 0 for m in maps)
