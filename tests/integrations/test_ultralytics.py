"""attnkit in Ultralytics YOLO, offline: modules as yaml layers (channels measured for every scale), one epoch of
Ultralytics' own train() on a tiny detection set written here, then val, predict, fuse, reload in a fresh process and
ONNX export checked with onnxruntime; attach() into an existing model surviving train()'s rebuild; the classify yaml.

Nothing touches the network: Ultralytics' settings go to a temporary folder, YOLO_OFFLINE is set (no update checks,
no hub), the AMP check (which downloads a model) is off with amp=False and the plots (which download a font) with
plots=False."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics", reason="the yolo extra: pip install attnkit[yolo]")

import attnkit  # noqa: E402
import attnkit.integrations.ultralytics as attnkit_yolo  # noqa: E402
from attnkit.integrations.ultralytics import AttentionLayer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_ultralytics")
TRAIN = dict(epochs=1, imgsz=64, batch=2, workers=0, amp=False, plots=False, device="cpu", exist_ok=True, verbose=False)


@pytest.fixture
def offline_ultralytics(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def detection_set(root: Path, images: int = 4) -> str:
    """A bright box on a dark noisy background per image, in YOLO's layout (images/, labels/ with normalised xywh)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(images):
            image = (rng.random((64, 64, 3)) * 60).astype(np.uint8)
            x, y = rng.integers(8, 28, size=2)
            image[y:y + 24, x:x + 20] = 220
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {(x + 10) / 64} {(y + 12) / 64} {20 / 64} {24 / 64}\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return str(root / "data.yaml")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_layers(model: torch.nn.Module) -> list[AttentionLayer]:
    return [m for m in model.modules() if isinstance(m, AttentionLayer)]


@pytest.mark.parametrize("scale", ["n", "s", "m"])
def test_yaml_layers_take_the_channels_of_every_scale(scale):
    from ultralytics import YOLO

    plain = YOLO(f"yolov8{scale}.yaml").model
    model = YOLO(attnkit_yolo.model_yaml(f"yolov8{scale}-cbam.yaml")).model
    layers = attention_layers(model)
    heads = model.model[-1].f
    assert [layer.i for layer in layers] == heads == [22, 23, 24]
    sources = [plain.model[i] for i in plain.model[-1].f]  # the maps the plain Detect reads: layers 15, 18, 21
    widths = [s.cv2.conv.out_channels for s in sources]
    assert [layer.attn.channels for layer in layers] == widths
    added = sum(count(attnkit.create("cbam", width)) for width in widths)
    assert count(model) == count(plain) + added


