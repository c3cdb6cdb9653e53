"""attnkit.analysis.gate_stats and `attnkit stats`: on ResNet-20s with SE and SRM trained for one epoch, the
per-class mean excitations in the CSV equal means of attnkit.capture's gates grouped by label, the correlation
matrices equal numpy.corrcoef of the captured weights, the PNGs are real pictures, each module's channel weight is
what its docstring says, and user errors are one line with exit code 2."""
from __future__ import annotations

import contextlib
import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import attnkit
from attnkit import cli
from attnkit.analysis.gate_stats import DPI, PANEL_INCHES, _correlation, channel_weights, gate_stats
from attnkit.runs import load_run
from attnkit.data import load_dataset
from attnkit.modules.base import channel_weights as module_channel_weights, channel_weights_unavailable
from attnkit.train import TrainConfig, build_model, model_from_checkpoint, train
from attnkit.train.checkpoint import save_checkpoint
from attnkit.runs import model_arch

from ..modules.cases import DEFAULT_CASES, build, case_id

STAGE_SITES = ["layer1.2.attn", "layer2.2.attn", "layer3.2.attn"]  # ResNet-20: three stages of three blocks


def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, attn: str) -> str:
    """The `tiny` fixture's run with ResNet-20 at 16 px for one epoch, trained once per test session (`tiny` is per
    test); tests/analysis/test_prune.py shares the SE run."""
    folder = tmp_path_factory.getbasetemp() / f"resnet20-{attn}-digits16"
    if not (folder / "last.pt").exists():
        train(TrainConfig(model="resnet20", attn=attn, dataset="digits", image_size=16, epochs=1, batch_size=64, lr=0.05,
                          progress=False, tensorboard=False, run_dir=str(folder), threads=1))
    return str(folder / "last.pt")


@pytest.fixture(scope="module")
def se_checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory, "se")


@pytest.fixture(scope="module")
def srm_checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory, "srm")


@pytest.fixture(scope="module")
def se_stats(se_checkpoint, tmp_path_factory):
    """`attnkit stats` run once on the SE checkpoint: its folder and what it printed."""
    out = tmp_path_factory.mktemp("stats")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["stats", se_checkpoint, "--out", str(out)]) == 0
    return out, printed.getvalue()


def _untrained_checkpoint(path, attn: str | None) -> str:
    config = TrainConfig(model="resnet20", attn=attn, dataset="digits", image_size=16)
    arch = model_arch(config, load_dataset("digits", image_size=16))
    save_checkpoint(path, {"config": config.to_dict(), "arch": arch, "model": build_model(arch)[0].state_dict()})
    return str(path)


