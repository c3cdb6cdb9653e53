"""Put attention modules into existing networks: attach(), identity start, and load_pretrained().

attach() never renames an existing parameter. An inserted module becomes a new child of the block that
holds it (`layer1.0.attn`), and the module whose output it gates (the "site", e.g. `layer1.0.bn3`) gets
a subclass of its own class whose forward applies the gate after the original forward. So torchvision
and timm checkpoints load unchanged, and torch.fx, torch.compile and torch.export see the gate.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import registry

__all__ = [
    "attach",
    "AttachReport",
    "AttachedSite",
    "IdentityStart",
    "gates_of",
    "load_pretrained",
    "LoadReport",
    "parse_placement",
    "with_gates_of",
]

POSITIONS = ("auto", "residual", "output", "after")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class IdentityStart(nn.Module):
    """y = x + α·(f(x) − x) with a learnable scalar α that starts at 0: the wrapped module computes exactly
    the identity at initialisation, so a pretrained network keeps its outputs until α trains."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha.to(x.dtype) * (self.module(x) - x)


# ---------------------------------------------------------------------------------------------- sites
@dataclass
class _Site:
    site: str  # the module whose output is gated, or the 3×3 conv that SK replaces
    holder: str  # the module the attention is registered in
    channels: int
    stage: int
    replaces: tuple[str, ...] = ()  # for SK: the conv and the BN it takes the place of


def _is_residual_block(m: nn.Module) -> bool:
    """torchvision's and timm's ResNet BasicBlock/Bottleneck, and attnkit's backbones' blocks."""
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample"))


def _is_inverted_residual(m: nn.Module) -> bool:
    """torchvision's MobileNetV2 InvertedResidual (and attnkit's, which shares its layout)."""
    return isinstance(getattr(m, "conv", None), nn.Sequential) and hasattr(m, "use_res_connect")


def _downsamples(block: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in block.modules())


def _own_channels(module: nn.Module) -> int | None:
    for m in [module, *reversed(list(module.modules()))]:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    return None


def _channels(module: nn.Module) -> int:
    """The channel count of a module's output: its own, or that of its last BatchNorm or convolution."""
    channels = _own_channels(module)
    if channels is None:
        raise ValueError(f"attach: cannot tell the channel count of {type(module).__name__} (no BatchNorm or Conv2d inside).")
    return channels


def _channels_at(model: nn.Module, path: str) -> int:
    """Channels at a named site; for a parameter-free layer (ReLU, pooling) in a Sequential, those of the
    nearest layer before it that has them."""
    channels = _own_channels(model.get_submodule(path))
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if channels is None and isinstance(parent, nn.Sequential):
        names = [name for name, _ in parent.named_children()]
        for name in reversed(names[: names.index(leaf)]):
            channels = _own_channels(parent.get_submodule(name))
            if channels is not None:
                break
    if channels is None:
        raise ValueError(
            f"attach: cannot tell how many channels {path!r} ({type(model.get_submodule(path)).__name__}) outputs; "
            f"name a convolution or BatchNorm instead."
        )
    return channels


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if _is_residual_block(m) or _is_inverted_residual(m)]


def _stage_index(blocks: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """1-based stage of each block: a new stage starts at every block that downsamples."""
    stages, stage = {}, 1
    for i, (path, block) in enumerate(blocks):
        if i and _downsamples(block):
            stage += 1
        stages[path] = stage
    return stages


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _branch_end(path: str, block: nn.Module) -> str | None:
    """Where a gate goes inside a block: after the residual branch's last BN (before the addition), or,
    in an inverted residual with expansion, after the depthwise convolution."""
    if _is_residual_block(block):
        return _join(path, "bn3" if hasattr(block, "bn3") else "bn2")
    if len(block.conv) == 4:  # expand 1×1, depthwise 3×3, project 1×1, BN; expand ratio 1 has 3 layers
        return _join(path, "conv.1")
    return None


def _auto_sites(model: nn.Module, placement: str, position: str, first_stage: int) -> list[_Site]:
    declared = getattr(model, "attention_sites", None)
    if callable(declared):
        return [_Site(*entry) for entry in declared(placement)]
    blocks = _blocks(model)
    if not blocks:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"attach(where='auto') found no residual or inverted-residual blocks in {type(model).__name__} "
            f"(it knows torchvision's and timm's ResNet and MobileNetV2 blocks and attnkit's backbones); the "
            f"model contains: {', '.join(kinds)}. Name the sites by hand, e.g. "
            f"attach(model, spec, where=['features.3', 'features.6']) to insert after those modules, or a "
            f"regular expression such as where=r'layer\\d\\.\\d+\\.bn2'."
        )
    stages = _stage_index(blocks)
    sites = []
    for i, (path, block) in enumerate(blocks):
        stage = stages[path]
        if placement == "stage":  # BAM: at each bottleneck of the network, i.e. before every downsampling
            if i + 1 < len(blocks) and _downsamples(blocks[i + 1][1]):
                sites.append(_Site(path, path, _channels(block), stage))
        elif placement == "conv":  # SK: in place of the block's 3×3 convolution and its BN
            sites += _conv_sites(path, block, stage)
        elif stage >= first_stage:
            if position == "output":
                sites.append(_Site(path, path, _channels(block), stage))
            else:
                site = _branch_end(path, block)
                if site is not None:
                    sites.append(_Site(site, path, _channels(model.get_submodule(site)), stage))
    return sites


