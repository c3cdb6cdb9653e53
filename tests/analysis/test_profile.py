"""attnkit.profile and `attnkit profile`: parameters, FLOPs and activation memory of a tiny network worked out by
hand; ResNet-50 and SE-ResNet-50 against the published parameter counts and torchvision's FLOPs; activation
memory that grows with attention and linearly with the batch; the table and its one-line errors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import attnkit
from attnkit import cli, kernels
from attnkit.kernels import cpu
from attnkit.analysis.profile import ProfileRow, activation_bytes, format_profile


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """conv 3×3 (3 → 16, no bias), BN, ReLU, global average, linear 16 → 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


SIDE = 8  # 8×8 inputs
TINY_PARAMS = 16 * 3 * 3 * 3 + 2 * 16 + (16 * 10 + 10)  # conv weight, BN γ and β, linear: 634
SE_PARAMS = (16 * 4 + 4) + (4 * 16 + 16)  # SE with r = 4: two 1×1 convolutions 16 → 4 → 16 with biases: 148
TINY_MACS = 16 * SIDE * SIDE * (3 * 3 * 3) + 16 * 10  # each output value of the conv takes 27 multiply-adds: 27,808
SE_MACS = 16 * 4 + 4 * 16  # the two FCs on the 1×1 pooled map: 128


def tiny_activation_bytes(batch: int) -> int:
    """float32 bytes autograd saves in Tiny's training forward pass: the conv's input, BN's input, ReLU's output,
    the linear layer's input, and BN's per-channel batch mean and inverse std (independent of the batch)."""
    per_image = 3 * SIDE * SIDE + 16 * SIDE * SIDE + 16 * SIDE * SIDE + 16
    return 4 * (batch * per_image + 2 * 16)


def se_activation_bytes(batch: int) -> int:
    """What SE (r = 4) after the BN adds, on the CPU's whole-module kernel: the gated map (16×8×8) and the kernel's
    record of the gate network per image: the pooled means (16), the hidden units before and after the ReLU (4 + 4),
    the gate before and after the sigmoid and rounded to the map's dtype (3 × 16). Without the kernels (no C
    compiler), the formulas': fc1's input (16), ReLU's output (4, also fc2's input), the sigmoid's output (16, also
    the product's) and the gated map."""
    if cpu.unavailable() is not None:
        return 4 * batch * (16 + 4 + 16 + 16 * SIDE * SIDE)
    return 4 * batch * (16 * SIDE * SIDE + 16 + 4 + 4 + 3 * 16)


def profile_tiny(batch: int = 4) -> list[ProfileRow]:
    return attnkit.profile(Tiny(), ["se(reduction=4)"], input_size=SIDE, batch_size=batch, where=["bn"], warmup=0, repeats=1)


def test_tiny_network_counts_by_hand():
    net = Tiny()
    plain, se = attnkit.profile(net, "se(reduction=4)", input_size=SIDE, batch_size=4, where=["bn"], warmup=0, repeats=2)
    assert [plain.variant, se.variant] == ["plain", "se(reduction=4)"]
    assert plain.input_shape == se.input_shape == (4, 3, SIDE, SIDE)
    assert (plain.params, se.params, se.params_added) == (TINY_PARAMS, TINY_PARAMS + SE_PARAMS, SE_PARAMS)
    assert (plain.flops, se.flops) == (TINY_MACS, TINY_MACS + SE_MACS)  # per image, whatever the batch
    assert se.flops_overhead == pytest.approx(SE_MACS / TINY_MACS)
    assert (plain.activation_bytes, se.activation_bytes) == (tiny_activation_bytes(4), tiny_activation_bytes(4) + se_activation_bytes(4))
    assert plain.params_added == 0 and plain.flops_overhead == plain.cpu_latency_overhead == 0
    for row in (plain, se):
        assert row.cpu_ms > 0 and row.cpu_images_per_s == pytest.approx(4e3 / row.cpu_ms) and row.timed_runs == 2
        assert row.cuda_ms is None or torch.cuda.is_available()
    assert se.cpu_latency_overhead == pytest.approx(se.cpu_ms / plain.cpu_ms - 1)
    assert dataclasses.asdict(se)["params_added"] == SE_PARAMS
    assert not hasattr(net, "attn") and sum(p.numel() for p in net.parameters()) == TINY_PARAMS  # the model is copied


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_activation_memory_is_linear_in_the_batch(batch):
    x = torch.randn(batch, 3, SIDE, SIDE)
    assert activation_bytes(Tiny(), x) == tiny_activation_bytes(batch)
    net = Tiny()
    attnkit.attach(net, "se(reduction=4)", where=["bn"])
    assert activation_bytes(net, x) == tiny_activation_bytes(batch) + se_activation_bytes(batch)


