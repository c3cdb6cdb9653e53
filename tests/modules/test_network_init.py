"""Network-level initialisation: after init_in_network, each module's state is what its official network code makes of
it. The official rules are written out here as the official files state them (the ResNets' loop over the state dict,
MobileNetV2's loop over the modules, the Caffe definitions' fillers) and applied, with the same random state, to the
module's tensors under the official code's names."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from attnkit.modules import (
    BAM,
    CBAM,
    ECA,
    EMA,
    GAM,
    NAM,
    SCSE,
    SRM,
    CoordAttention,
    EfficientLocalAttention,
    FrequencyChannelAttention,
    GatedChannelTransformation,
    GatherExcite,
    GlobalContext,
    NonLocal,
    PolarizedSelfAttention,
    SelectiveKernel,
    ShuffleAttention,
    SimAM,
    SpatialGroupEnhance,
    SqueezeExcite,
    TripletAttention,
)
from attnkit.modules.base import init_in_network


def official_resnet_init(state: dict[str, Tensor]) -> None:
    """The end of ResNet.__init__ in Jongchan/attention-module (MODELS/model_resnet.py, CBAM and BAM) and
    landskape-ai/triplet-attention (MODELS/resnet.py), over the network's state dict, in its order."""
    for key in state:
        if key.split(".")[-1] == "weight":
            if "conv" in key:
                nn.init.kaiming_normal_(state[key], mode="fan_out")
            if "bn" in key:
                if "SpatialGate" in key:
                    state[key][...] = 0
                else:
                    state[key][...] = 1
        elif key.split(".")[-1] == "bias":
            state[key][...] = 0


