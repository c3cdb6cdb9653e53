"""attnkit.capture: for every module configuration the recorded gates equal the gates written out from the
module's equations (float64, eval and train BatchNorm); several forward passes give one entry each; the hooks
exist only inside the block, also when it raises; it finds the modules inside create_model() backbones and
inside a torchvision ResNet-18 after attach(), with and without identity start."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import attnkit
from attnkit.modules.base import AttentionModule

from .modules.cases import CASES, build, case_id
from .modules.reference import TRAIN_MODES, assert_close, batch_norm, conv1x1, conv2d_same, feature_map, randomize
from .modules.test_cbam import CHANNEL_POOLS, POOLS
from .modules.test_coord import h_swish
from .modules.test_gc import context, transform
from .modules.test_ge import window_mean
from .modules.test_triplet import z_pool
# simam, ema, gam, shuffle, nam, nonlocal
from .modules.test_ema import group_norm_per_channel
from .modules.test_gam import dense
from .modules.test_nam import pixel_batch_norm, share
from .modules.test_nonlocal import max_pool_2x2
from .modules.test_sge import sge_gate
from .modules.test_gct import gct_gate
from .modules.test_fca import fca_gate
from .modules.test_scse import scse_gates
from .modules.test_ela import ela_gates
from .modules.test_psa import channel_attention, spatial_attention

C = 32
SHAPE = (3, C, 9, 7)


pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(z):
    return 1 / (1 + torch.exp(-z))


def hard_sigmoid(z):
    return torch.clamp(z / 6 + 0.5, 0, 1)


def se_gates(m, x, train):
    """s = σ(W₂ δ(W₁ GAP(x) + b₁) + b₂)."""
    gate = hard_sigmoid if isinstance(m.gate, nn.Hardsigmoid) else sigmoid
    return {"channel": gate(conv1x1(torch.relu(conv1x1(x.mean((2, 3)), m.fc1)), m.fc2))[:, :, None, None]}


def eca_gates(m, x, train):
    """s = σ(Σ_u w[u] · pad(GAP(x))[c + u])."""
    w, c = m.conv.weight[0, 0], x.shape[1]
    k = w.numel()
    padded = F.pad(x.mean((2, 3)), ((k - 1) // 2, (k - 1) // 2))
    return {"channel": sigmoid(sum(w[u] * padded[:, u : u + c] for u in range(k)))[:, :, None, None]}


def srm_gates(m, x, train):
    """g = σ(BN(w_μ μ + w_σ sqrt(Var(x) + ε))), unbiased variance over H×W."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    mean = flat.mean(2)
    var = ((flat - mean[:, :, None]) ** 2).sum(2) / (h * w - 1)
    z = m.cfc[:, 0] * mean + m.cfc[:, 1] * torch.sqrt(var + 1e-5)
    return {"channel": sigmoid(batch_norm(z[:, :, None, None], m.bn, train))}


def cbam_gates(m, x, train):
    """Mc = σ(Σ_p MLP(pool_p(x))); Ms = σ(BN(conv_k([pools over C of x·Mc])))."""
    fc1, fc2 = m.channel_gate.fc1, m.channel_gate.fc2
    mc = sigmoid(sum(conv1x1(torch.relu(conv1x1(POOLS[p](x), fc1)), fc2) for p in m.channel_gate.pool_types))
    gates = {"channel": mc[:, :, None, None]}
    if m.spatial_gate is not None:
        y = x * gates["channel"]
        conv, bn = m.spatial_gate.conv, m.spatial_gate.bn
        z = conv2d_same(torch.cat([CHANNEL_POOLS[p](y) for p in m.spatial_gate.order], 1), conv.weight, conv.bias)
        gates["spatial"] = sigmoid(batch_norm(z, bn, train) if isinstance(bn, nn.BatchNorm2d) else z)
    return gates


