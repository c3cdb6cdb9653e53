"""The benchmarks time what their columns name: in benchmarks/train_step.py, timm's module where the column says
timm and attnkit's in the others, in torchvision's, timm's and attnkit's ResNets and torchvision's RegNet, and the
residual blocks ending in the gate's pass except in the column of blocks ending apart."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit import kernels, registry
from attnkit.kernels import cpu, reference
from attnkit.kernels.backend import PRIMITIVES
from attnkit.modules.base import is_attention_module

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_step():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import train_step

        yield train_step
    finally:
        sys.path.remove(str(BENCHMARKS))


def modules_run(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How many attention modules of attnkit and of timm one forward pass of `model` runs."""
    counts = {"attnkit": 0, "timm": 0}
    hooks = []
    for module in model.modules():
        source = ("attnkit" if is_attention_module(module) else
                  "timm" if type(module).__module__.startswith("timm.layers.") and type(module).__name__ in (
                      "SEModule", "EcaModule", "CbamModule", "CoordAttn") else None)
        if source is not None:
            hooks.append(module.register_forward_hook(lambda *_, source=source: counts.update({source: counts[source] + 1})))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("model", ["resnet20", "torchvision:resnet18", "timm:resnet18", "torchvision:regnet_x_400mf"])
@pytest.mark.parametrize("attn", ["se", "cbam"])
def test_each_training_step_column_runs_the_module_it_names(train_step, model, attn, monkeypatch):
    monkeypatch.setattr(registry.MODULES, "entries", dict(registry.MODULES.entries))  # timm's, registered for a test
    net = train_step.Net(model, 32, 2, 3, 10)
    x = torch.randn(2, 3, 32, 32)
    ended = []
    for name in ("scale_c_add", "scale_cs_add", "channel_gate_module"):  # the last ends a block given a residual
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, kernel=kernel, name=name: (
            ended.append(1) if name != "channel_gate_module" or a[1] is not None else None) or kernel(*a))
    blocks = {"resnet20": 9, "torchvision:resnet18": 8, "timm:resnet18": 8, "torchvision:regnet_x_400mf": 22}[model]
    for impl, runs, ends in [("auto", "attnkit", blocks), ("separate", "attnkit", 0), ("reference", "attnkit", 0),
                             ("timm", "timm", 0)]:
        built = train_step.build(train_step.Variant(f"{attn} {impl}", attn, impl), net).eval()
        del ended[:]
        with torch.no_grad(), kernels.use("reference" if impl in ("reference", "timm") else "cpu"):
            built(x)
            assert len(ended) == ends, impl
            counted = modules_run(built, x)
        assert counted == {"attnkit": 0, "timm": 0, runs: blocks}, impl


def test_the_against_column_runs_attnkit_as_of_the_revision(train_step):
    """--against REV: the module attach() placed is the class of the package extracted from git at REV, a package of
    its own beside the working tree's attnkit, and the network computes what the working tree's does (HEAD's modules
    compute the same functions)."""
    if subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("needs the project's git repository")  # --against reads the revision from git
    net = train_step.Net("resnet20", 16, 2, 3, 10)
    torch.manual_seed(0)
    theirs = train_step.build(train_step.Variant("se against", "se", "against"), net, "HEAD").eval()
    torch.manual_seed(0)
    ours = train_step.build(train_step.Variant("se auto", "se", "auto"), net).eval()
    placed = [type(m) for m in theirs.modules() if type(m).__name__ == "SqueezeExcite"]
    assert len(placed) == 9 and all(cls.__module__.startswith("attnkit_at_") for cls in placed)
    assert not any(is_attention_module(m) for m in theirs.modules())  # not the working tree's registry's classes
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))


@pytest.fixture(scope="module")
def primitives(train_step):  # train_step's fixture puts benchmarks/ on the path
    import primitives

    return primitives


@pytest.mark.parametrize("family", ["se", "coord", "cbam"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_primitives_benchmark_times_each_primitive_of_its_family(primitives, family, channels_last):
    """benchmarks/primitives.py calls backend primitives by name with inputs it builds: each is a primitive of the
    Backend protocol, and the CPU backend computes on those inputs what the reference backend does."""
    x = torch.randn(2, 5, 4, 3)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for name, call in primitives.calls(family, x).items():
        assert name.split()[0] in PRIMITIVES
        got, want = call(cpu), call(reference)
        for g, w in zip(*(out if isinstance(out, tuple) else (out,) for out in (got, want)), strict=True):
            assert (g is None) == (w is None), name
            if g is not None:
                torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5)


def test_the_modules_benchmark_against_a_revision_times_that_revisions_module(train_step):
    """benchmarks/modules.py --against REV: one more implementation per module, the module of attnkit as of REV (a
    package of its own), which computes what the working tree's module does (HEAD's modules compute the same)."""
    if subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("needs the project's git repository")  # --against reads the revision from git
    import modules

    x = torch.randn(2, 16, 6, 6)
    found = {impl.key: impl for impl in modules.impls("se", x, "cpu", False, True, "HEAD")}
    assert set(found) == {"fused", "reference", "timm", "against"}
    theirs = found["against"].module
    assert type(theirs).__module__.startswith("attnkit_at_") and found["against"].mode == "auto"
    theirs.load_state_dict(found["fused"].module.state_dict())
    torch.testing.assert_close(theirs(x), found["fused"].module(x))


def test_the_primitives_benchmark_runs_against_a_revision(primitives, monkeypatch, capsys):
    """benchmarks/primitives.py --against REV, end to end on one shape: a column of the revision's timings."""
    if subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("needs the project's git repository")  # --against reads the revision from git
    monkeypatch.setattr(sys, "argv", ["primitives.py", "--family", "se", "--shapes", "r56-s3", "--warmup", "0",
                                      "--repeats", "1", "--against", "HEAD"])
    primitives.main()
    table = capsys.readouterr().out
    commit = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert f"| at {commit} ms | now / at {commit} |" in table and "| | grad_c |" in table


def test_the_gate_convolution_benchmark_runs_against_a_revision(train_step, monkeypatch, capsys):
    """benchmarks/gate_conv.py --against REV, end to end: a row per shape, with the revision's direct kernels."""
    if subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("needs the project's git repository")  # --against reads the revision from git
    import gate_conv

    monkeypatch.setattr(sys, "argv", ["gate_conv.py", "--warmup", "0", "--repeats", "1", "--against", "HEAD"])
    gate_conv.main()
    table = capsys.readouterr().out
    commit = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert f"| direct at {commit} ms | speed-up over {commit} |" in table
    assert sum(line.startswith(f"| {n}×{p}×{h}×{w} |") for n, p, h, w in gate_conv.SHAPES for line in
               table.splitlines()) == len(gate_conv.SHAPES)