def official_mbv2_ca_init(network: nn.Module) -> None:
    """MBV2_CA._initialize_weights in houqb/CoordAttention (mbv2_ca.py)."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def caffe_fill(blob: Tensor, filler: dict) -> None:
    """Caffe's fillers (include/caffe/filler.hpp) as the definitions name them: "msra" is N(0, 2/fan_in) with
    fan_in = count / num_output, "gaussian" N(0, std²), "constant" its value."""
    with torch.no_grad():
        if filler["type"] == "msra":
            blob.normal_(0, math.sqrt(2.0 / (blob.numel() / blob.shape[0])))
        elif filler["type"] == "gaussian":
            blob.normal_(0, filler["std"])
        else:
            blob.fill_(filler["value"])


def caffe_batchnorm(bn: nn.BatchNorm2d, momentum: float) -> None:
    """A CuDNNBatchNorm layer of the definitions: scale_filler constant 1, bias_filler constant 0, and `momentum`, the
    fraction of the moving average kept (cuDNN is given 1 − momentum as the new batch's weight, PyTorch's momentum)."""
    caffe_fill(bn.weight, {"type": "constant", "value": 1})
    caffe_fill(bn.bias, {"type": "constant", "value": 0})
    bn.momentum = 1 - momentum


def by_official_names(module: nn.Module, prefix: str, renames: list[tuple[str, str]]) -> dict[str, Tensor]:
    """The module's state dict (the same tensors) under the official code's names, in the official order: `renames`
    maps attnkit's name prefixes to the official ones. A 1×1 Conv2d stands for the official nn.Linear (same values)."""
    state = module.state_dict(keep_vars=True)
    official, mapped = {}, []
    for ours, theirs in renames:
        for key, tensor in state.items():
            if key.startswith(ours + "."):
                official[prefix + theirs + key[len(ours):]] = tensor.data
                mapped.append(key)
    assert sorted(mapped) == sorted(state), "every tensor has its official name"
    return official


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    for (name, a), b in zip(actual.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(actual.named_modules(), expected.modules()):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            assert a.momentum == pytest.approx(b.momentum, abs=1e-12), name


def initialised(module: nn.Module, official: callable, seed: int = 7) -> tuple[nn.Module, nn.Module]:
    """(module after init_in_network, a copy after the official rule), each from the same random state."""
    expected = copy.deepcopy(module)
    torch.manual_seed(seed)
    official(expected)
    torch.manual_seed(seed)
    init_in_network(module)
    return module, expected


CBAM_NAMES = [("channel_gate.fc1", "ChannelGate.mlp.1"), ("channel_gate.fc2", "ChannelGate.mlp.3"),
              ("spatial_gate.conv", "SpatialGate.spatial.conv"), ("spatial_gate.bn", "SpatialGate.spatial.bn")]


def test_cbam_as_the_official_resnet_initialises_it():
    module, expected = initialised(CBAM(64), lambda m: official_resnet_init(
        by_official_names(m, "layer1.0.cbam.", CBAM_NAMES)))
    assert_same_state(module, expected)
    assert torch.all(module.spatial_gate.bn.weight == 0) and torch.all(module.channel_gate.fc1.bias == 0)
    assert module.spatial_gate.conv.weight.std() > 0  # drawn, kaiming-normal
    x = torch.randn(4, 64, 9, 7)
    assert torch.equal(module.train().spatial_gate(x), torch.full((4, 1, 9, 7), 0.5))  # Ms starts at σ(0)


def test_cbam_without_spatial_gate_zeroes_the_mlp_biases_only():
    module, expected = initialised(CBAM(64, no_spatial=True), lambda m: official_resnet_init(
        by_official_names(m, "layer1.0.cbam.", CBAM_NAMES[:2])))
    assert_same_state(module, expected)


def test_bam_as_the_official_resnet_initialises_it():
    names = [("channel_gate.0", "channel_att.gate_c.gate_c_fc_0"), ("channel_gate.1", "channel_att.gate_c.gate_c_bn_1"),
             ("channel_gate.3", "channel_att.gate_c.gate_c_fc_final"),
             ("spatial_gate.0", "spatial_att.gate_s.gate_s_conv_reduce0"),
             ("spatial_gate.1", "spatial_att.gate_s.gate_s_bn_reduce0"),
             ("spatial_gate.3", "spatial_att.gate_s.gate_s_conv_di_0"), ("spatial_gate.4", "spatial_att.gate_s.gate_s_bn_di_0"),
             ("spatial_gate.6", "spatial_att.gate_s.gate_s_conv_di_1"), ("spatial_gate.7", "spatial_att.gate_s.gate_s_bn_di_1"),
             ("spatial_gate.9", "spatial_att.gate_s.gate_s_conv_final")]
    module, expected = initialised(BAM(64), lambda m: official_resnet_init(by_official_names(m, "bam1.", names)))
    assert_same_state(module, expected)
    assert all(torch.all(p == 0) for n, p in module.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("no_spatial", [False, True])
def test_triplet_as_the_official_resnet_initialises_it(no_spatial):
    names = [("cw.conv", "ChannelGateH.spatial.conv"), ("cw.bn", "ChannelGateH.spatial.bn"),
             ("hc.conv", "ChannelGateW.spatial.conv"), ("hc.bn", "ChannelGateW.spatial.bn"),
             ("hw.conv", "SpatialGate.spatial.conv"), ("hw.bn", "SpatialGate.spatial.bn")]
    module, expected = initialised(TripletAttention(64, no_spatial=no_spatial), lambda m: official_resnet_init(
        by_official_names(m, "layer1.0.triplet_attention.", names[:4] if no_spatial else names)))
    assert_same_state(module, expected)
    assert torch.all(module.cw.bn.weight == 1) and torch.all(module.hc.bn.weight == 1)
    if not no_spatial:
        assert torch.all(module.hw.bn.weight == 0)


@pytest.mark.parametrize("bias", [True, False])
def test_coordinate_attention_as_the_official_mobilenet_v2_initialises_it(bias):
    module, expected = initialised(CoordAttention(64, bias=bias), official_mbv2_ca_init)
    assert_same_state(module, expected)
    assert module.conv_h.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.2)  # fan_out: C outputs


def ge_prototxt(module: GatherExcite) -> None:
    """models/RN50-GEP.prototxt (θ) and RN50-GEPP.prototxt (θ⁺), one module's layers in their order:
    <stage>/gather (DepthwiseConvolution, weight_filler msra, no bias), <stage>/gather/bn (CuDNNBatchNorm, momentum 0.95,
    scale 1, bias 0); θ⁺ then <stage>/excite/1x1_down and 1x1_up (weight_filler gaussian std 0.01, bias_filler 0)."""
    for m in module.gather.modules():
        if isinstance(m, nn.Conv2d):
            caffe_fill(m.weight, {"type": "msra"})
        elif isinstance(m, nn.BatchNorm2d):
            caffe_batchnorm(m, momentum=0.95)
    for m in module.excite.modules():
        if isinstance(m, nn.Conv2d):
            caffe_fill(m.weight, {"type": "gaussian", "std": 0.01})
            caffe_fill(m.bias, {"type": "constant", "value": 0})


@pytest.mark.parametrize("kwargs", [dict(variant="theta", spatial_size=(9, 7)), dict(variant="plus", spatial_size=9),
                                    dict(variant="theta", extent=4), dict(variant="plus", extent=2)],
                         ids=["theta", "plus", "theta-e4", "plus-e2"])
def test_gather_excite_as_the_caffe_definitions_fill_it(kwargs):
    module, expected = initialised(GatherExcite(64, **kwargs), ge_prototxt)
    assert_same_state(module, expected)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.momentum == pytest.approx(0.05) for bn in bns)
    gather = module.gather[0].weight
    assert gather.std().item() == pytest.approx(math.sqrt(2 / gather[0].numel()), rel=0.2)


