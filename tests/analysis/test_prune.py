"""attnkit.analysis.prune and `attnkit prune`: on a ResNet-20 with SE trained for one epoch, fraction 0 is exactly the
unpruned accuracy, a fraction f zeroes round(f·C) channels at every site (seen by a hook), the L1 and gate rankings
equal ones computed by hand, the three rankings differ, and user errors are one line with exit code 2."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

import attnkit
from attnkit import cli
from attnkit.runs import load_run
from attnkit.analysis.prune import DPI, PLOT_INCHES, mask_channels, prune
from attnkit.data import load_dataset
from attnkit.data.loader import TensorLoader
from attnkit.train import TrainConfig, build_model
from attnkit.train.checkpoint import save_checkpoint
from attnkit.runs import model_arch

from .test_gate_stats import trained_checkpoint

SITES = [f"layer{i}.{j}.attn" for i in (1, 2, 3) for j in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory, "se")


@pytest.fixture(scope="module")
def run(checkpoint):
    return load_run(checkpoint)


@pytest.fixture(scope="module")
def result(run):
    return prune(run.model, run.data, (0.0, 0.5), random_draws=1)


def _accuracy(model, data) -> float:
    """Test accuracy computed here, not by the library: batches of 100, counted by hand."""
    correct = total = 0
    with torch.no_grad():
        for x, y in data.loader(False, 100):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def test_fraction_zero_is_exactly_the_unpruned_accuracy(run, result):
    unpruned = _accuracy(run.model, run.data)
    assert result.unpruned == unpruned
    for ranking in ("gate", "l1", "random"):
        assert result.accuracy[ranking][0, 0] == unpruned
        assert result.accuracy[ranking][0, 1] < unpruned  # half of every site's channels zeroed costs accuracy


def test_a_fraction_zeroes_round_f_c_channels_at_every_site(run):
    zeroed: dict[str, list[tuple[int, ...]]] = {site: [] for site in SITES}

    def watch(site):
        def hook(module, inputs, out):
            zeroed[site].append(tuple(torch.nonzero((out == 0).flatten(2).all(2).all(0)).flatten().tolist()))
        return hook

    handles = [run.model.get_submodule(site).register_forward_hook(watch(site)) for site in SITES]
    try:
        got = prune(run.model, run.data, [0.3], rankings=("gate",))
    finally:
        for handle in handles:
            handle.remove()
    masked = got.masked("gate", 0.3)
    test_batches = len(run.data.loader(False, 256))
    for s in got.sites:
        assert len(masked[s.output]) == round(0.3 * s.channels) == {16: 5, 32: 10, 64: 19}[s.channels]
        # the probe pass, the training split and the unpruned test pass see no zeroed channel; then the masked pass
        assert set(zeroed[s.output][:-test_batches]) == {()}
        assert set(zeroed[s.output][-test_batches:]) == {tuple(sorted(masked[s.output].tolist()))}
    with mask_channels(run.model, masked):
        assert got.accuracy["gate"][0, 0] == _accuracy(run.model, run.data)


def test_l1_ranking_is_the_filter_norm_of_the_conv_before_each_gate(run, result):
    assert [s.gate for s in result.sites] == SITES == [s.output for s in result.sites]
    for s in result.sites:
        conv = s.gate.replace(".attn", ".conv2")  # the gate follows bn2, which follows conv2
        assert s.convs == (conv,)
        norms = run.model.get_submodule(conv).weight.detach().abs().sum((1, 2, 3))
        np.testing.assert_array_equal(result.orders["l1"][0][s.gate], np.argsort(norms.numpy(), kind="stable"))


def test_gate_ranking_is_the_mean_gate_over_the_training_split(run, result):
    data = run.data
    with torch.no_grad(), attnkit.capture(run.model) as gates:
        for x, _ in TensorLoader(*data.train, batch_size=500, train=False, mean=data.mean, std=data.std):
            run.model(x)
    for site in SITES:
        mean = torch.cat(gates[site]["channel"]).flatten(1).double().mean(0)
        np.testing.assert_array_equal(result.orders["gate"][0][site], np.argsort(mean.numpy(), kind="stable"))


def test_the_rankings_differ_and_random_follows_its_seed(run, result):
    orders = {ranking: draws[0] for ranking, draws in result.orders.items()}
    for a, b in [("gate", "l1"), ("gate", "random"), ("l1", "random")]:
        assert all(not np.array_equal(orders[a][s], orders[b][s]) for s in SITES), (a, b)
    again = prune(run.model, run.data, [0.0], rankings=("random",), random_draws=2)
    assert all(np.array_equal(again.orders["random"][0][s], orders["random"][s]) for s in SITES)
    assert not all(np.array_equal(again.orders["random"][1][s], orders["random"][s]) for s in SITES)
    other = prune(run.model, run.data, [0.0], rankings=("random",), seed=1, random_draws=1)
    assert not any(np.array_equal(other.orders["random"][0][s], orders["random"][s]) for s in SITES)


def test_identity_start_masks_the_wrapper_and_sk_ranks_by_its_paths():
    data = load_dataset("digits", image_size=16)
    torch.manual_seed(0)
    wrapped = attnkit.create_model("resnet20", attn="se", num_classes=10, in_chans=1, input_size=16, identity_init=True)
    sites = prune(wrapped.eval(), data, [0.0], rankings=("l1",)).sites
    assert (sites[0].gate, sites[0].output, sites[0].convs) == ("layer1.0.attn.module", "layer1.0.attn", ("layer1.0.conv2",))
    sk = attnkit.create_model("resnet20", attn="sk(groups=1)", num_classes=10, in_chans=1, input_size=16).eval()
    got = prune(sk, data, [0.0], rankings=("l1",))
    first = got.sites[0]
    assert (first.gate, first.convs) == ("layer1.0.conv1", ("layer1.0.conv1.paths.0.0", "layer1.0.conv1.paths.1.0"))
    norms = sum(sk.get_submodule(n).weight.detach().abs().sum((1, 2, 3)).double() for n in first.convs)
    np.testing.assert_array_equal(got.orders["l1"][0][first.gate], np.argsort(norms.numpy(), kind="stable"))


def test_shuffle_attention_ranks_each_output_channel_by_the_filter_it_carries():
    """Shuffle Attention's output channel 2k + j is its input's channel j·C/2 + k: the L1 ranking follows the channels."""
    data = load_dataset("digits", image_size=16)
    torch.manual_seed(0)
    net = attnkit.create_model("resnet20", attn="shuffle(groups=2)", num_classes=10, in_chans=1, input_size=16).eval()
    got = prune(net, data, [0.0], rankings=("l1",))
    first = got.sites[0]
    assert (first.gate, first.convs) == ("layer1.0.attn", ("layer1.0.conv2",))
    norms = net.get_submodule("layer1.0.conv2").weight.detach().abs().sum((1, 2, 3)).double()
    carried = norms[[j * 8 + k for k in range(8) for j in range(2)]]  # C = 16
    np.testing.assert_array_equal(got.orders["l1"][0][first.gate], np.argsort(carried.numpy(), kind="stable"))


def test_cli_writes_the_csv_and_the_plot(checkpoint, tmp_path, capsys):
    assert cli.main(["prune", checkpoint, "--fractions", "0,0.5", "--max-samples", "200", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "random (mean ± std of 3)" in printed and f"CSV and plot in {tmp_path}: prune.csv, prune.png" in printed
    with open(tmp_path / "prune.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["ranking"], r["fraction"], r["channels_masked"]) for r in rows] == [
        (ranking, f, masked) for ranking in ("gate", "l1", "random") for f, masked in (("0", "0"), ("0.5", "168"))]
    assert len({r["accuracy"] for r in rows if r["fraction"] == "0"}) == 1
    with Image.open(tmp_path / "prune.png") as image:
        assert image.size == (round(PLOT_INCHES[0] * DPI), round(PLOT_INCHES[1] * DPI))
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.std() > 10 and len(np.unique(pixels @ [65536, 256, 1])) > 50


def test_user_errors_are_one_line_with_exit_code_2(checkpoint, run, tmp_path, capsys):
    for fractions in ("0,1", "-0.1", "0,x", "nan"):
        assert cli.main(["prune", checkpoint, "--fractions", fractions, "--out", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err
        assert err == ("attnkit prune: error: --fractions takes comma-separated numbers in [0, 1) such as 0,0.1,0.5, "
                       f"got {fractions!r}.\n")
    assert not (tmp_path / "p").exists()
    assert cli.main(["prune", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err == f"attnkit prune: error: no checkpoint at {tmp_path / 'missing.pt'}\n"
    config = TrainConfig(model="resnet20", attn="triplet", dataset="digits", image_size=16)
    arch = model_arch(config, run.data)
    save_checkpoint(tmp_path / "triplet.pt",
                    {"config": config.to_dict(), "arch": arch, "model": build_model(arch)[0].state_dict()})
    assert cli.main(["prune", str(tmp_path / "triplet.pt")]) == 2
    err = capsys.readouterr().err
    assert "no attention module of CifarResNet has channel weights: TripletAttention" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match=r"prune: fractions must be numbers in \[0, 1\)"):
        prune(run.model, run.data, [0.5, 1.0])
    with pytest.raises(ValueError, match="rankings are some of gate, l1, random, got \\['gates'\\]. Did you mean 'gate'"):
        prune(run.model, run.data, rankings=("gates",))
