"""attnkit.hooks: hooks and eval mode lent to a block, and taken back after it, also when it raises."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.hooks import evaluating, forward_hooks


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU())


def test_hooks_run_inside_the_block_and_are_gone_after_it_even_after_an_error():
    net, seen = _net(), []
    hooks = [(net[0], lambda m, i, o: seen.append(("conv", tuple(o.shape)))), (net[2], lambda m, i, o: seen.append("relu"))]
    with pytest.raises(RuntimeError, match="stop"):
        with forward_hooks(hooks, pre=[(net[1], lambda m, i: seen.append("bn starts"))]):
            net(torch.zeros(1, 1, 3, 3))
            raise RuntimeError("stop")
    assert seen == [("conv", (1, 2, 3, 3)), "bn starts", "relu"]
    net(torch.zeros(1, 1, 3, 3))
    assert len(seen) == 3
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_prepended_hooks_run_before_the_modules_own_and_a_failed_registration_leaves_none():
    net, order = _net(), []
    net[0].register_forward_hook(lambda m, i, o: order.append("own"))
    with forward_hooks([(net[0], lambda m, i, o: order.append("lent"))], prepend=True):
        net(torch.zeros(1, 1, 2, 2))
    assert order == ["lent", "own"] and len(net[0]._forward_hooks) == 1

    def failing():
        yield net[2], lambda m, i, o: None
        raise ValueError("no such module")

    with pytest.raises(ValueError):
        with forward_hooks(failing()):
            pass
    assert not net[2]._forward_hooks


def test_evaluating_restores_each_modules_own_mode():
    net = _net().train()
    net[1].eval()  # a frozen BatchNorm
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, False, True]