def _conv_sites(path: str, block: nn.Module, stage: int) -> list[_Site]:
    if _is_residual_block(block):
        conv, bn = ("conv2", "bn2") if hasattr(block, "conv3") else ("conv1", "bn1")
        return [_Site(_join(path, conv), path, block.get_submodule(conv).out_channels, stage, (conv, bn))]
    if len(block.conv) == 4:
        return [_Site(_join(path, "conv.1"), path, _channels(block.conv[1]), stage, ("conv.1",))]
    return []


def _named_sites(model: nn.Module, where: str | Sequence[str], position: str) -> list[_Site]:
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
                raise ValueError(
                    f"attach: {type(model).__name__} has no module {name!r}."
                    + (f" Close names: {', '.join(match)}." if match else "")
                )
    sites = []
    for path in chosen:
        module = model.get_submodule(path)
        if position in ("residual", "output"):
            if not (_is_residual_block(module) or _is_inverted_residual(module)):
                raise ValueError(
                    f"attach: position={position!r} needs residual blocks, but {path!r} is a "
                    f"{type(module).__name__}; use position='after' to gate a module's output."
                )
            site = path if position == "output" else _branch_end(path, module)
            if site is None:
                raise ValueError(f"attach: {path!r} has no expansion, so no place before its residual addition.")
            sites.append(_Site(site, path, _channels(model.get_submodule(site)), 0))
        else:
            sites.append(_Site(path, _holder_of(model, path), _channels_at(model, path), 0))
    return sites


def _holder_of(model: nn.Module, path: str) -> str:
    """The nearest ancestor of `path` that is not a container (adding a child to a Sequential changes it)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[:i])
        if not isinstance(model.get_submodule(candidate), _CONTAINERS):
            return candidate
    return ""


# ---------------------------------------------------------------------------------------------- insertion
_GATED_CLASSES: dict[type, type] = {}


def _gated_class(base: type) -> type:
    """A subclass of `base` whose forward applies the module's `_attnkit_gates` to the original output."""
    if base not in _GATED_CLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            out = base.forward(self, *args, **kwargs)
            for gate in self._attnkit_gates:
                out = gate(out)
            return out

        _GATED_CLASSES[base] = type(base.__name__, (base,), {"forward": forward, "__module__": __name__})
    return _GATED_CLASSES[base]


def gates_of(module: nn.Module) -> list[nn.Module]:
    """The attention modules attach() applies after `module`'s output (empty if none)."""
    return list(module.__dict__.get("_attnkit_gates", ()))


def with_gates_of(source: nn.Module, replacement: nn.Module) -> nn.Module:
    """`replacement`, made to apply the gates that follow `source` (when a gated layer is swapped, e.g. a BN
    folded into its convolution becomes an Identity that still gates)."""
    gates = gates_of(source)
    if gates:
        replacement.__class__ = _gated_class(type(replacement))
        replacement.__dict__["_attnkit_gates"] = gates
    return replacement


def _free_name(holder: nn.Module, base: str = "attn") -> str:
    taken = dict(holder.named_children())
    if base not in taken and not hasattr(holder, base):
        return base
    i = 1
    while f"{base}{i}" in taken or hasattr(holder, f"{base}{i}"):
        i += 1
    return f"{base}{i}"


