"""attach(): insert an attention module into an existing network, in place, and report each site."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import registry
from ..modules.base import init_in_network, placement_of
from .endings import end_in_gates
from .gating import gate_after, gate_before, gates_before, gates_of
from .probe import Measured, measure
from .sites import Site, auto_sites, join, named_sites

__all__ = ["AttachReport", "AttachedSite", "IdentityStart", "INITS", "attach", "parse_placement"]

POSITIONS = ("auto", "residual", "output", "after", "before")
#: "paper": each inserted module re-initialised as its official network code does (the module's init_in_network);
#: "pytorch": left as its layers' constructors made it
INITS = ("paper", "pytorch")


class IdentityStart(nn.Module):
    """y = x + α·(f(x) − x) with a learnable scalar α that starts at 0: the wrapped module computes exactly the identity
    at initialisation, so a pretrained network keeps its outputs until α trains."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha.to(x.dtype) * (self.module(x) - x)


def parse_placement(text: str) -> dict[str, Any]:
    """attach() keyword arguments from a placement string, as the CLI's --where takes it.

    Entries are separated by ';': `position=residual|output|after|before`, `stages=2,3`, `every=2`, and a bare entry
    that is attach()'s `where` ("auto", a regular expression, or comma-separated module names). Examples: "auto",
    "position=output", "stages=3", "position=output;stages=2,3;every=2", "layer4.*.bn2".
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
        elif key == "every":
            try:
                placement["every"] = int(value)
            except ValueError:
                raise ValueError(f"placement {text!r}: every takes a positive integer such as every=2, got {value!r}.") from None
        elif key == "stages":
            try:
                placement["stages"] = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"placement {text!r}: stages takes 1-based stage numbers such as stages=2,3, got {value!r}.") from None
        else:
            raise ValueError(
                f"placement {text!r}: unknown key {key!r}; expected position=..., stages=..., every=..., or a bare "
                f"module pattern such as 'auto' or 'layer3.*.bn2'.{registry.did_you_mean(key, ('position', 'stages', 'every'))}"
            )
    return placement


@dataclass
class AttachedSite:
    """One inserted module: where it is registered, the layer whose output it gates (or whose input, with `position`
    "before"; or that it replaces), its channels and parameters, and the rule that found the site."""

    module: str
    after: str
    channels: int
    params: int
    rule: str = ""
    position: str = "after"


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

    def __iter__(self) -> Iterator[AttachedSite]:
        return iter(self.sites)

    def __str__(self) -> str:
        rows = [("module", "after", "channels", "params", "found by")]
        rows += [(s.module, s.after if s.position == "after" else f"(before) {s.after}", str(s.channels),
                  f"{s.params:,}", s.rule) for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        lines.append(f"{self.spec}: {len(self.sites)} sites, {self.params_added:+,} parameters")
        return "\n".join(lines)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _free_name(holder: nn.Module, base: str = "attn") -> str:
    taken = dict(holder.named_children())
    i = 0
    while (name := base if i == 0 else f"{base}{i}") in taken or hasattr(holder, name):
        i += 1
    return name


def _like(module: nn.Module, *references: nn.Module) -> nn.Module:
    """`module` on the device and in the floating dtype of the first reference that has a floating tensor, and in the
    mode of the first reference."""
    tensor = next((t for r in references for t in (*r.parameters(), *r.buffers()) if t.is_floating_point()), None)
    if tensor is not None:
        module.to(device=tensor.device, dtype=tensor.dtype)
    return module.train(references[0].training)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path), leaf, module)


def _replace(model: nn.Module, site: Site, module: nn.Module) -> str:
    """Put `module` in place of the site's convolution; the layers it makes redundant become Identity."""
    first, *rest = site.replaces
    _set(model, join(site.holder, first), module)
    for name in rest:  # SK has its own BN and activation per path
        _set(model, join(site.holder, name), nn.Identity())
    return join(site.holder, first)


def _given(channels: int | Mapping[str, int] | None, path: str) -> int | None:
    return channels if isinstance(channels, int) else (channels or {}).get(path)


