"""fuse(): the folded copy computes the eval-mode model's function, with fewer parameters and no BatchNorm left
wherever a BatchNorm follows a layer alone; nothing is folded where that would change the function."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import attnkit
from attnkit.cost import count_params
from tests.deploy.common import BACKBONES, SPECS, batchnorms, randomise, rel_error
from tests.modules.cases import CASES, build, case_id


def _error(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return rel_error(fused(x), model(x))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_module_folds_exactly(case):
    """In float64 the folded module equals the module to rounding (the folding is exact); in float32 within 1e-5."""
    name, kwargs = case
    module = randomise(build(name, kwargs, 16, (9, 7)))
    fused = attnkit.fuse(module)
    assert batchnorms(fused) == 0
    if batchnorms(module):
        assert count_params(fused) < count_params(module)
    else:
        assert count_params(fused) == count_params(module)
    x = torch.randn(3, 16, 9, 7)
    assert _error(module, fused, x) < 1e-5
    module.double()  # folded in float64, the fold shows itself exact
    assert _error(module, attnkit.fuse(module), x.double()) < 1e-12


@pytest.mark.parametrize("attn", [None, *SPECS], ids=str)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbones_with_every_module_fold_every_batchnorm(backbone, attn):
    model = randomise(attnkit.create_model(backbone, attn=SPECS.get(attn), num_classes=10))
    fused = attnkit.fuse(model)
    # SimAM gates the 3×3 convolution's output before its BN: the gate is not linear, so that BN stays
    assert batchnorms(fused) == sum(isinstance(m, attnkit.SimAM) for m in model.modules())
    # each BatchNorm's 2·C parameters go, a bias of C comes to a convolution that had none
    assert count_params(fused) < count_params(model)
    x = torch.randn(2, 3, 40, 40)
    assert _error(model, fused, x) < 1e-5
    assert _error(model, fused, x.to(memory_format=torch.channels_last)) < 1e-5


def test_gates_after_a_folded_batchnorm_still_apply():
    """attach() gates the residual branch's last BN; when that BN folds away, the Identity left in its place gates."""
    model = randomise(attnkit.create_model("resnet20", attn="se", num_classes=10))
    fused = attnkit.fuse(model)
    site = fused.get_submodule("layer1.0.bn2")
    assert isinstance(site, nn.Identity)
    assert attnkit.surgery.gates_of(site) == [fused.get_submodule("layer1.0.attn")]
    x = torch.randn(2, 3, 32, 32)
    assert _error(model, fused, x) < 1e-5


def test_torchvision_model_with_attached_modules():
    model = torchvision.models.resnet18(num_classes=7)
    attnkit.attach(model, "cbam")
    randomise(model)
    fused = attnkit.fuse(model)
    assert batchnorms(fused) == 0
    assert _error(model, fused, torch.randn(2, 3, 48, 48)) < 1e-5


def test_identity_start_wrappers_fold_inside():
    model = attnkit.create_model("resnet20", attn="srm", num_classes=10, identity_init=True)
    for p in model.parameters():
        if p.dim() == 0:  # the IdentityStart scales, 0 at the start
            p.data.fill_(0.7)
    randomise(model)
    fused = attnkit.fuse(model)
    assert batchnorms(fused) == 0
    assert _error(model, fused, torch.randn(2, 3, 32, 32)) < 1e-5


def test_srm_folds_its_batchnorm_into_the_channel_wise_fc():
    """The equation of the fold, written out: g = σ((s·w)·t + β − s·μ), s = γ / sqrt(σ² + ε)."""
    srm = randomise(attnkit.SRM(6))
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    srm.double()
    fused = attnkit.fuse(srm)
    bn = srm.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(fused.cfc, srm.cfc * s[:, None])
    assert torch.allclose(fused.bias, bn.bias - s * bn.running_mean)
    assert isinstance(fused.bn, nn.Identity)
    assert _error(srm, fused, x) < 1e-12


def test_the_original_model_is_unchanged():
    model = randomise(attnkit.create_model("resnet20", attn="cbam", num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attnkit.fuse(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert batchnorms(model) > 0


def test_training_mode_is_refused():
    model = attnkit.create_model("resnet20", attn="se", num_classes=10)
    with pytest.raises(ValueError, match=r"training mode .*model\.eval\(\)"):
        attnkit.fuse(model)
    model.eval()
    model.layer1[0].bn1.train()
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1"):
        attnkit.fuse(model)
    with pytest.raises(TypeError, match="nn.Module"):
        attnkit.fuse("resnet20")


class _ConvUsedTwice(nn.Module):
    """conv's output goes to the BN and to the sum: folding the BN into conv would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _SharedNorm(nn.Module):
    """One BN after two convolutions: it cannot fold into both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation (as timm's StdConv2d): scaling the weight would be undone, so no fold."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class _Untraceable(nn.Module):
    """Data-dependent control flow stops torch.fx; the Sequential pair is still folded, the loose pair is not."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


@pytest.mark.parametrize(
    "model, shape, left",
    [
        (_ConvUsedTwice(), (4, 3, 8, 8), 1),
        (_SharedNorm(), (4, 3, 8, 8), 1),
        (nn.Sequential(_StandardisedConv(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 8, 8), 1),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (4, 3, 8, 8), 1),
        (_Untraceable(), (4, 3, 8, 8), 1),
        (nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)), (4, 5), 0),
    ],
    ids=["output-used-twice", "shared-norm", "weight-standardisation", "batch-statistics", "untraceable", "linear"],
)
def test_folds_only_where_exact(model, shape, left):
    model = randomise(model)
    fused = attnkit.fuse(model)
    assert batchnorms(fused) == left
    assert _error(model, fused, torch.randn(shape)) < 1e-5
