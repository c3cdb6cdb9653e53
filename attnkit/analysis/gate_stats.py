"""Channel-gate statistics (`attnkit stats`): the SE paper's mean excitation per channel for each class (Hu et al.,
"Squeeze-and-Excitation Networks", TPAMI 2019, Sec. 7.2, Figs. 6-7) and the SRM paper's correlation of the channel
weights across samples (Lee et al., "SRM: A Style-based Recalibration Module for CNNs", ICCV 2019, Sec. 4.4)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import capture
from ..data import Dataset
from ..data.loader import Loader
from ..files import make_folder, write_csv
from ..hooks import evaluating, forward_hooks
from ..modules.base import channel_weights as module_channel_weights, channel_weights_unavailable
from .report import text_table

__all__ = ["ChannelWeights", "GateStats", "channel_sites", "channel_weights", "gate_stats", "sample_batches",
           "write_gate_stats"]

PANEL_INCHES = (4.0, 3.2)  # one panel of excitation.png and correlation.png; a figure is one panel per stage
DPI = 100
PLOTTED_CLASSES = 10  # excitation.png draws the first ten classes and their mean; the CSV has every class

SUPPORTED = ("modules that declare channel weights (attnkit's se, eca, srm, ge, cbam, bam, coord, gc with fusion 'mul', "
             "sk, simam, ema, gam, shuffle and nam)")


def _channel_sites(model: nn.Module) -> list[str]:
    """The attention modules of `model` that have channel weights, by attnkit.capture's names; an error naming the
    others when none has any."""
    with capture(model) as gates:
        names = list(gates)
    if not names:
        raise ValueError(f"{type(model).__name__} has no attention module; channel statistics need a network "
                         f"trained with --attn ({SUPPORTED}).")
    sites, refused = [], {}
    for name in names:
        module = model.get_submodule(name)
        reason = channel_weights_unavailable(module)
        if reason is None:
            sites.append(name)
        else:
            refused.setdefault(f"{type(module).__name__} ({reason})", []).append(name)
    if not sites:
        listed = "; ".join(f"{what} at {', '.join(at[:3])}{', ...' if len(at) > 3 else ''}" for what, at in refused.items())
        raise ValueError(f"no attention module of {type(model).__name__} has channel weights: {listed}. "
                         f"Channel statistics take {SUPPORTED}.")
    return sites


def channel_sites(model: nn.Module) -> list[str]:
    """The names (attnkit.capture's) of the attention modules of `model` that have channel weights; an error naming
    the others when none has any."""
    return _channel_sites(model)


@dataclass
class ChannelWeights:
    """Each sample's weight per channel at each attention site that has them, keyed by attnkit.capture's module
    names in the order the forward pass runs them, with the samples' labels."""

    weights: dict[str, np.ndarray]  # site -> N×C, float32
    labels: np.ndarray  # N, int64
    stages: dict[str, int]  # site -> 1-based stage; a stage ends where the gated map's resolution changes

    def stage_sites(self) -> list[str]:
        """The last site of each stage."""
        last = {stage: site for site, stage in self.stages.items()}
        return [last[stage] for stage in sorted(last)]


@torch.no_grad()
def channel_weights(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> ChannelWeights:
    """Run `model` in eval mode on `batches` of (images, labels) and keep one weight per channel and sample at each
    attention site: the channel gate (se, eca, srm, cbam's Mc, gc's multiplicative transform), the gate averaged
    over positions (bam's σ(Mc + Ms), ge with a local extent, coord's a_h·a_w), or sk's weight of its first path."""
    sites = _channel_sites(model)
    sizes: dict[str, tuple[int, ...]] = {}  # the gated map's H×W, in the order the modules run

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            sizes.setdefault(name, tuple(out.shape[2:]))
        return hook

    weights: dict[str, list[np.ndarray]] = {name: [] for name in sites}
    labels = []
    device = next(model.parameters()).device
    with forward_hooks((model.get_submodule(name), record(name)) for name in sites), evaluating(model):
        for x, y in batches:
            with capture(model) as gates:
                model(x.to(device))
            for name in sites:
                runs = len(next(iter(gates[name].values())))
                if runs != 1:
                    raise ValueError(f"{name} ran {runs} times in one forward pass; channel statistics need each "
                                     f"attention module to run once per pass.")
                first = {gate: values[0] for gate, values in gates[name].items()}
                weights[name].append(module_channel_weights(model.get_submodule(name), first).cpu().numpy())
            labels.append(y.numpy())
    if not labels:
        raise ValueError("channel_weights: `batches` yielded no batch.")
    stages, stage, previous = {}, 0, None
    for name, size in sizes.items():
        if size != previous:
            stage += 1
        stages[name], previous = stage, size
    return ChannelWeights({name: np.concatenate(weights[name]) for name in sizes}, np.concatenate(labels), stages)


def sample_batches(data: Dataset, split: str = "test", max_samples: int | None = None, batch_size: int = 256) -> Loader:
    """Batches of one split in its order, normalised, without augmentation (except the random transforms of an image
    folder's training split). With `max_samples`, that many samples evenly spaced over the split, so a split sorted
    by class keeps every class."""
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    part = data.train if split == "train" else data.test
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
            raise ValueError(f"max samples must be an integer of at least 2 (correlations need two), got {max_samples!r}.")
        n = len(part[1]) if isinstance(part, tuple) else len(part)
        if max_samples < n:
            idx = torch.arange(max_samples) * n // max_samples
            part = (part[0][idx], part[1][idx]) if isinstance(part, tuple) else torch.utils.data.Subset(part, idx.tolist())
    return dataclasses.replace(data, test=part).loader(False, batch_size)


def _correlation(w: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant channel has no correlation: nan
        r = np.atleast_2d(np.corrcoef(w, rowvar=False))
    return (r + r.T) / 2  # exactly symmetric (corrcoef's two triangles can differ in the last bit)


@dataclass
class GateStats:
    """Channel-weight statistics of one split: per site the mean weight of each channel for each class and over all
    samples (the SE paper's view), and for the last site of each stage the C×C correlation matrix of the channel
    weights across samples (the SRM paper's view; nan for a channel whose weight is constant)."""

    dataset: str
    split: str
    classes: list[str]
    samples: ChannelWeights
    class_means: dict[str, np.ndarray]  # site -> K×C, float64 (nan for a class without samples)
    means: dict[str, np.ndarray]  # site -> C, over all samples
    correlations: dict[str, np.ndarray]  # last site of each stage -> C×C

    def table(self) -> str:
        """Per site: channels, the mean weight, the spread across classes (std over classes of the class means,
        averaged over channels) and, for the last site of each stage, the mean |r| between different channels."""
        rows = []
        for site, stage in self.samples.stages.items():
            spread = np.nanstd(self.class_means[site], axis=0).mean()
            r = self.correlations.get(site)
            off = r[~np.eye(len(r), dtype=bool)] if r is not None else None
            rows.append({"site": site, "stage": str(stage), "channels": str(len(self.means[site])),
                         "mean weight": f"{self.means[site].mean():.3f}", "class spread": f"{spread:.4f}",
                         "mean |r|": "" if off is None or not off.size else f"{np.nanmean(np.abs(off)):.3f}"})
        n = len(self.samples.labels)
        return (text_table(rows) + f"\n{self.dataset}, {self.split} split, {n} images. class spread: std over classes "
                "of the per-class mean weight, averaged over channels; mean |r|: between different channels.")


def gate_stats(model: nn.Module, data: Dataset, *, split: str = "test", max_samples: int | None = None,
               batch_size: int = 256) -> GateStats:
    """The channel-weight statistics of `model` on a split of `data` (all of it, or `max_samples` evenly spaced
    samples). Memory: the weights of every sample are kept, N × (channels summed over sites) float32 values."""
    samples = channel_weights(model, sample_batches(data, split, max_samples, batch_size))
    labels = samples.labels
    class_means, means = {}, {}
    for site, w in samples.weights.items():
        w64 = w.astype(np.float64)
        class_means[site] = np.stack([w64[labels == k].mean(0) if (labels == k).any() else np.full(w.shape[1], np.nan)
                                      for k in range(data.num_classes)])
        means[site] = w64.mean(0)
    correlations = {site: _correlation(samples.weights[site]) for site in samples.stage_sites()}
    return GateStats(data.name, split, list(data.classes), samples, class_means, means, correlations)


def _figure(panels: int) -> tuple[Any, np.ndarray]:
    from .plotting import figure

    fig = figure(PANEL_INCHES[0] * panels, PANEL_INCHES[1], dpi=DPI)
    return fig, fig.subplots(1, panels, squeeze=False)


def _plot_excitation(stats: GateStats, path: Path, title: str) -> Path:
    from .plotting import colormap, save_png

    sites = stats.samples.stage_sites()
    fig, axes = _figure(len(sites))
    colors = colormap("tab10")
    for ax, site in zip(axes[0], sites):
        channels = np.arange(len(stats.means[site]))
        for k, name in enumerate(stats.classes[:PLOTTED_CLASSES]):
            ax.plot(channels, stats.class_means[site][k], color=colors(k % 10), lw=0.8, label=name)
        ax.plot(channels, stats.means[site], color="black", lw=1.6, label="all")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{site} (stage {stats.samples.stages[site]})", fontsize=9)
        ax.set_xlabel("channel index", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("mean channel weight", fontsize=8)
    axes[0, 0].legend(fontsize=6, ncol=4, loc="lower left", framealpha=0.7)
    fig.suptitle(f"{title}: mean channel weight per class, last attention site of each stage", fontsize=9)
    return save_png(fig, path)


def _plot_correlation(stats: GateStats, path: Path, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    from .plotting import colormap, save_png

    sites = stats.samples.stage_sites()
    fig, axes = _figure(len(sites))
    cmap = colormap("RdBu_r").with_extremes(bad="0.8")
    for ax, site in zip(axes[0], sites):
        image = ax.imshow(stats.correlations[site], cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{site} (stage {stats.samples.stages[site]})", fontsize=9)
        ax.set_xlabel("channel index", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="correlation r")
    fig.suptitle(f"{title}: correlation of the channel weights across samples", fontsize=9)
    return save_png(fig, path)


def write_gate_stats(stats: GateStats, out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Write into `out_dir`: excitation.csv (site, stage, class, channel, mean_weight; class 'all' is the mean over
    every sample), correlation-<site>.csv (the C×C matrix of the last site of each stage; row and column headers
    are channel indices), and excitation.png and correlation.png, one panel per stage. Returns the paths."""
    out = make_folder(out_dir)
    title = title or "channel weights"
    title += f" ({stats.dataset}, {stats.split} split, {len(stats.samples.labels)} images)"
    rows: list[list[Any]] = [["site", "stage", "class", "channel", "mean_weight"]]
    for site, stage in stats.samples.stages.items():
        for name, row in [*zip(stats.classes, stats.class_means[site]), ("all", stats.means[site])]:
            rows += ([site, stage, name, c, _number(v)] for c, v in enumerate(row))
    paths = [write_csv(out / "excitation.csv", rows)]
    for site, r in stats.correlations.items():
        paths.append(write_csv(out / f"correlation-{site}.csv",
                               [["channel", *range(len(r))], *([i, *map(_number, row)] for i, row in enumerate(r))]))
    paths.append(_plot_excitation(stats, out / "excitation.png", title))
    paths.append(_plot_correlation(stats, out / "correlation.png", title))
    return paths


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.7g}"