def sknet_prototxt(module: SelectiveKernel) -> None:
    """models/sknet50.prototxt, one unit's layers in their order: <unit>/3x3g32 and 3x3g32d2 (weight_filler msra, no
    bias), each with a CuDNNBatchNorm (momentum 0.95, scale 1, bias 0); B_fc1 (gaussian std 0.01, no bias) and its
    CuDNNBatchNorm; B_fc2 (gaussian std 0.01, no bias)."""
    for path in module.paths:
        caffe_fill(path[0].weight, {"type": "msra"})
    caffe_fill(module.fc_reduce.weight, {"type": "gaussian", "std": 0.01})
    caffe_fill(module.fc_select.weight, {"type": "gaussian", "std": 0.01})
    for path in module.paths:
        caffe_batchnorm(path[1], momentum=0.95)
    caffe_batchnorm(module.bn, momentum=0.95)


def test_selective_kernel_as_the_caffe_definition_fills_it():
    module, expected = initialised(SelectiveKernel(64, groups=32), sknet_prototxt)
    assert_same_state(module, expected)
    assert module.fc_select.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert all(m.momentum == pytest.approx(0.05) for m in module.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("make", [
    lambda: SqueezeExcite(64), lambda: ECA(64), lambda: SRM(64), lambda: GlobalContext(64), lambda: GatherExcite(64),
    lambda: SimAM(64), lambda: EMA(64), lambda: GAM(64), lambda: ShuffleAttention(256), lambda: NAM(64),
    lambda: NonLocal(64), lambda: NonLocal(64, norm=False), lambda: SpatialGroupEnhance(128),
    lambda: GatedChannelTransformation(64), lambda: FrequencyChannelAttention(64), lambda: SCSE(64),
    lambda: EfficientLocalAttention(64), lambda: PolarizedSelfAttention(64),
    lambda: PolarizedSelfAttention(64, layout="sequential"),
], ids=["se", "eca", "srm", "gc", "ge-minus", "simam", "ema", "gam", "shuffle", "nam", "nonlocal", "nonlocal-no-bn",
        "sge", "gct", "fca", "scse", "ela", "psa", "psa-sequential"])
def test_modules_the_official_networks_leave_as_built_are_unchanged(make):
    """SE: the released Caffe models are deploy definitions, without fillers. ECA: the official ResNet re-initialises
    nn.Conv2d layers, and ECA's is a Conv1d. SRM: the official ResNet sets BN weight 1 and bias 0, as built, and the
    channel-wise FC is zero-initialised by the module itself. GC: the block's own reset_parameters is its constructor's;
    the detection backbones it was trained in load ImageNet weights instead of re-initialising. θ⁻: no parameters.
    EMA, ELA: no network code was released; GAM: no code at all. Non-local: the fillers are the block's own
    (nonlocal_helper.py), applied by the constructor. PSA: the constructor applies the released HRNet's
    init_weights (`init='network'`). The others: the official loops below leave them as built."""
    module = make()
    before = copy.deepcopy(module.state_dict())
    init_in_network(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def official_resnet_loop(network: nn.Module) -> None:
    """The loop at the end of ResNet.__init__ in torchvision (the network of cfzd/FcaNet's model/fcanet.py),
    wofmanaf/SA-Net (models/sa_resnet.py) and ZjjConan/SimAM (networks/imagenet/resnet.py)."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def official_sge_resnet_loop(network: nn.Module) -> None:
    """ResNet.__init__ in implus/PytorchInsight (classification/models/imagenet/resnet_sge.py)."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def official_nam_resnet_loop(network: nn.Module) -> None:
    """ResNet.__init__ in Christian-lyc/NAM (MODELS/model_resnet.py), the same in the first release (with the spatial
    submodule's BatchNorm1d) and the current one."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight.data)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def official_gct_conv_init(gct: nn.Module) -> None:
    """Bottleneck.__init__ in z-x-yang/GCT (PyTorch/resnet.py): over each nn.Sequential(GCT, Conv2d), the
    convolutions kaiming-uniform (a=1); GCT's α, γ, β stay as GCT.__init__ made them."""
    for layer in nn.Sequential(gct, nn.Conv2d(gct.channels, gct.channels, 1, bias=False)).modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_uniform_(layer.weight, a=1)


@pytest.mark.parametrize("make, official", [
    (lambda: ShuffleAttention(256), official_resnet_loop),
    (lambda: SimAM(64), official_resnet_loop),
    (lambda: SpatialGroupEnhance(128), official_sge_resnet_loop),
    (lambda: NAM(64), official_nam_resnet_loop),
    (lambda: NAM(64, spatial_size=8), official_nam_resnet_loop),
    (lambda: GatedChannelTransformation(64), official_gct_conv_init),
], ids=["shuffle", "simam", "sge", "nam", "nam-spatial", "gct"])
def test_the_official_networks_loops_leave_these_modules_as_built(make, official):
    """SA-Net's loop sets the GroupNorm to weight 1, bias 0, as built; SGE's γ = 0, β = 1, GCT's α = 1, γ = 0, β = 0
    and Shuffle Attention's gate parameters are plain Parameters the loops do not visit; NAM's BatchNorms are set to
    1 and 0, as built; SimAM has no parameters."""
    module, expected = initialised(make(), official)
    assert_same_state(module, expected)


def official_fca_layer_fcs(channels: int) -> nn.Module:
    """MultiSpectralAttentionLayer.fc in cfzd/FcaNet (model/layer.py), whose nn.Linear layers torchvision's loop
    leaves as built."""
    return nn.Sequential(nn.Linear(channels, channels // 16, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(channels // 16, channels, bias=False), nn.Sigmoid())


def official_scse_layers(channels: int) -> list[nn.Module]:
    """ChannelSpatialSELayer in ai-med/squeeze_and_excitation, in its order: cSE's fc1 and fc2 (nn.Linear with biases,
    r = 2), then sSE's 1×1 convolution; QuickNAT (ai-med/quickNAT_pytorch) does not re-initialise them."""
    fc1 = nn.Linear(channels, channels // 2)
    fc2 = nn.Linear(channels // 2, channels)
    return [fc1, fc2, nn.Conv2d(channels, 1, 1)]


@pytest.mark.parametrize("make, official", [
    (lambda: FrequencyChannelAttention(64), lambda: [m for m in official_fca_layer_fcs(64) if isinstance(m, nn.Linear)]),
    (lambda: SCSE(64), lambda: official_scse_layers(64)),
], ids=["fca", "scse"])
def test_one_by_one_convolutions_start_as_the_official_linear_layers(make, official):
    """attnkit's 1×1 convolutions draw PyTorch's default initialisation as the official nn.Linear layers do (same
    fan-in, same order): with the same seed the values are equal, and the official networks keep them."""
    torch.manual_seed(3)
    expected = official()
    torch.manual_seed(3)
    module = make()
    init_in_network(module)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(expected)
    for conv, layer in zip(convs, expected):
        assert torch.equal(conv.weight.detach().flatten(1), layer.weight.detach().flatten(1))
        assert (conv.bias is None) == (layer.bias is None)
        if conv.bias is not None:
            assert torch.equal(conv.bias.detach(), layer.bias.detach())


def test_nonlocal_keeps_the_official_batchnorm_momentum():
    """The Caffe2 definition's SpatialBN keeps 0.9 of the running averages (NONLOCAL.BN_MOMENTUM): PyTorch's
    momentum 0.1, as built; its fillers (N(0, 0.01²), biases 0, BN scale 0) are the constructor's."""
    module = NonLocal(64)
    init_in_network(module)
    assert module.norm.momentum == pytest.approx(0.1) and torch.all(module.norm.weight == 0)
