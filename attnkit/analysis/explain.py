"""Where a trained network looks (`attnkit explain`): Grad-CAM (Selvaraju et al., ICCV 2017) or Grad-CAM++
(Chattopadhyay et al., WACV 2018) through the grad-cam package (github.com/jacobgil/pytorch-grad-cam), for the
attention model and the plain one side by side, and the maps of the spatial attention modules (read with
attnkit.capture), drawn over the images as PNG grids with the predicted and true labels."""
from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor

from ..capture import capture
from ..modules.base import spatial_map
from ..data import Dataset
from ..data.formats import read_image
from ..files import make_folder, write_csv
from ..hooks import evaluating, forward_hooks
from ..registry import BASELINE, did_you_mean
from ..runs import TrainConfig, load_checkpoint, model_from_checkpoint, run_data
from .plotting import figure, save_png

__all__ = ["AttentionMap", "ExplainReport", "Explained", "METHODS", "explain", "feature_layers", "find_baseline", "grad_cam"]

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
_METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}
# Every grid has the same geometry: PANEL_INCHES square panels, HEADER_INCHES of title, at DPI dots per inch.
PANEL_INCHES, HEADER_INCHES, DPI, ROWS_PER_FILE = 1.6, 0.5, 100, 8
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


@dataclass
class Explained:
    """One network's side of the picture: its predictions on the images and its class-activation maps."""

    checkpoint: Path
    variant: str  # 'plain' or the attention spec
    target_layer: str
    predictions: list[int]
    confidences: list[float]  # the softmax probability of each prediction
    cams: Tensor  # N×H×W in [0, 1] at the images' size, for the predicted class


@dataclass
class AttentionMap:
    """One attention module's spatial map: the gate's own values (the mean over channels where it has channels),
    upsampled bilinearly to the images' size, N×H×W."""

    site: str
    gate: str
    maps: Tensor


@dataclass
class ExplainReport:
    """What explain() found and wrote; str() is the summary `attnkit explain` prints."""

    method: str
    images: list[str]  # where each image came from
    labels: list[int | None]  # None for image files
    classes: list[str]
    model: Explained
    baseline: Explained | None
    attention: list[AttentionMap]  # the spatial sites drawn: in network order, or as named
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        sides = [s for s in (self.baseline, self.model) if s is not None]
        head = " and ".join(f"{s.checkpoint} ({s.variant}, at {s.target_layer})" for s in sides)
        lines = [f"{_METHOD_NAMES[self.method]} of {head} on {len(self.images)} images"]
        if all(label is not None for label in self.labels):
            lines += [f"  {s.variant}: {sum(p == y for p, y in zip(s.predictions, self.labels))} of {len(self.labels)} right"
                      for s in sides]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines + [f"wrote {path}" for path in self.files])


