"""attach(init=...) and create_model(init=...): the paper's network-level initialisation by default, PyTorch's on
request, the inner module of an identity start initialised, and the option carried by training runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit
from attnkit import registry
from attnkit.train import TrainConfig
from attnkit.runs import build_model


def spatial_bn_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.spatial_gate.bn.weight for m in model.modules() if isinstance(m, attnkit.CBAM)])


def test_create_model_initialises_as_the_paper_unless_told_pytorch():
    paper = attnkit.create_model("resnet20", attn="cbam")
    pytorch = attnkit.create_model("resnet20", attn="cbam", init="pytorch")
    assert torch.all(spatial_bn_weights(paper) == 0) and torch.all(spatial_bn_weights(pytorch) == 1)


def test_attach_initialises_each_inserted_module_once(monkeypatch):
    called = []
    original = attnkit.CoordAttention.init_in_network
    monkeypatch.setattr(attnkit.CoordAttention, "init_in_network", lambda self: called.append(self) or original(self))
    model = attnkit.create_model("resnet20")
    report = attnkit.attach(model, "coord")
    assert [id(m) for m in called] == [id(model.get_submodule(site.module)) for site in report]
    called.clear()
    attnkit.attach(attnkit.create_model("resnet20"), "coord", init="pytorch")
    assert called == []


def test_identity_start_initialises_the_wrapped_module_and_keeps_the_identity():
    model = attnkit.create_model("resnet20")
    x = torch.randn(2, 3, 20, 20)
    before = model.eval()(x)
    report = attnkit.attach(model, "cbam", identity_init=True)
    wrapped = model.get_submodule(report.sites[0].module)
    assert isinstance(wrapped, attnkit.IdentityStart) and torch.all(wrapped.module.spatial_gate.bn.weight == 0)
    assert torch.equal(model(x), before)


def test_selective_kernel_gets_the_caffe_batchnorm_momentum_through_attach():
    model = attnkit.create_model("resnet18", attn="sk", num_classes=10)
    momenta = {m.momentum for m in model.modules() if isinstance(m, attnkit.SelectiveKernel)
               for m in m.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.05}
    plain = attnkit.create_model("resnet18", attn="sk", num_classes=10, init="pytorch")
    assert {m.momentum for m in plain.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


def test_a_users_module_may_declare_its_own_network_initialisation(monkeypatch):
    class Halved(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(channels, 1, 1))

        def init_in_network(self) -> None:
            self.scale.fill_(0.5)

        def forward(self, x):
            return x * self.scale

    monkeypatch.setitem(registry.MODULES.entries, "halved_gate_for_init_test", Halved)
    model = attnkit.create_model("resnet20", attn="halved_gate_for_init_test")
    scales = [m.scale for m in model.modules() if isinstance(m, Halved)]
    assert scales and all(torch.all(s == 0.5) for s in scales)
    attnkit.attach(attnkit.create_model("resnet20"), "halved_gate_for_init_test", init="pytorch")  # no call: no error


@pytest.mark.parametrize("call", [
    lambda: attnkit.attach(attnkit.create_model("resnet20"), "se", init="kaiming"),
    lambda: attnkit.create_model("resnet20", attn="se", init="Paper"),
    lambda: TrainConfig(attn="se", init="kaiming"),
])
def test_an_unknown_init_is_refused_naming_the_choices(call):
    with pytest.raises(ValueError, match="paper.*pytorch"):
        call()


def test_training_runs_record_the_option_and_older_records_mean_pytorch():
    arch = {"model": "resnet20", "attn": "cbam", "where": "auto", "identity_init": False, "num_classes": 10,
            "in_chans": 1, "input_size": 16}
    assert torch.all(spatial_bn_weights(build_model({**arch, "init": "paper"})[0]) == 0)
    assert torch.all(spatial_bn_weights(build_model(arch)[0]) == 1)  # a checkpoint from before the option
    stored = TrainConfig(attn="cbam").to_dict()
    assert TrainConfig.from_dict(stored).init == "paper"
    del stored["init"]
    assert TrainConfig.from_dict(stored).init == "pytorch"
    assert TrainConfig().init == "paper"
