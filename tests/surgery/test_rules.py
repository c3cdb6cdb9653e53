"""How attach() finds sites where no block layout knows the network: residual additions in the traced graph, stage
outputs; block layouts a user registers; named sites, measured channel counts and the channels= override; and the
modules' own declarations (placement, gates, channel weights, maps) for modules a user registers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import attnkit
from attnkit.analysis.gate_stats import channel_weights
from attnkit.analysis.explain import _attention
from attnkit.surgery import BlockLayout, block_layouts, of_class, register_block_layout
from attnkit.surgery import layouts

from .networks import plain_cnn
from .user_modules import user_modules  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class Unit(nn.Module):
    """A residual unit of names no layout knows: y = relu(x + norm_b(conv_b(relu(norm_a(conv_a(x)))))·scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_a, self.norm_a = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv_b, self.norm_b = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.scale = nn.Parameter(torch.full((channels, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm_b(self.conv_b(torch.relu(self.norm_a(self.conv_a(x)))))
        return torch.relu(x + branch * self.scale)  # the branch ends in a layer scale, a function, not a module


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.Sequential(Unit(8), Unit(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.unit3 = Unit(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unit3(self.down(self.units(self.stem(x)))).mean((2, 3)))


def test_unknown_residual_network_gets_a_module_before_each_traced_addition():
    report = attnkit.attach(Custom(), "se(reduction=4)")
    assert [(s.after, s.module, s.channels) for s in report] == [
        ("units.0.norm_b", "units.0.attn", 8), ("units.1.norm_b", "units.1.attn", 8), ("unit3.norm_b", "unit3.attn", 16)]
    assert {s.rule for s in report} == {"residual addition (traced)"}
    assert "residual addition (traced)" in str(report)
    stages = attnkit.attach(Custom(), "se(reduction=4)", stages=[2])
    assert [s.after for s in stages] == ["unit3.norm_b"]  # a stage ends where the resolution changes


def test_network_without_residuals_gets_a_module_at_each_stage_output():
    model = plain_cnn()  # conv-bn-relu 20×20, pool, 2× conv-bn-relu 10×10, pool, conv-bn-relu 5×5
    report = attnkit.attach(model, "eca")
    assert [(s.after, s.channels, s.rule) for s in report] == [
        ("0.2", 8, "stage output"), ("0.9", 16, "stage output"), ("0.13", 24, "stage output")]
    bam = attnkit.attach(plain_cnn(), "bam(reduction=4)")  # before every downsampling: not after the last stage
    assert [s.after for s in bam] == ["0.2", "0.9"]
    assert model(torch.randn(2, 3, 20, 20)).shape == (2, 5)


def test_a_registered_block_layout_is_used_first_and_named_in_the_report(monkeypatch):
    monkeypatch.setattr(layouts, "_LAYOUTS", list(layouts._LAYOUTS))
    layout = register_block_layout(BlockLayout("my unit", of_class(f"{Unit.__module__}.Unit"), "norm_a"))
    assert block_layouts()[0] is layout
    report = attnkit.attach(Custom(), "se(reduction=4)")
    assert [s.after for s in report] == ["units.0.norm_a", "units.1.norm_a", "unit3.norm_a"]
    assert {s.rule for s in report} == {"block layout: my unit"}
    output = attnkit.attach(Custom(), "se(reduction=4)", position="output")
    assert [s.after for s in output] == ["units.0", "units.1", "unit3"]
    with pytest.raises(TypeError, match="expected a BlockLayout"):
        register_block_layout("norm_a")


def test_sk_and_output_position_need_known_blocks():
    with pytest.raises(ValueError, match=r"replaces or follows a block's 3×3 convolution needs blocks attnkit knows.*register_block_layout"):
        attnkit.attach(Custom(), "sk(groups=4)")
    with pytest.raises(ValueError, match="position='output'.*no blocks attnkit knows"):
        attnkit.attach(plain_cnn(), "se", position="output")


# ---------------------------------------------------------------------------------------------- channels
class Concat(nn.Module):
    """Two branches concatenated, as Inception and CSP stages do: the channel count of the output is measured."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 7, 3, padding=1)
        self.mix = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([self.a(x), self.b(x)], 1))


def test_channel_counts_are_measured_where_layers_concatenate():
    model = torchvision.models.shufflenet_v2_x0_5()
    report = attnkit.attach(model, "se(reduction=4)", where=["stage2.0", "stage2.1.branch2"])
    assert [s.channels for s in report] == [48, 24]  # a block's concatenated output, and one branch: half of it
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    report = attnkit.attach(Concat(), "eca", where=["mix"])
    assert report.sites[0].channels == 12


def test_channels_override_is_taken_as_given():
    model = Concat()
    report = attnkit.attach(model, "se(reduction=4)", where=["mix"], channels=12)
    assert report.sites[0].channels == 12
    wrong = Concat()
    attnkit.attach(wrong, "se(reduction=4)", where=["mix"], channels={"mix": 8})
    with pytest.raises(ValueError, match="built for 8 channels but the input has 12"):
        wrong(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="`channels` must be a positive int or a mapping"):
        attnkit.attach(Concat(), "se", where=["mix"], channels=-3)


def test_a_shared_layer_or_one_that_never_runs_is_refused_by_name():
    model = torchvision.models.resnet18()  # each BasicBlock calls its one `relu` twice
    with pytest.raises(ValueError, match=r"'layer1.0.relu' runs 2 times in one forward pass \(a shared module\)"):
        attnkit.attach(model, "se", where=["layer1.0.relu"])
    googlenet = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    with pytest.raises(ValueError, match=r"'aux1.conv' .*never runs in an eval-mode forward pass.*channels="):
        attnkit.attach(googlenet, "se", where=["aux1.conv"])


def test_a_model_the_probe_cannot_run_says_what_to_pass():
    class NeedsTwo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + y

    with pytest.raises(ValueError, match=r"did not run on any probe input .*2×3×64×64: TypeError.*example_input="):
        attnkit.attach(NeedsTwo(), "se", where=["conv"])
    report = attnkit.attach(NeedsTwo(), "se", where=["conv"], channels=4)
    assert report.sites[0].channels == 4
    with pytest.raises(TypeError, match="`example_input` must be a tensor"):
        attnkit.attach(NeedsTwo(), "se", where=["conv"], example_input=[1, 2])


def test_the_probe_leaves_the_random_state_and_the_modes_as_they_were():
    model = torchvision.models.resnet18()
    model.layer1.eval()  # a partly frozen model
    torch.manual_seed(3)
    report = attnkit.attach(model, "se")
    drawn = torch.rand(3)
    torch.manual_seed(3)  # the modules' own initialisation draws, and nothing else
    for site in report:
        attnkit.create("se", site.channels)
    assert torch.equal(drawn, torch.rand(3))
    assert model.training and not model.layer1.training and model.layer2.training
    assert not model.layer1[0].attn.training and model.layer2[0].attn.training  # each gate takes its layer's mode


# ---------------------------------------------------------------------------------------------- user modules
@pytest.mark.usefixtures("user_modules")
def test_a_registered_user_module_works_with_attach_capture_stats_and_explain():
    torch.manual_seed(0)
    model = attnkit.create_model("resnet20", attn="user_channel", num_classes=10).eval()
    attnkit.attach(model, "user_spatial", where=["layer3.2.bn2"], allow_multiple=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), attnkit.capture(model) as gates:
        model(x)
    assert "layer1.0.attn" in gates and list(gates["layer1.0.attn"]) == ["gate"]
    assert gates["layer1.0.attn"]["gate"][0].shape == (4, 16, 1, 1)
    assert gates["layer3.2.attn1"]["gate"][0].shape == (4, 1, 8, 8)
    weights = channel_weights(model, [(x, torch.arange(4))]).weights
    np.testing.assert_allclose(weights["layer1.0.attn"], gates["layer1.0.attn"]["gate"][0][:, :, 0, 0].numpy(), rtol=1e-6)
    _, maps, notes = _attention(model, x)
    assert [m.site for m in maps] == ["layer3.2.attn1"] and maps[0].maps.shape == (4, 32, 32)
    assert any("ChannelGate" in note for note in notes)


def test_modules_declare_their_placement_position_and_stages(monkeypatch):
    from attnkit import registry

    from .user_modules import ChannelGate

    class BetweenBlocks(ChannelGate):  # as non-local blocks: after whole blocks, in the third and fourth stages
        default_position, default_stages = "output", (3, 4)

    class AfterConv(ChannelGate):  # after each block's 3×3 convolution and its BN
        placement = "after_conv"

    monkeypatch.setitem(registry.MODULES.entries, "between_blocks", BetweenBlocks)
    monkeypatch.setitem(registry.MODULES.entries, "after_conv", AfterConv)
    report = attnkit.attach(torchvision.models.resnet50(), "between_blocks")
    assert [s.after for s in report] == [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    report = attnkit.attach(torchvision.models.resnet50(), "between_blocks", position="residual", stages=[4])
    assert [s.after for s in report] == [f"layer4.{i}.bn3" for i in range(3)]  # the caller's choice wins
    assert [s.after for s in attnkit.attach(torchvision.models.resnet50(), "after_conv")][:2] == ["layer1.0.bn2", "layer1.1.bn2"]
    assert [s.after for s in attnkit.attach(torchvision.models.resnet18(), "after_conv")][:1] == ["layer1.0.bn1"]
    with pytest.raises(ValueError, match="replaces or follows a block's 3×3 convolution needs blocks attnkit knows"):
        attnkit.attach(Custom(), "after_conv")


def test_a_module_declared_before_norm_follows_the_last_spatial_convolution(monkeypatch):
    from attnkit import registry

    from .user_modules import ChannelGate

    class BeforeNorm(ChannelGate):  # as SimAM: on the 3×3 convolution's output, before its BN
        placement = "before_norm"

    monkeypatch.setitem(registry.MODULES.entries, "before_norm", BeforeNorm)
    report = attnkit.attach(torchvision.models.resnet50(), "before_norm")
    assert [s.after for s in report][:2] == ["layer1.0.conv2", "layer1.1.conv2"] and len(report) == 16
    assert [s.channels for s in report][::5] == [64, 128, 256, 512]  # the bottleneck's width, not its output's
    assert [s.after for s in attnkit.attach(torchvision.models.resnet18(), "before_norm")][:1] == ["layer1.0.conv2"]
    mobilenet = [s.after for s in attnkit.attach(torchvision.models.mobilenet_v2(), "before_norm")]
    assert mobilenet[:2] == ["features.1.conv.0.0", "features.2.conv.1.0"] and len(mobilenet) == 17  # the depthwise
    block = torchvision.models.resnet18().eval().layer1[0]
    attnkit.attach(block, "before_norm", example_input=torch.randn(2, 64, 8, 8))
    v = torch.randn(2, 64, 8, 8)
    (gate,) = attnkit.surgery.gates_of(block.conv2)  # the convolution's output is gated, before bn2 normalises it
    assert torch.equal(block.conv2(v), gate(torch.nn.functional.conv2d(v, block.conv2.weight, padding=1)))
    assert not attnkit.surgery.gates_of(block.bn2)
    with pytest.raises(ValueError, match="replaces or follows a block's 3×3 convolution needs blocks attnkit knows"):
        attnkit.attach(Custom(), "before_norm")


def test_every_other_block_counts_back_from_each_stages_last(monkeypatch):
    from attnkit import registry

    from .user_modules import ChannelGate

    class EveryOther(ChannelGate):  # as non-local blocks: after every other block of stages 2 and 3
        default_position, default_stages, default_every = "output", (2, 3), 2

    monkeypatch.setitem(registry.MODULES.entries, "every_other", EveryOther)
    report = attnkit.attach(torchvision.models.resnet50(), "every_other")
    assert [s.after for s in report] == ["layer2.1", "layer2.3", "layer3.1", "layer3.3", "layer3.5"]
    report = attnkit.attach(torchvision.models.resnet50(), "every_other", every=1)
    assert len(report) == 10
    report = attnkit.attach(torchvision.models.resnet50(), "every_other", stages=[1, 4], every=2)
    assert [s.after for s in report] == ["layer1.0", "layer1.2", "layer4.0", "layer4.2"]  # the last of each stage kept
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="`every` must be a positive integer"):
            attnkit.attach(torchvision.models.resnet18(), "every_other", every=bad)
    assert attnkit.surgery.parse_placement("position=output;every=2") == {"where": "auto", "position": "output", "every": 2}
    with pytest.raises(ValueError, match="every takes a positive integer"):
        attnkit.surgery.parse_placement("every=two")
