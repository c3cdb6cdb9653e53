"""The registry: names, spec strings, user registration, and the errors a user can cause."""
from __future__ import annotations

import attnkit
import pytest
import torch
from attnkit import registry
from torch import nn

PAPER_MODULES = {"bam", "cbam", "coord", "eca", "gc", "ge", "se", "sk", "srm", "triplet"}


def test_list_modules_has_every_paper_module_sorted():
    names = attnkit.list_modules()
    assert PAPER_MODULES <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("se", ("se", {})),
        (" cbam(reduction=8, kernel_size=3) ", ("cbam", {"reduction": 8, "kernel_size": 3})),
        ("ge(variant='theta', extent=4)", ("ge", {"variant": "theta", "extent": 4})),
        ("cbam(pool_types=('avg', 'lse'), no_spatial=True)", ("cbam", {"pool_types": ("avg", "lse"), "no_spatial": True})),
        ("se(hidden_channels=None)", ("se", {"hidden_channels": None})),
    ],
)
def test_parse_spec(spec, expected):
    assert registry.parse_spec(spec) == expected


def test_create_passes_spec_and_keyword_arguments():
    module = attnkit.create("cbam(reduction=8, kernel_size=3)", 64, bias=False)
    assert isinstance(module, attnkit.CBAM)
    assert module.channel_gate.fc1.out_channels == 8 and module.channel_gate.fc1.bias is None
    assert module.spatial_gate.conv.kernel_size == (3, 3)
    assert attnkit.create("eca", 256).kernel_size == 5


def test_unknown_name_lists_valid_names_and_closest_match():
    with pytest.raises(ValueError, match=r"Unknown attention module 'cbma'.*bam, cbam, coord.*Did you mean 'cbam'\?"):
        attnkit.create("cbma", 64)


def test_unknown_argument_lists_valid_arguments_and_closest_match():
    with pytest.raises(ValueError, match=r"'se' has no argument 'reductoin'\. Valid arguments: reduction, .*Did you mean 'reduction'\?"):
        attnkit.create("se(reductoin=8)", 64)
    with pytest.raises(ValueError, match="'cbam' has no argument 'kernel'.*Did you mean 'kernel_size'"):
        attnkit.create("cbam", 64, kernel=3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("se(8)", "positional arguments; use keywords"),
        ("se(act=silu)", r"must be a Python literal.*act='silu'"),
        ("se(**kw)", r"'\*\*' is not allowed"),
        ("se(", "Cannot parse attention spec"),
        ("se.x", "expected a name or name"),
        ("1 + 2", "expected a name or name"),
    ],
)
def test_malformed_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        attnkit.create(spec, 64)


def test_argument_given_twice_is_an_error():
    with pytest.raises(ValueError, match="reduction given both in the spec and as keywords"):
        attnkit.create("se(reduction=8)", 64, reduction=4)


def test_spec_must_be_a_string():
    with pytest.raises(TypeError, match="must be a string"):
        attnkit.create(attnkit.SqueezeExcite, 64)


def test_bad_option_values_name_the_argument():
    with pytest.raises(ValueError, match="`gate` must be one of \\['hard_sigmoid', 'sigmoid'\\], got 'sigmoidd'.*Did you mean 'sigmoid'"):
        attnkit.create("se(gate='sigmoidd')", 64)
    with pytest.raises(ValueError, match="`reduction` is the divisor r of C/r and must be >= 1, got 0"):
        attnkit.create("se(reduction=0)", 64)
    with pytest.raises(TypeError, match="`channels` must be an integer >= 1, got 64.0"):
        attnkit.create("se", 64.0)
    with pytest.raises(ValueError, match="`channels` must be an integer >= 1, got 0"):
        attnkit.create("eca", 0)


def test_user_registration_by_decorator():
    @attnkit.register("test_scale_gate")
    class ScaleGate(nn.Module):
        def __init__(self, channels: int, scale: float = 2.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return x * self.scale

    try:
        assert "test_scale_gate" in attnkit.list_modules()
        module = attnkit.create("test_scale_gate(scale=3.0)", 8)
        assert torch.equal(module(torch.ones(1, 8, 2, 2)), torch.full((1, 8, 2, 2), 3.0))
        with pytest.raises(ValueError, match="already registered"):
            attnkit.register("test_scale_gate")(nn.Identity)
        with pytest.raises(ValueError, match="'test_scale_gate' has no argument 'factor'.*Valid arguments: scale"):
            attnkit.create("test_scale_gate(factor=2)", 8)
    finally:
        registry.MODULES.entries.pop("test_scale_gate", None)


def test_register_rejects_bad_names():
    with pytest.raises(ValueError, match="must be a Python identifier"):
        attnkit.register("my gate")


def test_one_registry_class_serves_modules_models_and_data_sets():
    from attnkit.data import DATASETS
    from attnkit.models import MODELS
    from attnkit.registry import MODULES, Registry

    assert MODULES.names() == attnkit.list_modules() and MODELS.names() == attnkit.list_models()
    assert "cluttered-digits" in DATASETS and "resnet20" in MODELS and "se" in MODULES
    things = Registry("thing")
    make = things.register("square")(lambda side=2: side * side)
    assert things.get("square") is make and things.names() == ["square"]
    with pytest.raises(ValueError, match="'square' is already registered .* pass override=True"):
        things.register("square")(lambda: 0)
    with pytest.raises(ValueError, match=r"Unknown thing 'sqare'. Available: square. Did you mean 'square'\?"):
        things.get("sqare")
    assert things.parse("square(side=3)")[::2] == ("square", {"side": 3})
    with pytest.raises(ValueError, match="Cannot parse thing spec"):
        things.parse("square(")


@pytest.mark.parametrize(("name", "cls"), [("simam", "SimAM"), ("ema", "EMA"), ("gam", "GAM"),
                                           ("shuffle", "ShuffleAttention"), ("nam", "NAM"), ("nonlocal", "NonLocal")])
def test_simam_ema_gam_shuffle_nam_nonlocal_are_registered(name, cls):
    assert name in attnkit.list_modules() and attnkit.get_module_class(name) is getattr(attnkit, cls)
    assert cls in attnkit.__all__ and isinstance(attnkit.create(f"{name}", 256), getattr(attnkit, cls))
