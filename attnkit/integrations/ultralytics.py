"""Ultralytics YOLO: attnkit's modules as layers of a model yaml, and attach() into an existing YOLO model; both are kept
through Ultralytics' own rebuilds (train(), checkpoints), fuse(), val, predict and export. Importing this module
registers everything (register() does it again after more modules are registered):

    import attnkit.integrations.ultralytics as attnkit_yolo
    model = YOLO(attnkit_yolo.model_yaml("yolov8n-cbam.yaml"))     # `- [15, 1, CBAM, []]`: CBAM before Detect
    model = YOLO("yolov8n.pt")
    attnkit_yolo.attach(model, "cbam", where="backbone", identity_init=True)   # the pretrained weights kept

In a yaml, every attnkit module is a layer under its registry name and its class name (`cbam`, `CBAM`, `se`,
`SqueezeExcite`, ...); its channel count is measured from the layer before it when the model is built, so one yaml
serves every scale (n/s/m/l/x). Arguments are the module's own after the channel count, positionally or as a mapping:
`[-1, 1, CBAM, [8]]` is CBAM(C, reduction=8), `[-1, 1, CBAM, [{kernel_size: 3}]]` CBAM(C, kernel_size=3). `CBAM` in a
yaml means attnkit's CBAM once this module is imported (Ultralytics' own takes its channel count as an argument).
"""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules import block as yolo_blocks
import yaml
from ultralytics import __version__ as ultralytics_version
from ultralytics.utils import YAML
from ultralytics.utils.checks import check_yaml

from .. import registry
from .._paths import cache_dir
from ..hooks import evaluating
from ..surgery import AttachReport, gates_of
from ..surgery import attach as attach_into
from ..surgery.gating import gate_after
from ..surgery.probe import measure

__all__ = ["AttentionLayer", "attach", "model_yaml", "register"]

# the blocks where attach(where=...) puts attention: YOLO's CSP blocks (C2f in YOLOv8, C3k2 in YOLO11, C3 in YOLOv5)
BLOCKS = tuple(getattr(yolo_blocks, name) for name in ("C2f", "C3k2", "C3", "C3x", "C2fCIB", "A2C2f", "RepNCSPELAN4")
               if hasattr(yolo_blocks, name))


class AttentionLayer(nn.Module):
    """A YOLO yaml layer holding one attnkit module (`attn`), built for the channel count measured at its input when the
    model is built. Subclasses name the module (`spec`); register() makes one per registered module."""

    spec = ""

    def __init__(self, *args: Any) -> None:
        super().__init__()
        options = dict(args[-1]) if args and isinstance(args[-1], dict) else {}
        positional = args[:-1] if options else args
        factory = registry.get_module_class(self.spec)
        names = [p.name for p in list(inspect.signature(factory).parameters.values())[1:]
                 if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if len(positional) > len(names):
            raise ValueError(f"{type(self).__name__} in a YOLO yaml takes at most {len(names)} positional arguments "
                             f"({', '.join(names) or 'none'}) after the channel count, which is measured; got {list(args)}.")
        self.options = {**dict(zip(names, positional)), **options}
        registry.check_kwargs(self.spec, factory, self.options)
        self.attn: nn.Module | None = None

    def build(self, channels: int) -> None:
        self.attn = registry.build(self.spec, {}, channels, dict(self.options))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is None:  # built by the measuring pass of parse_model; built here if the layer is used alone
            self.build(x.shape[1])
            self.attn.to(device=x.device)
        return self.attn(x)


def _layer_class(name: str) -> type:
    factory = registry.get_module_class(name)
    class_name = factory.__name__ if isinstance(factory, type) else name
    cls = globals().get(class_name)
    if not (isinstance(cls, type) and issubclass(cls, AttentionLayer) and cls.spec == name):
        cls = type(class_name, (AttentionLayer,), {"spec": name, "__module__": __name__, "__qualname__": class_name,
                                                   "__doc__": f"attnkit's {name!r} as a YOLO yaml layer."})
        globals()[class_name] = cls  # importable, so that checkpoints holding it unpickle
    return cls


def _measure_layers(layers: nn.Sequential, in_channels: int) -> None:
    """Build the attention layers of a freshly parsed YOLO model: route a small input through it as YOLO's forward does,
    until every attention layer has seen its input."""
    pending = [m for m in layers.modules() if isinstance(m, AttentionLayer) and m.attn is None]
    if not pending:
        return
    outputs: list[Any] = []
    x: Any = torch.zeros(1, in_channels, 64, 64)
    with evaluating(layers), torch.no_grad():
        for layer in layers:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x)
            if all(m.attn is not None for m in pending):
                break
    for layer in layers:
        layer.np = sum(p.numel() for p in layer.parameters())


