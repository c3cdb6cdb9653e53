"""Block layouts: where attention goes inside each family of blocks, one declared entry per family.

A layout names the blocks it describes and, inside such a block, the layer whose output the attention follows, as
the papers place it: at the end of the residual branch, before the addition (SE, CBAM, ECA, ... in ResNets and their
descendants); at the end of the depthwise stage of an inverted residual, before the projection (MobileNet,
EfficientNet, MNASNet); at the block's own output where the block adds nothing (dense blocks, Inception modules,
ShuffleNet's branches are concatenated). Blocks are found outermost first; a block inside a matched block is not
matched again.

Users describe their own blocks the same way:

    attnkit.register_block_layout(BlockLayout("MyBlock", matches=of_class("mylib.MyBlock"), gate="norm2"))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["BlockLayout", "block_layouts", "has_attributes", "of_class", "register_block_layout"]

Site = Callable[[nn.Module], "str | None"]


@dataclass(frozen=True)
class BlockLayout:
    """Where attention goes in one family of blocks.

    Args:
        name: the family, as attach()'s report names it.
        matches: whether a module is such a block (`of_class(...)`, `has_attributes(...)`, or any predicate).
        gate: the path, relative to the block, of the layer whose output the attention follows ("" for the block's own
            output), or a function of the block that returns it (None: this block takes none).
        conv: for modules that replace a convolution (SK): the path of the block's 3×3 convolution, then the layers
            that convolution's replacement makes redundant (they become Identity), or a function of the block that
            returns them; None where the family has no such convolution.
        residual: whether the block adds a shortcut to its branch, so that position='output' differs from the end of
            the branch.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    gate: str | Site
    conv: tuple[str, ...] | Callable[[nn.Module], "tuple[str, ...] | None"] | None = None
    residual: bool = True

    def gate_site(self, block: nn.Module) -> str | None:
        return self.gate(block) if callable(self.gate) else self.gate

    def conv_site(self, block: nn.Module) -> tuple[str, ...] | None:
        return self.conv(block) if callable(self.conv) else self.conv


def of_class(*names: str) -> Callable[[nn.Module], bool]:
    """Matches modules whose class, or a base class, has one of these qualified names ('torchvision.models.resnet.
    Bottleneck'); nothing is imported."""
    wanted = set(names)
    return lambda m: any(f"{c.__module__}.{c.__qualname__}" in wanted for c in type(m).__mro__)


def has_attributes(*names: str) -> Callable[[nn.Module], bool]:
    """Matches modules that have all these attributes (children or others)."""
    return lambda m: all(hasattr(m, n) for n in names)


def _resnet_gate(block: nn.Module) -> str:
    return "bn3" if hasattr(block, "bn3") else "bn2"


def _resnet_conv(block: nn.Module) -> tuple[str, ...]:
    return ("conv2", "bn2") if hasattr(block, "conv3") else ("conv1", "bn1")


def _mobilenet_v2_gate(block: nn.Module) -> str | None:
    return "conv.1" if len(block.conv) == 4 else None  # expand, depthwise, project, BN; expand ratio 1 has 3 layers


def _mobilenet_v2_conv(block: nn.Module) -> tuple[str, ...] | None:
    return ("conv.1",) if len(block.conv) == 4 else None


def _before_projection(block: nn.Module) -> str:
    """torchvision's MobileNetV3, EfficientNet and EfficientNetV2 blocks: `block` is [expand], depthwise (or the fused
    3×3), [squeeze-excitation], projection; the layer before the projection."""
    return f"block.{max(0, len(block.block) - 2)}"


_LAYOUTS: list[BlockLayout] = [
    BlockLayout("ResNet block", has_attributes("conv1", "bn1", "conv2", "bn2", "downsample"), _resnet_gate, _resnet_conv),
    BlockLayout("MobileNetV2 inverted residual", has_attributes("conv", "use_res_connect"),
                _mobilenet_v2_gate, _mobilenet_v2_conv),
    BlockLayout("MobileNetV3/EfficientNet block", of_class(
        "torchvision.models.mobilenetv3.InvertedResidual", "torchvision.models.efficientnet.MBConv",
        "torchvision.models.efficientnet.FusedMBConv"), _before_projection),
    BlockLayout("MNASNet inverted residual", of_class("torchvision.models.mnasnet._InvertedResidual"), "layers.5"),
    BlockLayout("timm EfficientNet/MobileNet block", of_class(
        "timm.models._efficientnet_blocks.InvertedResidual", "timm.models._efficientnet_blocks.DepthwiseSeparableConv",
        "timm.models._efficientnet_blocks.EdgeResidual"), "se"),
    BlockLayout("ConvNeXt block", of_class("torchvision.models.convnext.CNBlock"), "stochastic_depth"),
    BlockLayout("timm ConvNeXt block", of_class("timm.models.convnext.ConvNeXtBlock"), "drop_path"),
    BlockLayout("RegNet block", of_class("torchvision.models.regnet.ResBottleneckBlock"), "f.c", ("f.b",)),
    BlockLayout("timm RegNet block", of_class("timm.models.regnet.Bottleneck"), "conv3"),
    BlockLayout("Res2Net block", of_class("timm.models.res2net.Bottle2neck"), "bn3"),
    BlockLayout("DLA block", of_class("timm.models.dla.DlaBasic"), "bn2"),
    BlockLayout("DLA bottleneck", of_class("timm.models.dla.DlaBottleneck", "timm.models.dla.DlaBottle2neck"), "bn3"),
    BlockLayout("CSPNet dark block", of_class("timm.models.cspnet.DarkBlock"), "conv2"),
    BlockLayout("CSPNet bottleneck", of_class("timm.models.cspnet.BottleneckBlock"), "conv3"),
    BlockLayout("ShuffleNetV2 block", of_class("torchvision.models.shufflenetv2.InvertedResidual"), "branch2",
                residual=False),
    BlockLayout("dense block", of_class("torchvision.models.densenet._DenseBlock", "timm.models.densenet.DenseBlock"), "",
                residual=False),
    BlockLayout("Inception module", of_class(
        "torchvision.models.googlenet.Inception", *(f"torchvision.models.inception.Inception{k}" for k in "ABCDE")), "",
        residual=False),
]


def register_block_layout(layout: BlockLayout) -> BlockLayout:
    """Add a block layout for attach(where="auto"); it is tried before the built-in ones."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"register_block_layout: expected a BlockLayout, got {type(layout).__name__}.")
    _LAYOUTS.insert(0, layout)
    return layout


def block_layouts() -> list[BlockLayout]:
    """The layouts attach(where="auto") knows, in the order they are tried."""
    return list(_LAYOUTS)


def layout_of(module: nn.Module) -> BlockLayout | None:
    """The first layout that describes `module`, or None."""
    return next((layout for layout in _LAYOUTS if layout.matches(module)), None)
