"""A network lent for one block: forward hooks registered on entering it, eval mode, both undone on leaving it (also
when it raises), so the network never keeps an observer or a mode it was lent with."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["evaluating", "forward_hooks"]

Hooks = Iterable[tuple[nn.Module, Callable[..., Any]]]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; every module's own mode is restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def forward_hooks(hooks: Hooks, pre: Hooks = (), prepend: bool = False) -> Iterator[None]:
    """Inside the block, each (module, hook) of `hooks` is a forward hook of its module (run before the module's
    other forward hooks with `prepend`) and each of `pre` a forward pre-hook."""
    handles: list[RemovableHandle] = []
    try:
        for module, hook in pre:
            handles.append(module.register_forward_pre_hook(hook))
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook, prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()