def bam_gates(m, x, train):
    """σ(Mc + Ms) or σ(Mc·Ms): Mc = FC(ReLU(BN(FC(GAP(x))))), Ms = conv1×1(ReLU(BN(conv3×3,d(… conv1×1(x)))))."""
    fc1, bn1d, _, fc2 = m.channel_gate
    convs = [layer for layer in m.spatial_gate if isinstance(layer, nn.Conv2d)]
    bns = [layer for layer in m.spatial_gate if isinstance(layer, nn.BatchNorm2d)]
    mc = conv1x1(torch.relu(batch_norm(conv1x1(x.mean((2, 3)), fc1), bn1d, train)), fc2)[:, :, None, None]
    z = torch.relu(batch_norm(conv2d_same(x, convs[0].weight, convs[0].bias), bns[0], train))
    for conv, bn in zip(convs[1:-1], bns[1:]):
        z = torch.relu(batch_norm(conv2d_same(z, conv.weight, conv.bias, conv.dilation[0]), bn, train))
    ms = conv2d_same(z, convs[-1].weight, convs[-1].bias)
    return {"attention": sigmoid(mc + ms if m.combine == "sum" else mc * ms)}


def coord_gates(m, x, train):
    """f = h_swish(BN(conv1([mean_W(x); mean_H(x)]))); a_h = σ(conv_h(f_h)), a_w = σ(conv_w(f_w))."""
    h = x.shape[2]
    f = h_swish(batch_norm(conv1x1(torch.cat([x.mean(3), x.mean(2)], dim=2), m.conv1), m.bn1, train))
    return {"a_h": sigmoid(conv1x1(f[:, :, :h], m.conv_h))[:, :, :, None],
            "a_w": sigmoid(conv1x1(f[:, :, h:], m.conv_w))[:, :, None, :]}


def ge_gates(m, x, train):
    """σ(ξ_E(ξ_G(x))) before upsampling: ξ_G a (window) mean, or depthwise convolutions with BN (ReLU between);
    ξ_E for θ⁺ ReLU, 1×1 conv, ReLU, 1×1 conv."""
    if m.variant == "minus":
        gathered = x.mean((2, 3), keepdim=True) if m.extent == 0 else window_mean(x, m.extent)
    else:
        convs = [layer for layer in m.gather if isinstance(layer, nn.Conv2d)]
        bns = [layer for layer in m.gather if isinstance(layer, nn.BatchNorm2d)]
        if m.extent == 0:  # one kernel covering the map: a per-channel weighted sum
            gathered = batch_norm((convs[0].weight[:, 0] * x).sum((2, 3), keepdim=True), bns[0], train)
        else:
            gathered = x
            for i, (conv, bn) in enumerate(zip(convs, bns)):
                v = torch.relu(gathered) if i else gathered
                gathered = batch_norm(F.conv2d(v, conv.weight, stride=2, padding=1, groups=x.shape[1]), bn, train)
    if m.variant == "plus":
        gathered = conv1x1(torch.relu(conv1x1(torch.relu(gathered), m.excite[1])), m.excite[3])
    return {"gate": sigmoid(gathered)}


def gc_gates(m, x, train):
    """weights = softmax_j(w_k·x_j + b_k) (attention pooling), c = Σ_j weights_j x_j (or the mean),
    mul = σ(transform(c)), add = transform(c)."""
    c = context(m, x, m.pooling)
    gates = {"context": c}
    if m.pooling == "att":
        logits = torch.einsum("c,nchw->nhw", m.conv_mask.weight[0, :, 0, 0], x) + m.conv_mask.bias[0]
        gates["weights"] = torch.softmax(logits.flatten(1), dim=1).view(x.shape[0], 1, *x.shape[2:])
    if "mul" in m.fusion:
        gates["mul"] = sigmoid(transform(m.channel_mul_conv, c))
    if "add" in m.fusion:
        gates["add"] = transform(m.channel_add_conv, c)
    return gates


def triplet_gates(m, x, train):
    """Each branch σ(BN(conv_k(Z-pool(v)))) on x with the pooled axis moved to dim 1, moved back."""

    def gate(v, branch):
        return sigmoid(batch_norm(conv2d_same(z_pool(v), branch.conv.weight), branch.bn, train))

    gates = {"cw": gate(x.permute(0, 2, 1, 3), m.cw).permute(0, 2, 1, 3),  # pooled over H: N×C×1×W
             "hc": gate(x.permute(0, 3, 2, 1), m.hc).permute(0, 3, 2, 1)}  # pooled over W: N×C×H×1
    if m.hw is not None:
        gates["hw"] = gate(x, m.hw)  # pooled over C: N×1×H×W
    return gates


