"""Where attach() puts attention: the sites of a network, each found by one rule, which the report names.

Rules for where="auto", in order:
1. the model declares its sites (a method `attention_sites(placement)`, as attnkit's LeNet does);
2. block layouts (layouts.py): every block of a known family, the module placed as its paper places it;
3. residual additions found in the torch.fx graph: the attention follows the layer that ends the branch, before the
   addition (for networks of unknown blocks);
4. stage outputs: the last layer at each resolution (for networks without residual connections).
Modules placed before every convolution (GCT) take, after rule 1, every 2-D convolution that runs once, in any network.
Channel counts and stages come from one measured forward pass (probe.py), never from the layers' attributes.
"""
from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..hooks import evaluating
from ..modules.base import is_attention_module
from .layouts import BlockLayout, layout_of
from .probe import Measured

__all__ = ["Site", "auto_sites", "named_sites"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NOT_STAGE_OUTPUTS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.Dropout,
                      nn.Dropout2d, nn.Identity, nn.Flatten, nn.Linear, nn.Upsample)
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class Site:
    """One place for a module: the layer whose output it follows (or, for SK, the convolution it replaces and the
    layers that become Identity, relative to `holder`), where it is registered, its channels and stage (1-based, a
    stage ending at each change of resolution), and the rule that found it."""

    site: str
    holder: str
    channels: int
    stage: int
    rule: str
    replaces: tuple[str, ...] = ()


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def parent(path: str) -> str:
    return path.rpartition(".")[0]


