"""attach(where="auto") into every common network: the sites found by the family's rule, identity start exact, a
training step reaching the new modules, torch.fx tracing wherever the original traced (equal outputs), torch.save and
copy.deepcopy giving the same outputs, and the model's mode and dtype followed. The default run takes a small network
of each family (same block classes) with SE; the slow run takes the 25 common networks × SE, CBAM, Coordinate Attention
and a spatial-only module of the user's."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import attnkit
from attnkit.modules.base import is_attention_module

from .networks import COMMON, SMALL, Network
from .user_modules import user_modules  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread", "user_modules")


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["out"] if isinstance(out, dict) else out[0]


def _traces(model: nn.Module) -> bool:
    try:
        torch.fx.symbolic_trace(model)
        return True
    except Exception:
        return False


def _random_scales(model: nn.Module) -> nn.Module:
    """Norm weights and biases, layer scales: random in [0.5, 1.5], so that no branch starts at zero (zero-initialised
    last norms, layer scales of 1e-6) and every gate shows in the output."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p[0].numel() == 1:  # per-channel: norms, biases, layer scales (C×1×1)
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def check_attached(network: Network, spec: str) -> None:
    torch.manual_seed(0)
    model = _random_scales(network.build()).eval()
    x = network.input()
    keys = list(model.state_dict())
    traces = _traces(model)
    with torch.no_grad():
        before = _logits(model(x))

    report = attnkit.attach(model, spec, identity_init=True)

    # sites, found by the family's rule, each gate in the model and in eval mode like it
    assert len(report) >= 2 and {s.rule for s in report} == {network.rule}
    attention = [m for m in model.modules() if is_attention_module(m)]
    assert len(attention) == len(report) and not any(m.training for m in attention)
    assert [k for k in model.state_dict() if k in keys] == keys  # the original names, in their order
    # identity start: the same function, bit for bit
    with torch.no_grad():
        after = _logits(model(x))
    assert torch.equal(after, before)
    # the gates switched on (α = 0.5): what tracing, pickling and copying must keep
    with torch.no_grad():
        for site in report:
            model.get_submodule(site.module).alpha.fill_(0.5)
        gated = _logits(model(x))
    assert (gated - before).abs().max() > 1e-3 * before.abs().max()
    # torch.fx traces it wherever it traced the original, with the outputs of the eager model on the same (reference)
    # formulas, to rounding: the traced graph runs them with other memory layouts than the eager modules (CBAM's pooled
    # maps), and deep networks with these random scales amplify that (Res2Net-50 with Coordinate Attention: 1.1e-5 of
    # the largest logit; CSPDarknet-53's 23 gates, traced against the eager fused path: 1.6e-5). 1e-4 is 10× below
    # what a dropped gate moves (1e-3, asserted above)
    if traces:
        with torch.no_grad(), attnkit.kernels.use("reference"):
            eager = _logits(model(x))
        with torch.no_grad():
            torch.testing.assert_close(_logits(torch.fx.symbolic_trace(model)(x)), eager, rtol=1e-4,
                                       atol=1e-4 * eager.abs().max().item())
    # pickled whole (as frameworks checkpoint) and deep-copied: the same outputs
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(_logits(twin(x)), gated)
    # a training step reaches every inserted module
    model.train()
    for m in model.modules():  # stochastic depth would drop whole blocks, and their gates' gradients with them
        if type(m).__name__ in ("StochasticDepth", "DropPath"):
            m.eval()
    _logits(model(x)).float().square().mean().backward()
    for site in report:
        alpha = model.get_submodule(site.module).alpha
        assert alpha.grad is not None and alpha.grad.abs() > 0, site.module


@pytest.mark.parametrize("network", SMALL, ids=repr)
def test_small_network_of_each_family(network):
    check_attached(network, "se")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["se", "cbam", "coord", "user_spatial"])
@pytest.mark.parametrize("network", COMMON, ids=repr)
def test_common_networks(network, spec):
    check_attached(network, spec)