def _reattach(layers: nn.Sequential, entries: Sequence[dict]) -> None:
    """attach() again what attach() recorded in the yaml, so that Ultralytics' rebuilds keep it."""
    for entry in entries:
        where = [str(i) for i in entry["layers"]]
        attach_into(layers, entry["spec"], where=where, channels=dict(zip(where, entry["channels"])),
                      identity_init=entry.get("identity_init", False), allow_multiple=True, **entry.get("kwargs", {}))


_original_parse_model = tasks.parse_model
_original_fuse = tasks.BaseModel.fuse


def _parse_model(d: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    layers, save = _original_parse_model(d, ch, verbose)
    _measure_layers(layers, ch)
    _reattach(layers, d.get("attnkit", ()))
    return layers, save


class _Gated:
    """A forward set on an instance (Ultralytics' fuse sets `m.forward = m.forward_fuse`), followed by the gates."""

    def __init__(self, forward: Any, gates: list[nn.Module]) -> None:
        self.forward, self.gates = forward, gates

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.forward(*args, **kwargs)
        for gate in self.gates:
            out = gate(out)
        return out


def _fuse(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Ultralytics' fuse(), keeping the gates attach() put after a folded BatchNorm (they move to the fused
    convolution) or after a layer whose forward fuse() replaces."""
    gated_norms = [(m, m.bn, gates_of(m.bn)) for m in self.modules() if gates_of(getattr(m, "bn", nn.Identity()))]
    fused = _original_fuse(self, *args, **kwargs)
    for m, norm, gates in gated_norms:
        if getattr(m, "bn", None) is not norm:  # folded into m.conv
            for gate in gates:
                gate_after(m.conv, gate)
    for m in self.modules():
        if gates_of(m) and "forward" in m.__dict__ and not isinstance(m.__dict__["forward"], _Gated):
            m.forward = _Gated(m.__dict__["forward"], gates_of(m))
    return fused


def register() -> None:
    """Make every registered attnkit module a YOLO yaml layer (by registry name and class name), let Ultralytics'
    model building measure their channels and redo attach(), and its fuse() keep attach()'s gates. Idempotent."""
    for name in registry.list_modules():
        cls = _layer_class(name)
        vars(tasks)[name] = cls
        vars(tasks)[cls.__name__] = cls
    tasks.parse_model = _parse_model
    tasks.BaseModel.fuse = _fuse


_HEADS = ("Detect", "Segment", "Pose", "OBB")  # the layers that read the P3/P4/P5 maps


def model_yaml(name: str, folder: str | os.PathLike | None = None) -> str:
    """An Ultralytics model yaml with attnkit modules, made from the installed Ultralytics' own: `name` is
    "<yolo yaml>-<module>.yaml", with the scale letter if wanted: "yolov8n-cbam.yaml", "yolo11s-se.yaml",
    "yolov8n-seg-coord.yaml", "yolov8n-cls-eca.yaml"; any registered module. Returns the path to give `YOLO(...)`.

    Detection, segmentation, pose and OBB models get the module on each of the three maps the head reads (P3/8, P4/16,
    P5/32), as layers inserted right before the head, which reads them instead: no other layer's index changes, so
    the backbone and neck are exactly Ultralytics' and their pretrained weights load by name. Classification models
    get it on the last backbone map, before the classifier. The file is written to `folder` (default: attnkit's cache,
    $XDG_CACHE_HOME/attnkit/yolo).
    """
    match = re.fullmatch(r"(yolo(?:v8|11))([nslmx]?)((?:-[a-z]+)*)-(\w+)\.yaml", name)
    if match is None:
        raise ValueError(f"model_yaml: expected '<yolov8|yolo11>[scale][-seg|-cls|-pose|-obb]-<module>.yaml', such as "
                         f"'yolov8n-cbam.yaml', got {name!r}.")
    version, scale, task, module = match.groups()
    layer = _layer_class(module).__name__  # an unknown module name is an error naming the registered ones
    base = YAML.load(check_yaml(f"{version}{task}.yaml"))
    head = base["head"]
    if head[-1][2] == "Classify":
        head.insert(len(head) - 1, [-1, 1, layer, []])
    elif head[-1][2] in _HEADS:
        first = len(base["backbone"]) + len(head) - 1  # the index of the head layer, which the new layers take
        sources = head[-1][0]
        head[-1:-1] = [[source, 1, layer, []] for source in sources]
        head[-1][0] = list(range(first, first + len(sources)))
    else:
        raise ValueError(f"model_yaml: {version}{task}.yaml ends in {head[-1][2]}, not a head model_yaml knows.")
    target = Path(folder) if folder is not None else cache_dir() / "yolo"
    target.mkdir(parents=True, exist_ok=True)
    where = "the last backbone map" if head[-1][2] == "Classify" else f"the maps {head[-1][2]} reads"
    text = (f"# {version}{task} of Ultralytics {ultralytics_version} with attnkit's {module!r} on {where}, written by "
            f"attnkit.integrations.ultralytics.model_yaml.\n# Build it after `import attnkit.integrations.ultralytics`, "
            f"which registers attnkit's modules as layers.\n")
    text += yaml.safe_dump(base, sort_keys=False, default_flow_style=None, width=120)
    (target / f"{version}{task}-{module}.yaml").write_text(text)
    return str(target / f"{version}{scale}{task}-{module}.yaml")


def _yolo_model(model: Any) -> nn.Module:
    net = getattr(model, "model", None)
    net = model if isinstance(model, tasks.BaseModel) else net
    if not isinstance(net, tasks.BaseModel) or not isinstance(getattr(net, "yaml", None), dict):
        raise TypeError(f"attach: expected an Ultralytics YOLO or one of its models (built from a yaml), got "
                        f"{type(model).__name__}.")
    return net


def attach(model: Any, spec: str, where: str | Sequence[int] = "backbone", *, identity_init: bool = False,
           **kwargs: Any) -> AttachReport:
    """Insert `spec` after YOLO's CSP blocks (C2f, C3k2, C3, ...) of an existing model, pretrained weights kept, and
    record it in the model's yaml so that Ultralytics' rebuilds (train(), loading a checkpoint) insert it again.

    Args:
        model: an Ultralytics `YOLO` or its `DetectionModel` / `SegmentationModel` / `ClassificationModel`.
        where: "backbone" (the blocks of the yaml's backbone: YOLOv8n's layers 2, 4, 6, 8), "neck" (those of its head,
            before the detection layer), "all", or layer indices.
        identity_init: start each inserted module as the identity (attnkit.IdentityStart), so the model's output is
            unchanged until it trains.
    Returns attnkit's AttachReport, with paths inside the model's layer list: the new module after layer 4 is `4.attn`
    (`model.4.attn` in the DetectionModel's state dict).
    """
    net = _yolo_model(model)
    backbone = len(net.yaml["backbone"])
    blocks = [i for i, layer in enumerate(net.model) if isinstance(layer, BLOCKS)]
    if isinstance(where, str):
        parts = {"backbone": [i for i in blocks if i < backbone], "neck": [i for i in blocks if i >= backbone],
                 "all": blocks}
        if where not in parts:
            raise ValueError(f"attach: `where` must be 'backbone', 'neck', 'all' or layer indices, got {where!r}.")
        chosen = parts[where]
    else:
        chosen = [int(i) for i in where]
        if not all(0 <= i < len(net.model) for i in chosen):
            raise ValueError(f"attach: layer indices must be in 0..{len(net.model) - 1}, got {list(where)}.")
    if not chosen:
        raise ValueError(f"attach: {type(net).__name__} has no {where} blocks ({', '.join(b.__name__ for b in BLOCKS)}).")
    measured = measure(net, torch.zeros(1, net.yaml.get("channels", 3), 64, 64))
    channels = [measured.channels(f"model.{i}") for i in chosen]
    entry = {"spec": spec, "layers": chosen, "channels": channels, "identity_init": identity_init, "kwargs": kwargs}
    names = [str(i) for i in chosen]
    report = attach_into(net.model, spec, where=names, channels=dict(zip(names, channels)),
                           identity_init=identity_init, allow_multiple=True, **kwargs)
    net.yaml.setdefault("attnkit", []).append(entry)
    if hasattr(model, "ckpt") and not model.ckpt:  # built from a yaml file, which YOLO.train() would rebuild it from:
        model.ckpt = {"model": net}  # train from this model instead, as from a loaded checkpoint
    return report


register()