# ---------------------------------------------------------------------------------------------- Grad-CAM
def feature_layers(model: nn.Module, example: Tensor) -> list[str]:
    """The modules whose output is a 4-D feature map, in the order their forward passes finish, leaving out
    pooling layers, global pooling and modules that run more than once per pass (the CIFAR blocks' shared relu).
    The last one is Grad-CAM's default target: layer3 of the CIFAR ResNets, layer4 of the ImageNet ones,
    `features` of mobilenet_v2, the second conv stage's activation of lenet."""
    calls: dict[str, int] = {}
    order: list[str] = []

    def hook(name: str, module: nn.Module, inputs: tuple, out: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        global_pool = x is not None and x.dim() == 4 and x.shape[-2:].numel() > 1 and out.shape[-2:].numel() == 1
        if isinstance(out, Tensor) and out.dim() == 4 and not global_pool and not isinstance(module, _POOLING):
            order.append(name)

    named = ((m, lambda m, i, o, n=name: hook(n, m, i, o)) for name, m in model.named_modules() if name)
    with forward_hooks(named), torch.no_grad():
        model(example)
    return [name for name in order if calls[name] == 1]


def _target_layer(model: nn.Module, example: Tensor, name: str | None) -> str:
    candidates = feature_layers(model, example)
    if not candidates:
        raise ValueError("explain: the model has no module with a 4-D feature-map output to take Grad-CAM at.")
    if name is None:
        return candidates[-1]
    if name not in candidates:
        modules = dict(model.named_modules())
        why = (f"no module is called {name!r}.{did_you_mean(name, modules)}" if name not in modules
               else f"{name!r} does not give one 4-D feature map per forward pass (it is a pooling layer, runs more "
                    f"than once, or its output is not N×C×H×W).")
        raise ValueError(f"explain: target_layer: {why} Layers that do, last ones: {', '.join(candidates[-4:])}.")
    return name


def grad_cam(model: nn.Module, x: Tensor, target_layer: str, classes: Sequence[int], method: str = "gradcam") -> Tensor:
    """Grad-CAM (or Grad-CAM++) maps of `classes` (one per image) at the module named `target_layer`, N×H×W in [0, 1]
    at x's size, computed by the grad-cam package: ReLU(Σ_k w_k A_k) over the layer's activations A_k, with w_k the
    spatial mean of ∂score/∂A_k (Grad-CAM, eq. 1-2) or its positive part weighted as in Grad-CAM++ (eq. 19), resized
    bilinearly and min-max scaled per image. The model is run in eval mode; its parameters' .grad are overwritten."""
    if method not in METHODS:
        raise ValueError(f"explain: method must be one of {', '.join(METHODS)}, got {method!r}.{did_you_mean(method, METHODS)}")
    modules = dict(model.named_modules())
    if target_layer not in modules:
        raise ValueError(f"explain: target_layer: no module is called {target_layer!r}.{did_you_mean(target_layer, modules)}")
    if len(classes) != len(x):
        raise ValueError(f"explain: grad_cam needs one class per image: {len(x)} images, {len(classes)} classes.")
    # clone: keep the activation the grad-cam package records safe from in-place operations after the layer
    cam = METHODS[method](model=model, target_layers=[modules[target_layer]], reshape_transform=torch.clone)
    try:
        with evaluating(model), torch.enable_grad():
            maps = cam(input_tensor=x.detach().requires_grad_(), targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps)


# ---------------------------------------------------------------------------------------------- attention maps
def _attention(model: nn.Module, x: Tensor) -> tuple[Tensor, list[AttentionMap], list[str]]:
    """The logits of x, every spatial attention map, in network order, and notes on the modules that have none."""
    with torch.no_grad(), capture(model) as gates:
        logits = model(x)
    kinds = {name: type(module).__name__ for name, module in model.named_modules() if name in gates}
    maps, channel_only = [], {}
    for name, site_gates in gates.items():
        first = {gate: values[0] for gate, values in site_gates.items() if values}
        found = spatial_map(model.get_submodule(name), first) if first else None
        if found is None:
            channel_only.setdefault(kinds[name], []).append(name)
        else:
            upsampled = F.interpolate(found[1][:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            maps.append(AttentionMap(name, found[0], upsampled))
    notes = [f"{kind} ({len(names)} site{'s' * (len(names) > 1)}) gates channels only: no spatial map to draw."
             for kind, names in channel_only.items()]
    if not gates:
        notes.append("the model has no attention modules: no attention maps to draw.")
    return logits, maps, notes


def _select(maps: list[AttentionMap], sites: str) -> tuple[list[AttentionMap], list[str]]:
    """The maps `sites` asks for ('all', 'last', or names, comma-separated), and a note on what was left out."""
    if sites == "all" or (sites == "last" and len(maps) < 2):
        return maps, []
    if sites == "last":
        return maps[-1:], [f"{len(maps)} spatial attention sites; the grids show the last, {maps[-1].site}; --sites all "
                           f"(sites='all') shows each, or name them: --sites {maps[0].site},{maps[-1].site}."]
    by_name = {a.site: a for a in maps}
    wanted = [name.strip() for name in sites.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown or not wanted:
        hint = did_you_mean(unknown[0], by_name) if unknown else ""
        raise ValueError(f"explain: sites must be 'last', 'all' or spatial attention sites of the model "
                         f"({', '.join(by_name) or 'it has none'}), got {sites!r}.{hint}")
    return [by_name[name] for name in wanted], []


# ---------------------------------------------------------------------------------------------- checkpoints, images
def find_baseline(checkpoint: str | os.PathLike) -> Path | None:
    """The plain run of the same seed when `checkpoint` lies in an `attnkit compare` folder
    (<out>/<variant>/seed<k>/last.pt -> <out>/plain/seed<k>/, the same file name or last.pt); None otherwise.
    The path is relative where `checkpoint` is."""
    checkpoint = Path(checkpoint)
    run = checkpoint.resolve().parent
    plain = run.parent.parent / BASELINE / run.name
    if not re.fullmatch(r"seed\d+", run.name) or plain == run:
        return None
    found = next((plain / name for name in (checkpoint.name, "last.pt") if (plain / name).is_file()), None)
    return Path(os.path.relpath(found)) if found is not None and not checkpoint.is_absolute() else found


def _variant(state: dict[str, Any]) -> str:
    return TrainConfig.from_dict(state["config"]).variant


def _check_baseline(state: dict[str, Any], base: dict[str, Any], path: Path) -> None:
    for key in ("in_chans", "num_classes", "input_size"):
        if state["arch"][key] != base["arch"][key]:
            raise ValueError(f"explain: the baseline {path} takes {key}={base['arch'][key]}, the checkpoint "
                             f"{state['arch'][key]}; pass a baseline trained on the same data.")
    if state["config"]["dataset"] != base["config"]["dataset"]:
        raise ValueError(f"explain: the baseline {path} was trained on {base['config']['dataset']!r}, the checkpoint "
                         f"on {state['config']['dataset']!r}; pass a baseline trained on the same data set.")


def _read_image(path: Path, data: Dataset) -> Tensor:
    """An image file as the model's input: converted to its channels, resized (shorter side) and centre-cropped
    to its size, normalised as in training (an image folder's own evaluation transform where it has one)."""
    if not path.is_file():
        raise FileNotFoundError(f"explain: no image file at {path}")
    mode = {1: "L", 3: "RGB"}.get(data.in_chans)
    if mode is None:
        raise ValueError(f"explain: image files can feed 1- or 3-channel models; this one takes {data.in_chans} channels.")
    image = read_image(path, mode)
    transform = getattr(data.test, "transform", None)
    if transform is not None:
        return transform(image)
    image = ImageOps.fit(image, (data.image_size, data.image_size), Image.Resampling.BILINEAR)
    mean, std = torch.tensor(data.mean).view(-1, 1, 1), torch.tensor(data.std).view(-1, 1, 1)
    return (pil_to_tensor(image).float() / 255 - mean) / std


def _data(state: dict[str, Any], source: Path, dataset: str | None, data_dir: str | os.PathLike | None,
          why: str) -> Dataset:
    try:
        return run_data(state, source, dataset, data_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"explain: {why} needs the data set {dataset or state['config']['dataset']!r}: {error}") from error


# ---------------------------------------------------------------------------------------------- drawing
def _draw(path: Path, rows: range, report: ExplainReport, shown: Tensor) -> None:
    """One grid: rows `rows` of the images `shown` (N×C×H×W in [0, 1]), figure size from the panel count only."""
    sides = [s for s in (report.baseline, report.model) if s is not None]
    cols = 1 + len(sides) + len(report.attention)
    fig = figure(cols * PANEL_INCHES, len(rows) * PANEL_INCHES + HEADER_INCHES, dpi=DPI)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    model = report.model
    title = " · ".join([f"{_METHOD_NAMES[report.method]} at {model.target_layer}", str(model.checkpoint), *report.notes])
    chars = int(cols * PANEL_INCHES * 72 / 3.6)  # a 7-pt character is about 3.6 pt wide
    fig.suptitle("\n".join(textwrap.wrap(title, chars, max_lines=2, placeholder=" …")), fontsize=7)
    grey = shown.shape[1] == 1
    for r, i in enumerate(rows):
        image = (shown[i, 0] if grey else shown[i].permute(1, 2, 0)).numpy()
        label = report.labels[i]
        panels: list[tuple[str, str, Tensor | None, str]] = [
            ("input", f"true {report.classes[label]}" if label is not None else Path(report.images[i]).name[:20], None, "black")]
        for s in sides:
            p = s.predictions[i]
            colour = "black" if label is None else "green" if p == label else "red"
            panels.append((f"{_METHOD_NAMES[report.method]} {s.variant}", f"pred {report.classes[p]} ({s.confidences[i]:.0%})",
                           s.cams[i], colour))
        for a in report.attention:  # each map scaled to its own range, which the label gives
            m = a.maps[i]
            lo, hi = m.min().item(), m.max().item()
            panels.append((f"{a.site} {a.gate}", f"values {lo:.2g}–{hi:.2g}", (m - lo) / (hi - lo) if hi > lo else m * 0, "black"))
        for ax, (column, text, heat, colour) in zip(axes[r], panels):
            ax.imshow(image, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
            if heat is not None:
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(column, fontsize=6)
            ax.set_xlabel(text, fontsize=6, color=colour, labelpad=2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
    save_png(fig, path)


def _write_csv(path: Path, report: ExplainReport) -> None:
    sides = [s for s in (report.model, report.baseline) if s is not None]
    rows = [["image", "true"] + [f"{s.variant} {k}" for s in sides for k in ("prediction", "confidence")]]
    for i, name in enumerate(report.images):
        label = report.labels[i]
        rows.append([name, "" if label is None else report.classes[label]]
                    + [v for s in sides for v in (report.classes[s.predictions[i]], f"{s.confidences[i]:.4f}")])
    write_csv(path, rows)


# ---------------------------------------------------------------------------------------------- explain()
def _explain_model(path: Path, state: dict[str, Any], x: Tensor, method: str,
                   layer: str | None) -> tuple[Explained, list[AttentionMap], list[str]]:
    model = model_from_checkpoint(state, path)
    layer = _target_layer(model, x[:1], layer)
    logits, maps, notes = _attention(model, x)
    probs = logits.softmax(1)
    predictions = probs.argmax(1)
    cams = torch.cat([grad_cam(model, xs, layer, ps.tolist(), method) for xs, ps in zip(x.split(16), predictions.split(16))])
    explained = Explained(path, _variant(state), layer, predictions.tolist(),
                          probs.gather(1, predictions[:, None])[:, 0].tolist(), cams)
    return explained, maps, notes


def explain(checkpoint: str | os.PathLike, *, images: Sequence[str | os.PathLike] | None = None,
            dataset: str | None = None, data_dir: str | os.PathLike | None = None,
            baseline: str | os.PathLike | None = None, method: str = "gradcam", count: int = 8,
            out_dir: str | os.PathLike | None = None, target_layer: str | None = None,
            sites: str = "last") -> ExplainReport:
    """Explain a training checkpoint's predictions and write PNG grids and predictions.csv to `out_dir`.

    Images: the files `images` (predicted labels only), or the first `count` test images of `dataset` (default:
    the checkpoint's own, from `data_dir`, default its training data_dir). Rows are images, at most ROWS_PER_FILE
    per PNG; columns: the input, Grad-CAM of the baseline (`baseline`, or the plain run of the same seed when the
    checkpoint lies in an `attnkit compare` folder), Grad-CAM of the checkpoint's model, and the spatial attention
    maps of the last attention site (`sites='all'`: every site; or sites named, comma-separated, e.g.
    'layer1.2.attn,layer3.2.attn'). `target_layer` names the module Grad-CAM looks at (default: the last feature
    map before global pooling, see feature_layers). `out_dir` defaults to <checkpoint's folder>/explain.
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if images is not None and dataset is not None:
        raise ValueError("explain: give image files or a data set, not both.")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"explain: count must be a positive integer, got {count!r}.")
    if method not in METHODS:
        raise ValueError(f"explain: method must be one of {', '.join(METHODS)}, got {method!r}.{did_you_mean(method, METHODS)}")
    path = Path(checkpoint)
    state = load_checkpoint(path)
    if images is not None:
        if not images:
            raise ValueError("explain: the list of image files is empty.")
        # checkpoints do not store the normalisation: it comes from the training data set
        data = _data(state, path, None, data_dir, "normalising image files as in training")
        x = torch.stack([_read_image(Path(f), data) for f in images])
        names, labels = [str(f) for f in images], [None] * len(images)
    else:
        data = _data(state, path, dataset, data_dir, "explaining test images")
        x, y = next(iter(data.loader(False, count)))
        names, labels = [f"{data.name} test #{i}" for i in range(len(y))], y.tolist()

    notes: list[str] = []
    plain = not state["arch"]["attn"]
    if baseline is None and not plain:
        baseline = find_baseline(path)
        if baseline is None:
            notes.append("no plain model: the attention model is shown alone; pass --baseline PLAIN_CHECKPOINT (runs "
                         "of `attnkit compare` find <out>/plain/seed<k>/ themselves).")
    side = None
    if baseline is not None:
        base_state = load_checkpoint(baseline)
        _check_baseline(state, base_state, Path(baseline))
        side, _, _ = _explain_model(Path(baseline), base_state, x, method, target_layer)
    model, maps, model_notes = _explain_model(path, state, x, method, target_layer)
    maps, site_notes = _select(maps, sites)
    report = ExplainReport(method, names, labels, data.classes, model, side, maps, notes + model_notes + site_notes)

    out = Path(out_dir) if out_dir is not None else path.parent / "explain"
    make_folder(out)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    shown = (x * std + mean).clamp(0, 1)
    for start in range(0, len(names), ROWS_PER_FILE):
        report.files.append(out / f"{method}-{start // ROWS_PER_FILE + 1:02d}.png")
        _draw(report.files[-1], range(start, min(start + ROWS_PER_FILE, len(names))), report, shown)
    report.files.append(out / "predictions.csv")
    _write_csv(report.files[-1], report)
    return report