def _gate_after(model: nn.Module, site: _Site, module: nn.Module) -> str:
    holder = model.get_submodule(site.holder)
    target = model.get_submodule(site.site)
    name = _free_name(holder)
    holder.add_module(name, module)
    if "_attnkit_gates" not in target.__dict__:
        target.__class__ = _gated_class(type(target))
        target.__dict__["_attnkit_gates"] = []
    target.__dict__["_attnkit_gates"].append(module)
    return _join(site.holder, name)


def _replace(model: nn.Module, site: _Site, module: nn.Module) -> str:
    holder = model.get_submodule(site.holder)
    first, *rest = site.replaces
    parent_path, _, leaf = _join(site.holder, first).rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, leaf, module)
    for name in rest:  # SK has its own BN and activation per path
        setattr(holder, name, nn.Identity())
    return _join(site.holder, first)


# ---------------------------------------------------------------------------------------------- report
def parse_placement(text: str) -> dict[str, Any]:
    """attach() keyword arguments from a placement string, as the CLI's --where takes it.

    Entries are separated by ';': `position=residual|output|after`, `stages=2,3`, and a bare entry that is
    attach()'s `where` ("auto", a regular expression, or comma-separated module names). Examples: "auto",
    "position=output", "stages=3", "position=output;stages=2,3", "layer4.*.bn2".
    """
    placement: dict[str, Any] = {"where": "auto"}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        key, eq, value = entry.partition("=")
        key = key.strip()
        if not eq:
            names = [n.strip() for n in entry.split(",")]
            placement["where"] = entry if len(names) == 1 else names
        elif key == "position":
            placement["position"] = value.strip()
        elif key == "stages":
            try:
                placement["stages"] = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"placement {text!r}: stages takes 1-based stage numbers such as stages=2,3, got {value!r}.") from None
        else:
            raise ValueError(
                f"placement {text!r}: unknown key {key!r}; expected position=..., stages=..., or a bare module "
                f"pattern such as 'auto' or 'layer3.*.bn2'.{registry.did_you_mean(key, ('position', 'stages'))}"
            )
    return placement


@dataclass
class AttachedSite:
    """One inserted module: where it is registered, what it gates (or replaces), its channels and parameters."""

    module: str
    after: str
    channels: int
    params: int


