"""torchvision's and timm's ResNet blocks (and torchvision's RegNet blocks) ending in their last gate's pass, as
attnkit's own blocks do.

attnkit's ResNets end each block with gating.residual_end(): where attach() put attention after the block's last BN,
that module adds the shortcut and takes the ReLU in the pass that writes its output (SE, ECA, SRM, GE θ⁻: 4 passes
over the map where the gate, the addition and the ReLU apart make 7). Other libraries' blocks end in their own code,
`out += identity; out = relu(out)` after the gated BN, so attach() gives the blocks of the classes below a forward
that computes the same function, bit for bit, written to end in residual_end() (gating.end_with).

The block's own forward runs instead, as written, wherever a difference could show: while the model is traced,
scripted, compiled or exported (attnkit.kernels.reference_only), while a hook observes a layer of the block, and
where the block does what the rewrite leaves out (timm's own attention module `se`, its drop path while it drops).
Only these exact classes are rewritten: a subclass may have a forward of its own.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn

from .. import kernels
from ..modules._common import hooked
from .gating import end_with, gates_of, own_class, own_forward, residual_end

__all__ = ["ENDINGS", "Ending", "end_in_gates", "ending_of"]


def _as_written(block: nn.Module, x: Tensor) -> bool:
    return kernels.reference_only(x) or hooked(block._modules)


def _torchvision_basic_block(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision.models.resnet.BasicBlock.forward, ending in residual_end()."""
    if _as_written(block, x):
        return own_forward(block, x)
    out = block.conv2(block.relu(block.bn1(block.conv1(x))))
    identity = x if block.downsample is None else block.downsample(x)
    return residual_end(block.bn2, out, identity, block.relu)


def _torchvision_bottleneck(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision.models.resnet.Bottleneck.forward, ending in residual_end()."""
    if _as_written(block, x):
        return own_forward(block, x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.conv3(block.relu(block.bn2(block.conv2(out))))
    identity = x if block.downsample is None else block.downsample(x)
    return residual_end(block.bn3, out, identity, block.relu)


def _torchvision_regnet_block(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision.models.regnet.ResBottleneckBlock.forward, ending in residual_end(): its transform `f` runs as
    the Sequential it is, but for its last layer `c`, whose gate ends the block."""
    if _as_written(block, x):
        return own_forward(block, x)
    out = x
    for name, layer in block.f.named_children():
        if name != "c":
            out = layer(out)
    shortcut = x if block.proj is None else block.proj(x)
    return residual_end(block.f.c, out, shortcut, block.activation)


def _drops(drop_path: nn.Module | None) -> bool:
    """Whether a timm block's drop path may change its input now (it is timm's DropPath, in training, dropping)."""
    if drop_path is None:
        return False
    cls = type(drop_path)
    return f"{cls.__module__}.{cls.__qualname__}" != "timm.layers.drop.DropPath" or (
        drop_path.training and drop_path.drop_prob > 0)


def _timm_as_written(block: nn.Module, x: Tensor) -> bool:
    return _as_written(block, x) or block.se is not None or _drops(block.drop_path)


def _timm_basic_block(block: nn.Module, x: Tensor) -> Tensor:
    """timm.models.resnet.BasicBlock.forward, ending in residual_end()."""
    if _timm_as_written(block, x):
        return own_forward(block, x)
    out = block.conv2(block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x))))))
    shortcut = x if block.downsample is None else block.downsample(x)
    return residual_end(block.bn2, out, shortcut, block.act2)


def _timm_bottleneck(block: nn.Module, x: Tensor) -> Tensor:
    """timm.models.resnet.Bottleneck.forward, ending in residual_end()."""
    if _timm_as_written(block, x):
        return own_forward(block, x)
    out = block.act1(block.bn1(block.conv1(x)))
    out = block.conv3(block.aa(block.act2(block.drop_block(block.bn2(block.conv2(out))))))
    shortcut = x if block.downsample is None else block.downsample(x)
    return residual_end(block.bn3, out, shortcut, block.act3)


class Ending(NamedTuple):
    """How a block class ends in residual_end(): the layer whose gate ends it, the activation it ends with (the
    attribute's name) and the rewrite of its forward (None where its own forward ends so)."""

    gated: str
    activation: str
    forward: Callable[[nn.Module, Tensor], Tensor] | None


#: the block classes that end in residual_end(), by qualified name: attnkit's own, as written, and those rewritten
ENDINGS: dict[str, Ending] = {
    "attnkit.models.cifar_resnet.CifarBasicBlock": Ending("bn2", "relu", None),
    "attnkit.models.resnet.BasicBlock": Ending("bn2", "relu", None),
    "attnkit.models.resnet.Bottleneck": Ending("bn3", "relu", None),
    "torchvision.models.resnet.BasicBlock": Ending("bn2", "relu", _torchvision_basic_block),
    "torchvision.models.resnet.Bottleneck": Ending("bn3", "relu", _torchvision_bottleneck),
    "torchvision.models.regnet.ResBottleneckBlock": Ending("f.c", "activation", _torchvision_regnet_block),
    "timm.models.resnet.BasicBlock": Ending("bn2", "act2", _timm_basic_block),
    "timm.models.resnet.Bottleneck": Ending("bn3", "act3", _timm_bottleneck),
}


def ending_of(block: nn.Module) -> Ending | None:
    """How `block` ends in residual_end() (ENDINGS), by its own class (attach()'s gated subclass counts as the
    class it subclasses); None for any other module."""
    cls = own_class(block)
    return ENDINGS.get(f"{cls.__module__}.{cls.__qualname__}")


def _submodule(module: nn.Module, path: str) -> nn.Module:
    """`module`'s submodule at `path`, or an Identity where it has none."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return nn.Identity()


def end_in_gates(model: nn.Module) -> None:
    """Give each block of `model` of the classes in ENDINGS whose last layer attach() gated the rewrite that ends in
    its gate."""
    for module in model.modules():
        ending = ending_of(module)
        if ending is not None and ending.forward is not None and gates_of(_submodule(module, ending.gated)):
            end_with(module, ending.forward)