def sk_gates(m, x, train):
    """a = softmax over the paths of W_select ReLU(BN(W_reduce GAP(Σ_m U_m))), U_m = ReLU(BN(conv_m(x)))."""
    paths = []
    for conv, bn, _ in m.paths:
        d = conv.dilation[0]
        u = F.conv2d(x, conv.weight, stride=conv.stride, padding=d, dilation=d, groups=conv.groups)
        paths.append(torch.relu(batch_norm(u, bn, train)))
    z = torch.relu(batch_norm(conv1x1(sum(paths).mean((2, 3), keepdim=True), m.fc_reduce), m.bn, train))
    return {"paths": torch.softmax(conv1x1(z, m.fc_select).reshape(x.shape[0], len(paths), -1, 1, 1), dim=1)}


# simam, ema, gam, shuffle, nam, nonlocal
def simam_gates(m, x, train):
    """σ(1/e*), 1/e* = (x − μ)² / (4(σ̂² + λ)) + 1/2 per channel over H×W (unbiased variance)."""
    gate = hard_sigmoid if isinstance(m.gate, nn.Hardsigmoid) else sigmoid
    h, w = x.shape[2:]
    d = (x - x.mean((2, 3), keepdim=True)) ** 2
    return {"attention": gate(d / (4 * (d.sum((2, 3), keepdim=True) / (h * w - 1) + m.e_lambda)) + 0.5)}


