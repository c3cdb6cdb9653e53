"""train(): accuracy on the embedded digits, bit-identical repeats, exact resume, checkpoints, fine-tuning."""
from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch

from attnkit.data import load_dataset
from attnkit.models import create_model
from attnkit.train import TrainConfig, build_model, load_checkpoint, model_from_checkpoint, seed_everything, train
from attnkit.train import trainer as trainer_module


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_short_run_on_digits_reaches_the_stated_accuracy(tmp_path):
    config = TrainConfig(model="resnet20", attn="se", epochs=4, progress=False, tensorboard=True, threads=2,
                         run_dir=str(tmp_path / "se"))
    result = train(config)
    assert result.test_acc >= 0.95, result.history
    run = tmp_path / "se"
    assert {"last.pt", "best.pt", "metrics.csv", "result.json"} <= {p.name for p in run.iterdir()}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["test_acc"]) == result.test_acc
    saved = json.loads((run / "result.json").read_text())
    assert saved["test_acc"] == result.test_acc and saved["config"]["attn"] == "se"
    # the checkpoint rebuilds the trained network: same accuracy on the test split
    model = model_from_checkpoint(run / "last.pt")
    data = load_dataset("digits")
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data.loader(False, 128))
    assert correct / len(data.test[1]) == pytest.approx(result.test_acc)


def test_same_seed_gives_bit_identical_weights_on_cpu(tiny, tmp_path):
    train(tiny(attn="cbam", run_dir=str(tmp_path / "a")))
    train(tiny(attn="cbam", run_dir=str(tmp_path / "b")))
    train(tiny(attn="cbam", seed=1, run_dir=str(tmp_path / "c")))
    a, b, c = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in "abc")
    assert states_equal(a, b)
    assert not states_equal(a, c)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    options = dict(attn="se", epochs=3, label_smoothing=0.1, schedule="cosine", warmup_epochs=1)
    whole = train(tiny(**options, run_dir=str(tmp_path / "whole")))

    evaluate = trainer_module._Run.evaluate
    calls = {"n": 0}

    def crash_in_third_epoch(self, training):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return evaluate(self, training)

    monkeypatch.setattr(trainer_module._Run, "evaluate", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(**options, run_dir=str(tmp_path / "cut")))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    monkeypatch.setattr(trainer_module._Run, "evaluate", evaluate)

    with pytest.raises(FileExistsError, match="already holds a run \\(epoch 2 of 3\\).*--resume"):
        train(tiny(**options, run_dir=str(tmp_path / "cut")))
    with pytest.raises(ValueError, match="lr: checkpoint 0.05, now 0.1"):
        train(tiny(**{**options, "lr": 0.1}, run_dir=str(tmp_path / "cut"), resume=True))
    resumed = train(tiny(**options, run_dir=str(tmp_path / "cut"), resume=True))
    assert states_equal(load_checkpoint(tmp_path / "whole" / "last.pt")["model"],
                        load_checkpoint(tmp_path / "cut" / "last.pt")["model"])
    untimed = lambda history: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in history]  # noqa: E731
    assert untimed(resumed.history) == untimed(whole.history)
    assert resumed.test_acc == whole.test_acc
    rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_fresh_data_resumes_to_the_weights_of_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """Data made anew every epoch is a function of the epoch: a resumed run trains on what it would have."""
    options = dict(dataset="cluttered-digits(samples=128, test_samples=64, fresh=True)", epochs=2, batch_size=32)
    train(tiny(**options, run_dir=str(tmp_path / "whole")))
    evaluate = trainer_module._Run.evaluate
    calls = {"n": 0}

    def crash_in_second_epoch(self, training):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(self, training)

    monkeypatch.setattr(trainer_module._Run, "evaluate", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(**options, run_dir=str(tmp_path / "cut")))
    monkeypatch.setattr(trainer_module._Run, "evaluate", evaluate)
    train(tiny(**options, run_dir=str(tmp_path / "cut"), resume=True))
    assert states_equal(load_checkpoint(tmp_path / "whole" / "last.pt")["model"],
                        load_checkpoint(tmp_path / "cut" / "last.pt")["model"])