@dataclass
class AttachReport:
    """What attach() did; `str(report)` is a table."""

    spec: str
    sites: list[AttachedSite] = field(default_factory=list)
    params_removed: int = 0

    @property
    def params_added(self) -> int:
        return sum(s.params for s in self.sites) - self.params_removed

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def __str__(self) -> str:
        rows = [("module", "after", "channels", "params")]
        rows += [(s.module, s.after, str(s.channels), f"{s.params:,}") for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.append(f"{self.spec}: {len(self.sites)} sites, {self.params_added:+,} parameters")
        return "\n".join(lines)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attach(
    model: nn.Module,
    spec: str,
    where: str | Sequence[str] = "auto",
    *,
    position: str = "auto",
    stages: Iterable[int] | None = None,
    identity_init: bool = False,
    allow_multiple: bool = False,
    **kwargs: Any,
) -> AttachReport:
    """Insert the attention module `spec` into `model` in place and report each site.

    Args:
        model: any nn.Module; modified in place.
        spec: a registry spec ("se", "cbam(reduction=8)").
        where: "auto" places the module as its paper does (after the last BN of each residual block,
            before the addition; after the depthwise conv of expanded inverted-residual blocks; BAM before
            each downsampling; SK in place of the 3×3 conv). Otherwise a list of module names, or a regular
            expression matched against module names.
        position: for "auto" and named blocks, "residual" (before the addition; the default) or "output"
            (after the addition); "after" gates the output of each named module (the default for names).
        stages: with "auto", only blocks in these 1-based stages (a stage ends at each downsampling).
        identity_init: wrap every inserted module in IdentityStart so the network's function is unchanged.
        allow_multiple: allow a second module at a site that already has one.
        **kwargs: passed to the module's constructor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach: `model` must be an nn.Module, got {type(model).__name__}.")
    if position not in POSITIONS:
        raise ValueError(f"attach: `position` must be one of {list(POSITIONS)}, got {position!r}.")
    name, spec_kwargs = registry.parse_spec(spec)
    factory = registry.get_module_class(name)
    placement = getattr(factory, "placement", "block")
    if where == "auto":
        if position == "after":
            raise ValueError("attach: position='after' needs named sites (where=[...]); 'auto' finds blocks.")
        sites = _auto_sites(model, placement, position, getattr(factory, "first_stage", 1))
        if stages is not None:
            wanted = set(stages)
            sites = [s for s in sites if s.stage in wanted]
    else:
        if placement == "conv":
            raise ValueError(f"attach: {name!r} replaces a convolution; use where='auto' to place it.")
        sites = _named_sites(model, where, "after" if position == "auto" else position)
    if not sites:
        raise ValueError(f"attach: no site for {spec!r} in {type(model).__name__} with where={where!r}, stages={stages!r}.")
    if placement == "conv" and identity_init:
        raise ValueError(f"attach: {name!r} replaces a convolution, so it has no identity start.")
    if not allow_multiple:
        for s in sites:
            if gates_of(model.get_submodule(s.site)):
                raise ValueError(
                    f"attach: {s.site!r} already has an attention module; pass allow_multiple=True to add another."
                )

    report = AttachReport(spec)
    for s in sites:
        if placement == "conv":
            conv = model.get_submodule(s.site)
            conv = conv[0] if isinstance(conv, nn.Sequential) else conv
            options = {"out_channels": conv.out_channels, "stride": conv.stride[0], "groups": conv.groups, **spec_kwargs, **kwargs}
            module = registry.get_module_class(name)(conv.in_channels, **options)
            report.params_removed += sum(_count(model.get_submodule(_join(s.holder, r))) for r in s.replaces)
            path = _replace(model, s, module)
        else:
            module = registry.create(spec, s.channels, **kwargs)
            if identity_init:
                module = IdentityStart(module)
            path = _gate_after(model, s, module)
        report.sites.append(AttachedSite(path, s.site, s.channels, _count(module)))
    return report


# ---------------------------------------------------------------------------------------------- weights
@dataclass
class LoadReport:
    """What load_pretrained() did with each key."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing from the checkpoint ({len(self.missing)}, left as initialised): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"in the checkpoint but not the model ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, want, got in self.mismatched:
            lines.append(f"shape mismatch, not loaded: {key}: model {want}, checkpoint {got}")
        return "\n".join(lines)


def _read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"load_pretrained: no checkpoint file at {str(path)!r}.")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for damaged or unsafe files
            raise ValueError(
                f"load_pretrained: cannot read {str(path)!r} as a weights-only PyTorch checkpoint: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from error
        source = str(path)
    else:
        source = "the given state dict"
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"load_pretrained: expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}.")
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"load_pretrained: {source} contains no tensors.")
    if all(k.startswith("module.") for k in tensors):  # DataParallel / DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, source


def load_pretrained(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load the tensors of `checkpoint` whose names and shapes match `model`, and report every other key.

    `checkpoint` is a state dict, a checkpoint dict holding one under 'state_dict' or 'model', or a file
    (read with torch.load(weights_only=True), so it cannot run code). A checkpoint none of whose weights (those of
    the convolutions and linear layers) match is an error, even if biases or BatchNorm's counters do: it comes from
    another architecture.
    """
    tensors, source = _read_state_dict(checkpoint)
    own = model.state_dict()
    report = LoadReport()
    matched = {}
    for key, value in tensors.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append((key, tuple(own[key].shape), tuple(value.shape)))
        else:
            matched[key] = value
    weights = {name for name, p in model.named_parameters() if p.ndim >= 2}  # convolutions' and linear layers'
    if not matched.keys() & weights:  # biases and BatchNorm counters have the same names and shapes in many networks
        only = f" (only {len(matched)} biases, norms and buffers do, such as {next(iter(matched))})" if matched else ""
        raise ValueError(
            f"load_pretrained: no weight of {source} matches {type(model).__name__} by name and shape{only}; it is "
            f"from another architecture. Checkpoint keys start: {', '.join(list(tensors)[:3])}; model keys "
            f"start: {', '.join(list(own)[:3])}."
        )
    model.load_state_dict(matched, strict=False)
    report.loaded = list(matched)
    report.missing = [k for k in own if k not in tensors]
    return report