def ema_gates(m, x, train):
    """σ(w) per group: w = softmax_c(GAP(x₁))·x₂ + softmax_c(GAP(x₂))·x₁, N×G×H×W."""
    n, c, h, w = x.shape
    gx = x.reshape(n * m.groups, c // m.groups, h, w)
    a = conv1x1(torch.cat([gx.mean(3), gx.mean(2)], dim=2), m.conv1x1)
    x1 = group_norm_per_channel(gx * sigmoid(a[:, :, :h])[:, :, :, None] * sigmoid(a[:, :, h:])[:, :, None, :], m.gn)
    x2 = conv2d_same(gx, m.conv3x3.weight, m.conv3x3.bias)
    weights = (torch.einsum("bc,bchw->bhw", torch.softmax(x1.mean((2, 3)), 1), x2)
               + torch.einsum("bc,bchw->bhw", torch.softmax(x2.mean((2, 3)), 1), x1))
    return {"attention": sigmoid(weights).reshape(n, m.groups, h, w)}


def gam_gates(m, x, train):
    """Mc = σ(MLP(x) at each position) and Ms = σ(BN(conv(ReLU(BN(conv(x·Mc)))))), hidden channels shuffled."""
    mc = sigmoid(conv1x1(torch.relu(conv1x1(x, m.fc1)), m.fc2))
    norm = isinstance(m.bn1, nn.BatchNorm2d)
    hidden = conv2d_same(x * mc, dense(m.conv1.weight, m.groups), m.conv1.bias)
    hidden = torch.relu(batch_norm(hidden, m.bn1, train) if norm else hidden)
    h = hidden.shape[1]
    hidden = hidden[:, [g * (h // m.groups) + k for k in range(h // m.groups) for g in range(m.groups)]]
    logits = conv2d_same(hidden, dense(m.conv2.weight, m.groups), m.conv2.bias)
    return {"channel": mc, "spatial": sigmoid(batch_norm(logits, m.bn2, train) if norm else logits)}


def shuffle_gates(m, x, train):
    """Per group: the first half's gate σ(w₁·GAP + b₁), the second half's σ(w₂·GN + b₂); groups one after another."""
    gate = hard_sigmoid if isinstance(m.channel_gate, nn.Hardsigmoid) else sigmoid
    n, c, h, w = x.shape
    half = c // (2 * m.groups)
    gx = x.reshape(n * m.groups, 2, half, h, w)
    per_channel = lambda p: p.reshape(1, half, 1, 1)  # noqa: E731
    channel = gate(per_channel(m.cweight) * gx[:, 0].mean((2, 3), keepdim=True) + per_channel(m.cbias))
    spatial = gate(per_channel(m.sweight) * group_norm_per_channel(gx[:, 1], m.gn) + per_channel(m.sbias))
    return {"channel": channel.reshape(n, c // 2, 1, 1), "spatial": spatial.reshape(n, c // 2, h, w)}


def nam_gates(m, x, train):
    """Mc = σ(w_γ ⊙ BN(x)); with the spatial submodule Ms = σ(w_λ ⊙ BN_s(x·Mc))."""
    mc = sigmoid(batch_norm(x, m.bn, train) * share(m.bn.weight, m.detach_weights, m.abs_weights)[:, None, None])
    if m.pixel_bn is None:
        return {"channel": mc}
    w = share(m.pixel_bn.weight, m.detach_weights, m.abs_weights).reshape(x.shape[2:])
    return {"channel": mc, "spatial": sigmoid(pixel_batch_norm(x * mc, m.pixel_bn, train) * w)}


def nonlocal_gates(m, x, train):
    """attention: f(x_i, x̂_j)/C(x) averaged over the positions i, N×1×h×w; response: BN(W_z y) (or W_z y)."""
    pooled = max_pool_2x2(x) if m.subsample == "before" else x
    theta = x if m.theta is None else conv1x1(x, m.theta)
    phi = pooled if m.phi is None else conv1x1(pooled, m.phi)
    g = conv1x1(pooled, m.g)
    if m.subsample == "after":
        phi, g = max_pool_2x2(phi), max_pool_2x2(g)
    t, p = theta.flatten(2), phi.flatten(2)
    if m.pairwise == "concatenation":
        w_f = m.attend.concat_project.weight.flatten()
        a, b = torch.einsum("c,ncl->nl", w_f[:t.shape[1]], t), torch.einsum("c,ncl->nl", w_f[t.shape[1]:], p)
        f = torch.relu(a[:, :, None] + b[:, None, :]) / p.shape[2]
    elif m.pairwise == "dot_product":
        f = torch.einsum("nci,ncj->nij", t, p) / p.shape[2]
    else:
        f = torch.softmax(m.attend.scale * torch.einsum("nci,ncj->nij", t, p), dim=2)
    y = torch.einsum("nij,ncj->nci", f, g.flatten(2)).reshape(x.shape[0], -1, *x.shape[2:])
    z = conv1x1(y, m.w_z)
    response = batch_norm(z, m.norm, train) if isinstance(m.norm, nn.BatchNorm2d) else z
    return {"attention": f.mean(1).reshape(x.shape[0], 1, *phi.shape[2:]), "response": response}


EQUATIONS = {"se": se_gates, "eca": eca_gates, "srm": srm_gates, "cbam": cbam_gates, "bam": bam_gates,
             "coord": coord_gates, "ge": ge_gates, "gc": gc_gates, "triplet": triplet_gates, "sk": sk_gates,
             # simam, ema, gam, shuffle, nam, nonlocal
             "simam": simam_gates, "ema": ema_gates, "gam": gam_gates, "shuffle": shuffle_gates, "nam": nam_gates,
             "nonlocal": nonlocal_gates}


# sge, gct, fca, scse, ela, psa
def scse_gate_dict(m, x, train):
    """s = σ(W₂ ReLU(W₁ GAP(x) + b₁) + b₂), q = σ(w·x + b)."""
    s, q = scse_gates(m, x)
    return {"channel": s, "spatial": q}


def ela_gate_dict(m, x, train):
    """aʰ, aʷ = σ(act(GN(conv1d(strip means)))), with the module's groups."""
    conv_h, norm_h = m.strips()[0]
    act = F.silu if isinstance(m.act, nn.SiLU) else (lambda z: z)
    a_h, a_w = ela_gates(m, x, conv_h.groups, norm_h.num_groups, act)
    return {"a_h": a_h[:, :, :, None], "a_w": a_w[:, :, None, :]}


def psa_gates(m, x, train):
    """Aᶜʰ(x); Aˢᵖ of x (parallel) or of x·Aᶜʰ(x) (sequential)."""
    a_ch = channel_attention(m, x)[:, :, None, None]
    return {"channel": a_ch, "spatial": spatial_attention(m, x * a_ch if m.layout == "sequential" else x)[:, None]}


EQUATIONS |= {"sge": lambda m, x, train: {"spatial": sge_gate(m, x)},
              "gct": lambda m, x, train: {"channel": gct_gate(m, x)},
              "fca": lambda m, x, train: {"channel": fca_gate(m, x)},
              "scse": scse_gate_dict, "ela": ela_gate_dict, "psa": psa_gates}


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_module_has_its_equations():
    assert {name for name, _ in CASES} == set(EQUATIONS)


@TRAIN_MODES
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_recorded_gates_are_the_equations(case, train):
    name, kwargs = case
    m = randomize(build(name, kwargs, C, SHAPE[2:]), double=True).train(train)
    x = feature_map(*SHAPE)  # requires grad: the records must still be detached
    with attnkit.capture(m) as gates:
        y = m(x)
    expected = EQUATIONS[name](m, x, train)
    assert list(gates) == [""] and set(gates[""]) == set(expected)
    for gate, value in expected.items():
        (recorded,) = gates[""][gate]
        assert not recorded.requires_grad and recorded.grad_fn is None
        assert_close(recorded, value.detach(), f"{case_id(case)}: {gate}")
    if not train:  # recording changes nothing: the output is the reference path's, to the bit
        with attnkit.kernels.use("reference"):
            torch.testing.assert_close(y, m(x), rtol=0, atol=0)


def test_several_passes_give_one_entry_each_in_call_order():
    m = randomize(attnkit.create("cbam", C), double=True).eval()
    first, second = feature_map(2, C, 9, 7, seed=3), feature_map(4, C, 5, 6, seed=4)
    with attnkit.capture(m) as gates:
        m(first)
        m(second)
    for gate in ("channel", "spatial"):
        assert len(gates[""][gate]) == 2
        for recorded, x in zip(gates[""][gate], (first, second)):
            assert_close(recorded, cbam_gates(m, x, False)[gate].detach(), gate)
    assert gates[""]["spatial"][1].shape == (4, 1, 5, 6)


def test_hooks_exist_only_inside_the_block():
    net = attnkit.create_model("resnet20", attn="gc(fusion=('add', 'mul'))")
    manager = attnkit.capture(net)
    assert hooks(net) == 0  # made, not entered
    with manager as gates:
        assert hooks(net) == 4 * len(gates)  # GC: weights, context, mul, add
    assert hooks(net) == 0
    with pytest.raises(RuntimeError, match="inside the block"):
        with attnkit.capture(net):
            raise RuntimeError("inside the block")
    assert hooks(net) == 0
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        with attnkit.capture(net) as gates:
            net.train()(torch.randn(1, 3, 4, 4))  # the last stage's 1×1 maps fail in a BatchNorm
    assert len(gates["layer2.0.attn"]["context"]) == 1 and hooks(net) == 0  # after some hooks ran


def inputs_of_attention_modules(model: nn.Module) -> tuple[dict, list]:
    """Forward pre-hooks (the test's own) that keep each attention module's input."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
               for name, m in model.named_modules() if isinstance(m, AttentionModule)]
    return seen, handles


@pytest.mark.parametrize("attn", ["se", "cbam", "bam", "coord", "gc", "triplet", "sk(groups=4)",
                                  "simam", "ema(groups=8)", "gam", "shuffle(groups=4)", "nam", "nonlocal"])
def test_inside_a_backbone(attn):
    torch.manual_seed(0)
    net = attnkit.create_model("resnet20", attn=attn).double().eval()
    names = [name for name, m in net.named_modules() if isinstance(m, AttentionModule)]
    seen, handles = inputs_of_attention_modules(net)
    with attnkit.capture(net) as gates:
        net(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    for handle in handles:
        handle.remove()
    assert list(gates) == names and len(names) >= 2
    for name in names:
        expected = EQUATIONS[attn.split("(")[0]](net.get_submodule(name), seen[name], False)
        assert set(gates[name]) == set(expected)
        for gate, value in expected.items():
            assert_close(gates[name][gate][0], value, f"{name}: {gate}")
    assert hooks(net) == 0


@pytest.mark.parametrize("identity_init", [False, True], ids=["plain", "identity_init"])
def test_inside_torchvision_resnet18_after_attach(identity_init):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).double().eval()
    report = attnkit.attach(net, "se", identity_init=identity_init)
    net.double()
    names = [site.module + (".module" if identity_init else "") for site in report]
    seen, handles = inputs_of_attention_modules(net)
    with attnkit.capture(net) as gates:
        net(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    for handle in handles:
        handle.remove()
    assert list(gates) == names and names[0] == "layer1.0.attn" + (".module" if identity_init else "")
    for name, site in zip(names, report):
        (recorded,) = gates[name]["channel"]
        assert recorded.shape == (2, site.channels, 1, 1)
        assert_close(recorded, se_gates(net.get_submodule(name), seen[name], False)["channel"], name)
    assert hooks(net) == 0


def test_a_network_without_attention_records_nothing():
    net = attnkit.create_model("resnet20")
    with attnkit.capture(net) as gates:
        net(torch.randn(2, 3, 32, 32))
    assert gates == {}
    with pytest.raises(TypeError, match="must be an nn.Module, got str"):
        with attnkit.capture("resnet20"):
            pass