def test_yaml_arguments_and_errors():
    from ultralytics import YOLO

    path = attnkit_yolo.model_yaml("yolo11n-se.yaml")
    text = Path(path.replace("yolo11n", "yolo11")).read_text()
    assert "SqueezeExcite" in text
    model = YOLO(path).model
    assert [layer.attn.fc1.out_channels for layer in attention_layers(model)] == [max(1, c // 16) for c in (64, 128, 256)]
    layer = attnkit_yolo._layer_class("cbam")(8, {"kernel_size": 3})
    layer.build(32)
    assert layer.attn.channel_gate.fc1.out_channels == 4 and layer.attn.spatial_gate.conv.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="'cbam' has no argument 'kernal_size'.*Did you mean 'kernel_size'"):
        attnkit_yolo._layer_class("cbam")({"kernal_size": 3})
    with pytest.raises(ValueError, match="expected '<yolov8|yolo11>"):
        attnkit_yolo.model_yaml("resnet50-cbam.yaml")
    with pytest.raises(ValueError, match="Unknown attention module 'cbma'.*Did you mean 'cbam'"):
        attnkit_yolo.model_yaml("yolov8n-cbma.yaml")


def test_detect_train_val_predict_fuse_reload_and_export(tmp_path):
    from ultralytics import YOLO

    data = detection_set(tmp_path / "data")
    model = YOLO(attnkit_yolo.model_yaml("yolov8n-cbam.yaml"))
    model.train(data=data, project=str(tmp_path / "runs"), name="cbam", **TRAIN)
    trained = model.trainer.model  # Ultralytics rebuilt it from the yaml: the attention is there, and trained
    assert len(attention_layers(trained)) == 3
    best = Path(model.trainer.best)
    assert best.is_file()
    metrics = YOLO(best).val(data=data, imgsz=64, batch=2, workers=0, device="cpu", plots=False, verbose=False)
    assert 0 <= metrics.box.map50 <= 1
    results = YOLO(best).predict(str(tmp_path / "data/images/val/0.png"), imgsz=64, verbose=False)
    assert results[0].boxes is not None

    # fuse(): BatchNorms folded, the attention kept: the same outputs as unfused
    net = YOLO(best).model.float().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        unfused = net(x)[0]
        fused = net.fuse(verbose=False)(x)[0]
    assert net.is_fused() and len(attention_layers(net)) == 3
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)

    # reloaded in a fresh process that imports only Ultralytics: unpickling imports attnkit's layers
    script = textwrap.dedent(f"""
        import sys, torch
        from ultralytics import YOLO
        model = YOLO({str(best)!r}).model.float().eval()
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / 'x.pt')!r}))[0]
        torch.save(out, {str(tmp_path / 'fresh.pt')!r})
        print(type(model.model[22]).__module__, "attnkit.integrations.ultralytics" in sys.modules)
    """)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["attnkit.integrations.ultralytics", "True"]
    torch.testing.assert_close(torch.load(tmp_path / "fresh.pt"), unfused, rtol=1e-4, atol=1e-4)

    # ONNX, run by onnxruntime
    import onnxruntime

    onnx_path = YOLO(best).export(format="onnx", imgsz=64, simplify=False)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(exported, unfused.numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("source", ["checkpoint", "yaml"])
def test_attach_into_an_existing_model_survives_train_and_fuse(tmp_path, source):
    from ultralytics import YOLO

    data = detection_set(tmp_path / "data")
    model = YOLO("yolov8n.yaml")
    if source == "checkpoint":  # as a pretrained yolov8n.pt is loaded
        model.save(tmp_path / "pretrained.pt")
        model = YOLO(tmp_path / "pretrained.pt")
    net = model.model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)[0]
    report = attnkit_yolo.attach(model, "se", where="backbone", identity_init=True)
    assert [s.after for s in report] == ["2", "4", "6", "8"]  # YOLOv8's backbone C2f blocks
    with torch.no_grad():
        assert torch.equal(net(x)[0], before)  # identity start: the pretrained function is kept
    model.train(data=data, project=str(tmp_path / "runs"), name="se", **TRAIN)
    rebuilt = model.trainer.model
    gates = [name for name, _ in rebuilt.named_modules() if name.endswith(".attn")]
    assert gates == ["model.2.attn", "model.4.attn", "model.6.attn", "model.8.attn"]
    trained = YOLO(model.trainer.best).model.float().eval()
    assert trained.yaml["attnkit"][0]["layers"] == [2, 4, 6, 8]
    with torch.no_grad():
        for name, m in trained.named_modules():
            if name.endswith(".attn"):
                m.alpha.fill_(0.5)  # the gates on, whatever one epoch taught them
        unfused = trained(x)[0]
        fused = trained.fuse(verbose=False)(x)[0]
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_fuse_keeps_a_gate_after_a_folded_batchnorm():
    from ultralytics import YOLO

    net = YOLO("yolov8n.yaml").model.eval()
    attnkit.attach(net, "ge", where=["model.2.cv2.bn"])  # θ⁻ after a BN that fuse() folds into its convolution
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
        x = torch.rand(1, 3, 64, 64)
        unfused = net(x)[0]
        fused = net.fuse(verbose=False)(x)[0]
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_classify_yaml_trains(tmp_path):
    from ultralytics import YOLO

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, level in (("dark", 40), ("bright", 200)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray((rng.random((32, 32, 3)) * 50 + level).astype(np.uint8)).save(folder / f"{i}.png")
    model = YOLO(attnkit_yolo.model_yaml("yolov8n-cls-cbam.yaml"))
    model.train(data=str(tmp_path / "data"), project=str(tmp_path / "runs"), name="cls", **{**TRAIN, "imgsz": 32})
    assert len(attention_layers(model.trainer.model)) == 1
    assert Path(model.trainer.best).is_file()


def test_a_bad_image_is_still_one_clear_error_after_ultralytics_patched_pillow(tmp_path):
    """Importing Ultralytics replaces PIL.Image.open with a fallback that imports pi-heif for unidentified files."""
    from attnkit.data.formats import read_image

    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        read_image(tmp_path / "broken.png")