@pytest.mark.parametrize("attn", ["se", "cbam", "eca", "srm", "coord"])
def test_activation_memory_of_a_resnet_grows_with_attention_and_with_the_batch(attn):
    plain, net = attnkit.create_model("resnet20"), attnkit.create_model("resnet20", attn=attn)
    small, large = torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32)
    assert 0 < activation_bytes(plain, small) < activation_bytes(net, small)
    # linear in the batch for one implementation ('auto' picks the fused path, which saves less, from a size on)
    for mode in ("reference", "cpu"):
        with kernels.use(mode):
            for model in (plain, net):
                assert activation_bytes(model, large) / activation_bytes(model, small) == pytest.approx(2, rel=0.01)


def test_resnet50_and_se_resnet50_published_counts():
    plain, se = attnkit.profile("resnet50", ["se"], batch_size=1, warmup=0, repeats=1)
    assert plain.input_shape == (1, 3, 224, 224)
    assert (plain.params, se.params) == (25_557_032, 28_088_024)  # torchvision; Hu et al. (28.09M)
    # torchvision publishes 4.089 GFLOPs (multiply-adds) for ResNet-50 at 224×224
    assert round(plain.flops / 1e9, 3) == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["_ops"]
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # the 16 bottlenecks' output channels
    assert se.flops - plain.flops == sum(2 * c * (c // 16) for c in widths)  # SE's two FCs: 2,514,944


def test_rows_need_what_cannot_be_guessed():
    with pytest.raises(ValueError, match="pass input_size"):
        attnkit.profile(Tiny(), ["se"])
    with pytest.raises(TypeError, match="num_classes applies to backbones built by name"):
        attnkit.profile(Tiny(), ["se"], input_size=8, num_classes=3)
    with pytest.raises(ValueError, match="'se' more than once"):
        attnkit.profile("resnet20", ["se", "eca", "se"])
    with pytest.raises(ValueError, match=r"`repeats` must be an integer >= 1, got 0"):
        attnkit.profile("resnet20", ["se"], repeats=0)
    with pytest.raises(TypeError, match="a backbone name or an nn.Module, got int"):
        attnkit.profile(3, ["se"])


def test_cli_prints_one_row_per_variant_and_the_conventions(capsys):
    assert cli.main(["profile", "--model", "resnet20", "--attn", "se,cbam(reduction=8),eca", "--batch-size", "2",
                     "--warmup", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "input 2×3×32×32 (batch × channels × height × width); CPU: 1 threads"
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    for column in ("params", "Δparams", "MFLOPs", "ΔFLOPs", "act. MiB", "CPU ms", "CPU img/s", "ΔCPU latency"):
        assert column in lines[header]
    assert [line.split()[0] for line in lines[header + 1 : header + 5]] == ["plain", "se", "cbam(reduction=8)", "eca"]
    assert lines[header + 5] == ""
    assert "each multiply-add counted once" in out and "torch.utils.flop_counter" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet21"], "Unknown model 'resnet21'"),
        (["--model", "resnet20", "--attn", "se,sq"], "Unknown attention module 'sq'"),
        (["--model", "resnet20", "--batch-size", "0"], "`batch_size` must be an integer >= 1, got 0"),
        (["--model", "lenet", "--input-size", "30"], "lenet takes 28×28 or 32×32 inputs"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert cli.main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnkit profile: error: {message}") and err.count("\n") == 1


def test_format_names_the_gpu_columns_only_with_a_gpu():
    rows = profile_tiny()
    assert "GPU" not in format_profile(rows)
    gpu = [dataclasses.replace(r, cuda_ms=2.0, cuda_images_per_s=2e3, cuda_latency_overhead=0.0, cuda_peak_bytes=2**20,
                               cuda_device="Test GPU") for r in rows]
    text = format_profile(gpu)
    assert "GPU: Test GPU" in text and "ΔGPU latency" in text and "torch.cuda.max_memory_allocated()" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_measurements():
    rows = profile_tiny()
    assert all(r.cuda_ms > 0 and r.cuda_peak_bytes > 0 for r in rows)


def test_import_attnkit_does_not_import_the_profiler():
    code = "import sys, attnkit; assert 'attnkit.analysis.profile' not in sys.modules; print(attnkit.profile.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "attnkit.analysis.profile"