def _captured(model, data, gate: str = "channel") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Channel weights N×C per site and the labels, straight from attnkit.capture on the test split."""
    weights, labels = {}, []
    with torch.no_grad(), attnkit.capture(model) as gates:
        for x, y in data.loader(False, 100):
            model(x)
            labels.append(y.numpy())
    for site, recorded in gates.items():
        weights[site] = torch.cat(recorded[gate]).flatten(1).numpy()
    return weights, np.concatenate(labels)


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_picture(path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.std() > 10 and len(np.unique(pixels @ [65536, 256, 1])) > 50  # drawn on, not blank


def test_class_means_in_the_csv_equal_captured_gates_grouped_by_label(se_checkpoint, se_stats):
    folder, printed = se_stats
    assert "layer3.2.attn" in printed and "digits, test split, 360 images" in printed
    rows = _read_csv(folder / "excitation.csv")
    assert list(rows[0]) == ["site", "stage", "class", "channel", "mean_weight"]
    written = {(r["site"], r["class"], int(r["channel"])): float(r["mean_weight"]) for r in rows}

    model, data = model_from_checkpoint(se_checkpoint), load_dataset("digits", image_size=16)
    weights, labels = _captured(model, data)
    assert len(weights) == 9 and {r["site"] for r in rows} == set(weights)
    assert len(rows) == sum(11 * w.shape[1] for w in weights.values())  # ten classes and 'all'
    for site, w in weights.items():
        for k in range(10):
            mean = w[labels == k].astype(np.float64).mean(0)
            got = [written[site, str(k), c] for c in range(w.shape[1])]
            np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6, err_msg=f"{site} class {k}")
        got = [written[site, "all", c] for c in range(w.shape[1])]
        np.testing.assert_allclose(got, w.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    stages = {r["site"]: r["stage"] for r in rows}
    assert [stages[f"layer{i}.{j}.attn"] for i in (1, 2, 3) for j in range(3)] == list("111222333")
    for site in STAGE_SITES:  # and the correlation matrices, written as C×C tables with channel indices
        written = np.loadtxt(folder / f"correlation-{site}.csv", delimiter=",", skiprows=1)
        np.testing.assert_array_equal(written[:, 0], np.arange(weights[site].shape[1]))
        np.testing.assert_allclose(written[:, 1:], np.corrcoef(weights[site], rowvar=False), atol=1e-6)


def test_pictures_are_valid_pngs_of_one_panel_per_stage(se_stats):
    folder, printed = se_stats
    names = ["excitation.csv", *(f"correlation-{s}.csv" for s in STAGE_SITES), "excitation.png", "correlation.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names) and printed.endswith(", ".join(names) + "\n")
    size = (round(3 * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI))
    _assert_picture(folder / "excitation.png", size)
    _assert_picture(folder / "correlation.png", size)


def test_correlation_matrices_equal_numpy_corrcoef_of_captured_weights(srm_checkpoint):
    run = load_run(srm_checkpoint)
    stats = gate_stats(run.model, run.data)
    assert list(stats.correlations) == STAGE_SITES
    weights, _ = _captured(run.model, run.data)
    for site in STAGE_SITES:
        r = stats.correlations[site]
        expected = np.corrcoef(weights[site], rowvar=False)
        np.testing.assert_allclose(r, expected, atol=1e-6)
        np.testing.assert_array_equal(r, r.T)
        varying = weights[site].std(0) > 0
        assert varying.all()  # SRM's weights vary on every channel here, so the whole diagonal is defined
        np.testing.assert_allclose(np.diag(r)[varying], 1.0, atol=1e-12)


def test_a_constant_channel_has_nan_correlations():
    stats = _correlation(np.array([[0.1, 1.0, 0.3], [0.2, 1.0, 0.1], [0.4, 1.0, 0.2]]))
    assert np.isnan(stats[1]).all() and np.isnan(stats[:, 1]).all()
    np.testing.assert_allclose(stats[[0, 2]][:, [0, 2]], np.corrcoef([[0.1, 0.2, 0.4], [0.3, 0.1, 0.2]]))


def test_max_samples_takes_samples_evenly_spaced_over_the_split(se_checkpoint):
    run = load_run(se_checkpoint)
    stats = gate_stats(run.model, run.data, max_samples=50)
    np.testing.assert_array_equal(stats.samples.labels, run.data.test[1][torch.arange(50) * 360 // 50].numpy())
    assert all(w.shape == (50, w.shape[1]) for w in stats.samples.weights.values())


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=[case_id(c) for c in DEFAULT_CASES])
def test_every_registered_module_gives_one_weight_per_channel_or_says_why(case):
    torch.manual_seed(0)
    module = build(*case, 16, (6, 5)).eval()
    reason = channel_weights_unavailable(module)
    if reason is not None:
        assert isinstance(reason, str) and len(reason) > 10
        return
    with torch.no_grad(), attnkit.capture(nn.Sequential(module)) as gates:
        module(torch.randn(3, 16, 6, 5))
    (recorded,) = gates.values()
    weights = module_channel_weights(module, {gate: values[0] for gate, values in recorded.items()})
    assert weights.shape == (3, module.out_channels if case[0] == "sk" else 16) and torch.isfinite(weights).all()


@pytest.mark.parametrize("spec, gate", [
    ("cbam", "channel"), ("eca", "channel"), ("ge", "gate"), ("gc(fusion='mul')", "mul"), ("bam", "attention"),
    ("coord", None), ("sk(groups=1)", None),
])
def test_each_module_reduces_to_one_weight_per_channel(spec, gate):
    torch.manual_seed(0)
    model = attnkit.create_model("resnet20", attn=spec, num_classes=10, in_chans=1, input_size=16).eval()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad(), attnkit.capture(model) as gates:
        model(x)
    got = channel_weights(model, [(x, torch.zeros(6, dtype=torch.long))]).weights
    assert list(got) == list(gates)
    for site, recorded in gates.items():
        if gate is not None:  # the gate averaged over its positions (1×1 for channel gates)
            expected = recorded[gate][0].mean((2, 3))
        elif spec == "coord":  # the mean over positions of the map a_h·a_w that scales x
            expected = (recorded["a_h"][0] * recorded["a_w"][0]).mean((2, 3))
        else:  # sk: the first path's softmax weight
            expected = recorded["paths"][0][:, 0, :, 0, 0]
        np.testing.assert_allclose(got[site], expected.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("attn, message", [
    ("triplet", "no attention module of CifarResNet has channel weights: TripletAttention (its gates are C×W, H×C and "
                "H×W maps, not one weight per channel) at layer1.0.attn, layer1.1.attn, layer1.2.attn, ..."),
    ("gc", "GlobalContext (fusion ('add',) has no multiplicative channel gate"),
    (None, "CifarResNet has no attention module"),
])
def test_a_checkpoint_without_channel_gates_is_a_one_line_error(tmp_path, capsys, attn, message):
    path = _untrained_checkpoint(tmp_path / "last.pt", attn)
    assert cli.main(["stats", path, "--out", str(tmp_path / "stats")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit stats: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "stats").exists()


def test_other_user_errors_are_one_line_with_exit_code_2(se_checkpoint, tmp_path, capsys):
    assert cli.main(["stats", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err == f"attnkit stats: error: no checkpoint at {tmp_path / 'missing.pt'}\n"
    assert cli.main(["stats", se_checkpoint, "--max-samples", "1"]) == 2
    assert "max samples must be an integer of at least 2" in capsys.readouterr().err
    assert cli.main(["stats", se_checkpoint, "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "trained on 1-channel images of 10 classes, but 'synthetic' has 3 channels" in err and err.count("\n") == 1