def _measured_input_channels(model: nn.Module, measured: Measured, path: str) -> int:
    """The channels of `path`'s input in the measured pass; a clear error where it has none to give."""
    runs = measured.calls.get(path, 0)
    found = measured.input_channels(path) if runs == 1 else None
    if found is None:
        what = ("never runs in an eval-mode forward pass" if runs == 0 else f"runs {runs} times in one forward pass" if
                runs > 1 else f"takes {measured.input_shapes.get(path, 'no tensor')}, not an N×C×H×W map")
        raise ValueError(f"attach: {path!r} ({type(model.get_submodule(path)).__name__}) {what}; name a layer that runs "
                         f"once on a feature map to gate its input, or pass channels={{{path!r}: C}}.")
    return found


def _measured_channels(model: nn.Module, measured: Measured, path: str) -> int:
    """The channels of `path`'s output in the measured pass; a clear error where it has none to give."""
    runs = measured.calls.get(path, 0)
    if runs > 1:
        raise ValueError(f"attach: {path!r} runs {runs} times in one forward pass (a shared module), so a gate after it "
                         f"would follow every call; name a layer that runs once.")
    found = measured.channels(path)
    if found is None:
        what = "never runs in an eval-mode forward pass" if runs == 0 else (
            f"outputs {measured.shapes[path] if path in measured.shapes else 'no tensor'}, not an N×C×H×W map")
        raise ValueError(f"attach: {path!r} ({type(model.get_submodule(path)).__name__}) {what}; name a layer that "
                         f"outputs a feature map, or pass channels={{{path!r}: C}}.")
    return found