def test_resuming_in_another_environment_warns_that_it_is_not_bit_for_bit(tiny, tmp_path):
    first = train(tiny(epochs=1))
    assert first.environment["threads"] == 1 and first.environment["cpu_kernels"]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["environment"] == first.environment
    with pytest.warns(RuntimeWarning, match="another environment \\(threads 1 there, 2 here\\).*not bit for bit"):
        train(tiny(epochs=1, threads=2, resume=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tiny(epochs=1, resume=True))  # the same environment: no warning


def test_variants_of_a_seed_share_the_backbone_initialisation():
    arch = dict(model="resnet20", where="auto", identity_init=False, num_classes=10, in_chans=1, input_size=16)
    seed_everything(5)
    plain, _ = build_model({**arch, "attn": None})
    seed_everything(5)
    cbam, _ = build_model({**arch, "attn": "cbam"})
    shared = plain.state_dict()
    with_cbam = cbam.state_dict()
    assert all(torch.equal(shared[k], with_cbam[k]) for k in shared)
    assert len(with_cbam) > len(shared)


def test_freeze_backbone_with_pretrained_weights_trains_only_attention_and_classifier(tiny, tmp_path, capsys):
    torch.manual_seed(0)
    pretrained = create_model("lenet", num_classes=10, in_chans=1, input_size=28).state_dict()
    torch.save(pretrained, tmp_path / "lenet.pth")
    train(tiny(attn="se", pretrained=str(tmp_path / "lenet.pth"), identity_init=True, freeze="backbone",
               progress=True))
    out = capsys.readouterr().out
    assert "loaded 10 tensors" in out and "missing from the checkpoint (10, left as initialised): attn.alpha" in out
    assert "trainable:" in out and "2 attention sites and the classifier fc3" in out
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for name in ("conv1.weight", "conv2.bias", "fc1.weight", "fc2.bias"):
        assert torch.equal(trained[name], pretrained[name]), name
    assert not torch.equal(trained["fc3.weight"], pretrained["fc3.weight"])
    attention = [k for k in trained if ".attn." in k or k.startswith("attn")]
    assert attention and any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in attention)


def test_frozen_batchnorm_keeps_its_statistics(tiny, tmp_path):
    torch.manual_seed(0)
    backbone = create_model("resnet20", num_classes=10, in_chans=1)
    torch.save(backbone.state_dict(), tmp_path / "r20.pth")
    train(tiny(model="resnet20", image_size=16, epochs=1, attn="eca", pretrained=str(tmp_path / "r20.pth"),
               freeze="backbone"))
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert torch.equal(trained["layer2.1.bn1.running_mean"], backbone.state_dict()["layer2.1.bn1.running_mean"])
    assert torch.equal(trained["layer2.1.bn1.weight"], backbone.state_dict()["layer2.1.bn1.weight"])


@pytest.mark.parametrize(
    "options",
    [
        dict(amp="bf16", channels_last=True),
        dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="step", milestones=(1,), clip_grad=1.0),
        dict(dataset="synthetic(samples=64, test_samples=16, channels=3)", image_size=28, batch_size=16),
    ],
    ids=["bf16-channels-last", "adamw-step-clip", "synthetic"],
)
def test_training_options_run_and_reduce_the_loss(tiny, options):
    result = train(tiny(attn="srm", **options))
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] < losses[0]


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(tiny, tmp_path):
    eager = train(tiny(attn="se", epochs=1, run_dir=str(tmp_path / "eager")))
    compiled = train(tiny(attn="se", epochs=1, compile=True, run_dir=str(tmp_path / "compiled")))
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-3)


def test_bad_options_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw, got 'adam'.*Did you mean 'adamw'"):
        tiny(optimizer="adam")
    with pytest.raises(ValueError, match="--freeze backbone.*give --attn"):
        tiny(freeze="backbone")
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        tiny(epochs=0)
    with pytest.raises(ValueError, match="clip_grad must be positive"):
        tiny(clip_grad=0.0)
