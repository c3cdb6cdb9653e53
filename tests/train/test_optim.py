"""Weight-decay groups and the learning-rate schedule, written out."""
from __future__ import annotations

import math

import pytest
import torch

from attnkit.models import create_model
from attnkit.train import TrainConfig
from attnkit.train.optim import build_optimizer, build_schedule, lr_factor, no_decay_names


def test_no_weight_decay_for_norms_biases_and_srm():
    model = create_model("resnet20", attn="srm")
    exempt = no_decay_names(model)
    assert "layer1.0.bn1.weight" in exempt and "fc.bias" in exempt
    assert "layer1.0.attn.cfc" in exempt  # SRM's style weights: 2-D, exempt by its paper
    assert "layer1.0.conv1.weight" not in exempt and "fc.weight" not in exempt
    optimizer = build_optimizer(model, TrainConfig(weight_decay=1e-4))
    decay = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4 and optimizer.param_groups[1]["weight_decay"] == 0
    assert {names[i] for i in decay} == {n for n, _ in model.named_parameters()} - exempt
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_warmup_then_cosine():
    config = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    steps = 5
    assert [lr_factor(s, steps, config) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, steps, config) == pytest.approx(1.0)
    for s in (10, 25, 49):
        assert lr_factor(s, steps, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 10) / 40)))


def test_step_schedule_with_default_and_given_milestones():
    config = TrainConfig(epochs=8, warmup_epochs=0, schedule="step", gamma=0.1)
    assert [lr_factor(e * 10, 10, config) for e in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    config = TrainConfig(epochs=8, warmup_epochs=0, schedule="step", milestones=(2,), gamma=0.5)
    assert [lr_factor(e * 10, 10, config) for e in (1, 2, 7)] == pytest.approx([1, 0.5, 0.5])


def test_schedule_steps_the_optimizer():
    model = torch.nn.Linear(2, 2)
    config = TrainConfig(lr=0.4, epochs=2, warmup_epochs=1, schedule="constant")
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, 4, config)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