def _every(sites: list[Site], every: object) -> list[Site]:
    """In each stage, the last site and every `every`-th one counted back from it."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"attach: `every` must be a positive integer (1: every site, 2: every other), got {every!r}.")
    kept = []
    for i, site in enumerate(sites):
        after = sum(1 for later in sites[i + 1:] if later.stage == site.stage)  # sites after this one in its stage
        if after % every == 0:
            kept.append(site)
    return kept


def _check_channels(channels: object) -> None:
    if channels is None:
        return
    values = channels.values() if isinstance(channels, Mapping) else [channels]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in values):
        raise TypeError(f"attach: `channels` must be a positive int or a mapping of site names to positive ints, got "
                        f"{channels!r}.")


def attach(
    model: nn.Module,
    spec: str,
    where: str | Sequence[str] = "auto",
    *,
    position: str = "auto",
    stages: Iterable[int] | None = None,
    every: int | None = None,
    identity_init: bool = False,
    init: str = "paper",
    allow_multiple: bool = False,
    channels: int | Mapping[str, int] | None = None,
    example_input: Tensor | None = None,
    **kwargs: Any,
) -> AttachReport:
    """Insert the attention module `spec` into `model` in place and report each site.

    Args:
        model: any nn.Module; modified in place. Its parameters keep their names; each new module is a new child.
        spec: a registry spec ("se", "cbam(reduction=8)").
        where: "auto" places the module as its paper does in every block of the families attnkit knows
            (attnkit.block_layouts(): after the last BN of a residual branch, before the addition; after the depthwise
            stage of an inverted residual; ...), and in other networks before each residual addition of the traced
            graph, or else at each stage's output; BAM before each downsampling, SK in place of the 3×3 convolution,
            GCT before every convolution.
            Otherwise a list of module names, or a regular expression matched against module names.
        position: for "auto" and named blocks, "residual" (inside the block, as its layout says) or "output" (after
            the block); "after" gates the output of each named module (the default for names), "before" its input (the
            default for names with modules that go before convolutions, GCT). With "auto", the module's own
            `default_position` ("residual" for all but modules that go between blocks).
        stages: with "auto", only sites in these 1-based stages (a stage ends where the resolution changes); by
            default the module's `default_stages`, or every stage from its `first_stage` on.
        every: with "auto", in each stage the last site and every `every`-th one before it (2: every other block, as
            non-local blocks go); by default the module's `default_every` (1: every site).
        identity_init: wrap every inserted module in IdentityStart so the network's function is unchanged.
        init: "paper" re-initialises each inserted module as its paper's official network code does once the network
            is built (CBAM's spatial BN weight 0, Coordinate Attention's convolutions kaiming-normal, GE's and SK's
            Caffe fillers and BN momenta, ...: the module's `init_in_network`; README, "The modules and their
            defaults"); "pytorch" keeps PyTorch's initialisation. With identity_init, the wrapped module is the one
            initialised.
        allow_multiple: allow a second module at a site that already has one.
        channels: the channel count at the sites (an int for all, or {site: C}), instead of measuring it.
        example_input: an input the model takes, for the one forward pass (eval mode, no gradients) that measures the
            channel counts and stages; by default random 2×C×S×S images, S = 64, then other sizes until one runs.
        **kwargs: passed to the module's constructor.

    The new modules take the mode (train/eval), device and floating dtype of the layer they follow (or precede).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach: `model` must be an nn.Module, got {type(model).__name__}.")
    if position not in POSITIONS:
        raise ValueError(f"attach: `position` must be one of {list(POSITIONS)}, got {position!r}.")
    if init not in INITS:
        raise ValueError(f"attach: `init` must be 'paper' (as the official network code initialises the module) or "
                         f"'pytorch' (PyTorch's defaults), got {init!r}.")
    _check_channels(channels)
    name, spec_kwargs = registry.parse_spec(spec)
    factory = registry.get_module_class(name)
    placement = placement_of(factory)
    if placement == "conv" and identity_init:
        raise ValueError(f"attach: {name!r} replaces a convolution, so it has no identity start.")
    measured: Measured | None = None

    def measure_once() -> Measured:
        nonlocal measured
        if measured is None:
            measured = measure(model, example_input)
        return measured

    if where == "auto":
        if position in ("after", "before"):
            raise ValueError(f"attach: position={position!r} needs named sites (where=[...]); 'auto' finds blocks.")
        before = placement == "before_conv"
        if position == "auto":
            position = getattr(factory, "default_position", "residual")
        sites = auto_sites(model, placement, position, getattr(factory, "first_stage", 1), measure_once)
        stages = getattr(factory, "default_stages", None) if stages is None else stages
        if stages is not None:
            wanted = set(stages)
            sites = [s for s in sites if s.stage in wanted]
        sites = _every(sites, getattr(factory, "default_every", 1) if every is None else every)
        sites = [dataclasses.replace(s, channels=_given(channels, s.site) or s.channels) for s in sites]
    else:
        if placement == "conv":
            raise ValueError(f"attach: {name!r} replaces a convolution; use where='auto' to place it.")
        if position == "auto":
            position = "before" if placement == "before_conv" else "after"
        before = position == "before"
        measured_channels = _measured_input_channels if before else _measured_channels
        sites = named_sites(model, where, position,
                            lambda path: _given(channels, path) or measured_channels(model, measure_once(), path))
    if not sites:
        raise ValueError(f"attach: no site for {spec!r} in {type(model).__name__} with where={where!r}, stages={stages!r}.")
    if not allow_multiple:
        present = gates_before if before else gates_of
        for s in sites:
            if present(model.get_submodule(s.site)):
                raise ValueError(f"attach: {s.site!r} already has an attention module{' on its input' if before else ''}; "
                                 f"pass allow_multiple=True to add another.")

    report = AttachReport(spec)
    for s in sites:
        target = model.get_submodule(s.site)
        if placement == "conv":
            conv = target[0] if isinstance(target, nn.Sequential) else target
            options = {"out_channels": conv.out_channels, "stride": conv.stride[0], "groups": conv.groups}
            options = {k: v for k, v in options.items() if k not in spec_kwargs}  # the spec's own choices win
            module = registry.build(name, spec_kwargs, conv.in_channels, {**options, **kwargs})
            if init == "paper":
                init_in_network(module)
            _like(module, target)
            report.params_removed += sum(_count(model.get_submodule(join(s.holder, r))) for r in s.replaces)
            path = _replace(model, s, module)
        else:
            module = registry.build(name, spec_kwargs, s.channels, kwargs)
            if init == "paper":
                init_in_network(module)
            if identity_init:
                module = IdentityStart(module)
            holder = model.get_submodule(s.holder)
            _like(module, target, holder, model)
            child = _free_name(holder)
            holder.add_module(child, module)
            (gate_before if before else gate_after)(target, module)
            path = join(s.holder, child)
        report.sites.append(AttachedSite(path, s.site, s.channels, _count(module), s.rule, "before" if before else "after"))
    end_in_gates(model)
    return report