def holder_of(model: nn.Module, path: str, site: str) -> str:
    """Where the module for `site` is registered: `path` or its nearest ancestor that is not a container (a child added
    to a Sequential would run as one of its layers); in a network made of containers only, the gated layer itself."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        candidate = ".".join(parts[:i])
        if not isinstance(model.get_submodule(candidate), _CONTAINERS):
            return candidate
    if isinstance(model.get_submodule(site), _CONTAINERS):
        raise ValueError(f"attach: {site!r} and all its ancestors are containers (Sequential, ModuleList, ModuleDict), "
                         f"where a new child would run as a layer; name a layer inside {site!r}.")
    return site


def _stages(resolutions: Sequence[tuple[int, ...] | None]) -> list[int]:
    """1-based stage of each entry, in order: a new stage at each change of resolution."""
    stages, stage, previous = [], 0, None
    for resolution in resolutions:
        if resolution != previous:
            stage, previous = stage + 1, resolution
        stages.append(stage)
    return stages


# ---------------------------------------------------------------------------------------------- 2. block layouts
def blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockLayout]]:
    """The blocks of known families, outermost first (a block inside a matched block is not matched again)."""
    found: list[tuple[str, nn.Module, BlockLayout]] = []
    for path, module in model.named_modules():
        if any(path.startswith(outer + ".") for outer, _, _ in found if outer) or (found and found[0][0] == ""):
            continue
        layout = layout_of(module)
        if layout is not None:
            found.append((path, module, layout))
    return found


def _last_spatial_conv(block: nn.Module) -> str | None:
    """The path, in `block`, of its last convolution with a kernel larger than 1×1 (a bottleneck's 3×3, a basic block's
    second 3×3, an inverted residual's depthwise convolution); None if it has none."""
    convs = [path for path, m in block.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    return convs[-1] if convs else None


def _block_sites(model: nn.Module, measured: Measured, placement: str, position: str) -> list[Site]:
    ran = [(p, b, layout) for p, b, layout in blocks(model) if measured.resolution(p) is not None]
    resolutions = [measured.resolution(p) for p, _, _ in ran]
    sites = []
    for i, ((path, block, layout), stage) in enumerate(zip(ran, _stages(resolutions))):
        rule = f"block layout: {layout.name}"
        if placement == "stage":  # before every downsampling: the last block at each resolution but the last
            if i + 1 < len(ran) and resolutions[i + 1] != resolutions[i]:
                sites.append(Site(path, holder_of(model, path, path), measured.channels(path), stage, rule))
        elif placement in ("conv", "after_conv"):
            conv = layout.conv_site(block)
            if conv is not None and placement == "conv":
                sites.append(Site(join(path, conv[0]), path, measured.channels(join(path, conv[0])), stage, rule, conv))
            elif conv is not None:  # after the convolution and the layers that belong to it (its BN)
                site = join(path, conv[-1])
                sites.append(Site(site, holder_of(model, path, site), measured.channels(site), stage, rule))
        elif placement == "before_norm":
            conv = _last_spatial_conv(block)
            site = join(path, conv or "")
            if conv is not None and measured.calls.get(site) == 1:
                sites.append(Site(site, holder_of(model, path, site), measured.channels(site), stage, rule))
        else:
            relative = "" if position == "output" else layout.gate_site(block)
            if relative is not None:
                site = join(path, relative)
                channels = measured.channels(site)
                if channels is not None and measured.calls.get(site) == 1:
                    sites.append(Site(site, holder_of(model, path if relative else site, site), channels, stage, rule))
    return sites


# ---------------------------------------------------------------------------------------------- 3. traced additions
def _ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node `node` is computed from (a walk back through the graph, without recursion: graphs run deep)."""
    found: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        parent = todo.pop()
        if parent not in found:
            found.add(parent)
            todo.extend(parent.all_input_nodes)
    return found


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_residual_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    shapes = {_shape(a) for a in node.args[:2]} | {_shape(node)}
    return len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 4


def _branch_end(add: fx.Node) -> fx.Node:
    """The input of a residual addition that is the branch (the other is the shortcut): the one computed from the other,
    or, when both are computed from the block's input, the one with more layers of its own."""
    a, b = add.args[:2]
    before_a, before_b = _ancestors(a), _ancestors(b)
    if a in before_b:
        return b
    if b in before_a:
        return a
    layers = [sum(n.op == "call_module" for n in nodes | {end}) for nodes, end in ((before_a - before_b, a), (before_b - before_a, b))]
    return a if layers[0] >= layers[1] else b


def _producing_layer(node: fx.Node, shape: tuple[int, ...]) -> str | None:
    """The layer whose output `node` is, looking back through element-wise steps (a layer scale, a drop path done by a
    function) that keep `shape`."""
    while node.op != "call_module" or _shape(node) != shape:
        same = [n for n in node.all_input_nodes if _shape(n) == shape]
        if node.op in ("placeholder", "get_attr") or not same:
            return None
        node = same[0]
    return node.target


def _traced_sites(model: nn.Module, measured: Measured) -> list[Site] | None:
    """Sites before the residual additions of the traced graph; None when torch.fx cannot trace the model."""
    try:
        graph_module = fx.symbolic_trace(model)
        with evaluating(model), torch.no_grad():
            ShapeProp(graph_module).propagate(measured.example)
    except Exception:  # data-dependent control flow, or ops fx cannot follow: the next rule applies
        return None
    paths: list[str] = []
    for node in graph_module.graph.nodes:
        if _is_residual_add(node):
            path = _producing_layer(_branch_end(node), _shape(node))
            if path is not None and path not in paths and measured.calls.get(path) == 1:
                paths.append(path)
    stages = _stages([measured.resolution(p) for p in paths])
    return [Site(p, holder_of(model, parent(p), p), measured.channels(p), s, "residual addition (traced)")
            for p, s in zip(paths, stages)]


# ---------------------------------------------------------------------------------------------- 4. stage outputs
def _stage_output_sites(model: nn.Module, measured: Measured) -> list[Site]:
    layers = [p for p in measured.leaves if measured.resolution(p) is not None and measured.calls.get(p) == 1
              and not isinstance(model.get_submodule(p), _NOT_STAGE_OUTPUTS)]
    stages = _stages([measured.resolution(p) for p in layers])
    last = {stage: path for path, stage in zip(layers, stages)}  # the last layer of each stage
    return [Site(p, holder_of(model, parent(p), p), measured.channels(p), s, "stage output") for s, p in sorted(last.items())]


# ---------------------------------------------------------------------------------------------- before convolutions
def _convolution_input_sites(model: nn.Module, measured: Measured) -> list[Site]:
    """Before each 2-D convolution that runs once on an N×C×H×W map, outside attention modules, in the order they ran;
    the site is the convolution, its channels and stage those of its input."""
    inside = tuple(path + "." for path, m in model.named_modules() if path and is_attention_module(m))
    convs = [p for p in measured.leaves if isinstance(model.get_submodule(p), nn.Conv2d) and measured.calls.get(p) == 1
             and measured.input_channels(p) is not None and not p.startswith(inside)]
    stages = _stages([measured.input_resolution(p) for p in convs])
    return [Site(p, holder_of(model, parent(p), p), measured.input_channels(p), stage, "before each convolution")
            for p, stage in zip(convs, stages)]


# ---------------------------------------------------------------------------------------------- where="auto"
def auto_sites(model: nn.Module, placement: str, position: str, first_stage: int,
               measure: Callable[[], Measured]) -> list[Site]:
    """The sites of where="auto" for a module of `placement` (attnkit.modules.base.PLACEMENTS)."""
    declared = getattr(model, "attention_sites", None)
    if callable(declared):
        return [Site(*entry[:4], "declared by the model", *entry[4:]) for entry in declared(placement)]
    measured = measure()
    if placement == "before_conv":
        return _convolution_input_sites(model, measured)
    if blocks(model):
        sites = _block_sites(model, measured, placement, position)
    elif placement in ("conv", "after_conv", "before_norm"):
        raise ValueError(
            f"attach(where='auto'): a module that replaces or follows a block's 3×3 convolution needs blocks attnkit "
            f"knows, and "
            f"{type(model).__name__} has none of them (attnkit.block_layouts() lists them; register yours with "
            f"attnkit.register_block_layout)."
        )
    elif position == "output":
        raise ValueError(
            f"attach(where='auto', position='output') gates the output of whole blocks, and {type(model).__name__} has "
            f"no blocks attnkit knows; use position='residual' (before each residual addition) or name the sites."
        )
    else:
        sites = _traced_sites(model, measured) or _stage_output_sites(model, measured)
        if placement == "stage":  # before every downsampling: the sites at the end of each stage but the last
            last = {s.stage: s for s in sites}
            sites = [last[stage] for stage in sorted(last)][:-1]
    return [s for s in sites if placement != "block" or s.stage >= first_stage]


# ---------------------------------------------------------------------------------------------- named sites
def named_sites(model: nn.Module, where: str | Sequence[str], position: str, channels: Callable[[str], int]) -> list[Site]:
    """The sites named by a list of module names or a regular expression; with position 'residual'/'output', the named
    modules are blocks of known families and the sites are where their layout puts attention."""
    paths = [p for p, _ in model.named_modules() if p]
    if isinstance(where, str):
        chosen = [p for p in paths if re.fullmatch(where, p)]
        if not chosen:
            raise ValueError(f"attach: the pattern {where!r} matches no module of {type(model).__name__}.")
    else:
        chosen = list(where)
        for name in chosen:
            if name not in paths:
                match = difflib.get_close_matches(name, paths, n=3)
                raise ValueError(f"attach: {type(model).__name__} has no module {name!r}."
                                 + (f" Close names: {', '.join(match)}." if match else ""))
    sites = []
    for path in chosen:
        module = model.get_submodule(path)
        if position in ("residual", "output"):
            layout = layout_of(module)
            if layout is None:
                raise ValueError(
                    f"attach: position={position!r} places attention inside blocks of known families, but {path!r} is a "
                    f"{type(module).__name__}; use position='after' to gate a module's output, or describe the block "
                    f"with attnkit.register_block_layout."
                )
            relative = "" if position == "output" else layout.gate_site(module)
            if relative is None:
                raise ValueError(f"attach: {path!r} ({layout.name}) takes no attention inside (no expansion).")
            site = join(path, relative)
            sites.append(Site(site, holder_of(model, path if relative else site, site), channels(site), 0, "named block"))
        else:
            sites.append(Site(path, holder_of(model, parent(path), path), channels(path), 0, "named"))
    return sites
