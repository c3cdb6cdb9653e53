"""Attention-guided channel pruning (`attnkit prune`): rank the channels at each attention site by their mean gate,
zero the lowest fraction and measure the accuracy against the fraction pruned, with a random ranking and the L1 norm
of the filters (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) as baselines."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset
from ..data.loader import Loader
from ..files import make_folder, write_csv
from ..hooks import evaluating, forward_hooks
from ..modules import SelectiveKernel
from ..registry import did_you_mean
from ..surgery import IdentityStart, gates_before, gates_of
from .gate_stats import channel_sites, channel_weights, sample_batches
from .report import text_table

__all__ = ["DEFAULT_FRACTIONS", "RANKINGS", "PruneResult", "PruneSite", "mask_channels", "parse_fractions", "prune",
           "write_prune"]

RANKINGS = ("gate", "l1", "random")
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(10))
PLOT_INCHES, DPI = (6.0, 4.0), 100


@dataclass
class PruneSite:
    """An attention site: the module whose gates rank its channels, the module whose output channels are zeroed,
    the channel count, and the convolutions that produce those channels (for the L1 ranking), or, for a module on a
    convolution's input (GCT), that convolution, which reads them (`reads`)."""

    gate: str  # the attention module, as attnkit.capture names it
    output: str  # the attention module, or the IdentityStart that wraps it
    channels: int
    convs: tuple[str, ...]
    reads: bool = False


@dataclass
class PruneResult:
    """Test accuracy with the lowest-ranked fraction of the channels zeroed at every site, per ranking. `orders` holds,
    per ranking and draw, each site's channels from first pruned to last; `accuracy` is draws × fractions (one draw
    except for 'random')."""

    dataset: str
    fractions: list[float]
    sites: list[PruneSite]
    orders: dict[str, list[dict[str, np.ndarray]]]
    accuracy: dict[str, np.ndarray]
    unpruned: float
    seed: int

    def masked(self, ranking: str, fraction: float, draw: int = 0) -> dict[str, np.ndarray]:
        """The channels zeroed at each site (by output module) for a ranking and fraction: the first round(f·C)."""
        order = self.orders[ranking][draw]
        return {s.output: order[s.gate][:round(fraction * s.channels)] for s in self.sites}

    def rows(self) -> list[dict[str, Any]]:
        """ranking, fraction, channels_masked (over all sites), accuracy (mean over draws), accuracy_std (over the
        random draws; empty for one draw)."""
        rows = []
        for ranking, acc in self.accuracy.items():
            for i, f in enumerate(self.fractions):
                masked = sum(len(v) for v in self.masked(ranking, f).values())
                rows.append({"ranking": ranking, "fraction": f, "channels_masked": masked, "accuracy": acc[:, i].mean(),
                             "accuracy_std": acc[:, i].std(ddof=1) if len(acc) > 1 else ""})
        return rows

    def table(self) -> str:
        total = sum(s.channels for s in self.sites)
        cells = []
        for i, f in enumerate(self.fractions):
            row = {"fraction": f"{f:g}", "masked": f"{sum(round(f * s.channels) for s in self.sites)}/{total}"}
            for ranking, acc in self.accuracy.items():
                spread = f" ± {100 * acc[:, i].std(ddof=1):.2f}" if len(acc) > 1 else ""
                header = ranking if len(acc) == 1 else f"{ranking} (mean ± std of {len(acc)})"
                row[header] = f"{100 * acc[:, i].mean():.2f}{spread}"
            cells.append(row)
        return (text_table(cells) + f"\ntest accuracy (%) on {self.dataset} with the lowest-ranked fraction of the channels "
                f"zeroed at each of the {len(self.sites)} attention sites; unpruned {100 * self.unpruned:.2f}%. gate: "
                "mean gate over the training split; l1: L1 norm of the producing filters; random: seeded permutations.")


@contextlib.contextmanager
def mask_channels(model: nn.Module, masks: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Zero the listed output channels of the named modules of `model` inside the block. The hooks run before any
    other forward hook on those modules, so those see the masked output; they are removed on leaving."""
    indices = {name: torch.as_tensor(np.asarray(channels, dtype=np.int64)) for name, channels in masks.items()}
    zeroing = ((model.get_submodule(name), lambda m, i, out, index=index: out.index_fill(1, index.to(out.device), 0))
               for name, index in indices.items() if len(index))
    with forward_hooks(zeroing, prepend=True):
        yield


def parse_fractions(text: str) -> list[float]:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5], as the CLI's --fractions takes them."""
    try:
        return _check_fractions([float(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"--fractions takes comma-separated numbers in [0, 1) such as 0,0.1,0.5, got {text!r}.") from None


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = list(fractions)
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1]
    if not fractions or bad:
        raise ValueError(f"prune: fractions must be numbers in [0, 1) (0 keeps every channel), got {fractions!r}.")
    return [float(f) for f in fractions]


def _check(fractions: Sequence[float], rankings: Sequence[str], random_draws: int) -> list[float]:
    fractions = _check_fractions(fractions)
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown or not rankings:
        raise ValueError(f"prune: rankings are some of {', '.join(RANKINGS)}, got {list(rankings)!r}."
                         + (did_you_mean(unknown[0], RANKINGS) if unknown else ""))
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 1:
        raise ValueError(f"prune: random_draws must be a positive integer, got {random_draws!r}.")
    return fractions


def _sites(model: nn.Module, gates: Sequence[str], x: Tensor) -> list[PruneSite]:
    """The sites, with the convolutions producing their channels: the gated module itself when it is a convolution;
    sk's path convolutions; otherwise the last convolution with that many output channels that ran before the
    attention module (outside any attention module), found by running `x` once."""
    outputs = {}
    for gate in gates:
        parent, _, leaf = gate.rpartition(".")
        outputs[gate] = parent if leaf == "module" and isinstance(model.get_submodule(parent), IdentityStart) else gate
    gated_convs = {id(g): name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) for g in gates_of(m)}
    read_by = {id(g): name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) for g in gates_before(m)}
    inside = tuple(name + "." for name in outputs.values())
    ran: list[str] = []  # convolutions in the order they finish
    before: dict[str, int] = {}  # output module -> how many convolutions had finished when it started
    channels: dict[str, int] = {}

    def conv_ran(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inputs: tuple, out: Tensor) -> None:
            ran.append(name)
        return hook

    def site_starts(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inputs: tuple) -> None:
            before.setdefault(name, len(ran))
        return hook

    def site_ran(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inputs: tuple, out: Tensor) -> None:
            channels.setdefault(name, out.shape[1])
        return hook

    conv_hooks = [(m, conv_ran(name)) for name, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and not name.startswith(inside)]
    site_hooks = [(model.get_submodule(out), site_ran(out)) for out in outputs.values()]
    starts = [(model.get_submodule(out), site_starts(out)) for out in outputs.values()]
    with forward_hooks(conv_hooks + site_hooks, pre=starts), torch.no_grad():
        model(x)
    sites = []
    for gate, out in outputs.items():
        module, c = model.get_submodule(gate), channels[out]
        if id(model.get_submodule(out)) in read_by:
            sites.append(PruneSite(gate, out, c, (read_by[id(model.get_submodule(out))],), reads=True))
            continue
        if isinstance(module, SelectiveKernel):
            convs = tuple(f"{gate}.paths.{n}" for n, m in module.paths.named_modules() if isinstance(m, nn.Conv2d))
        elif id(model.get_submodule(out)) in gated_convs:
            convs = (gated_convs[id(model.get_submodule(out))],)
        else:
            found = [n for n in ran[:before[out]] if model.get_submodule(n).out_channels == c]
            convs = found[-1:]
        sites.append(PruneSite(gate, out, c, tuple(convs)))
    return sites


def _l1_order(model: nn.Module, site: PruneSite) -> np.ndarray:
    if not site.convs:
        raise ValueError(f"prune: no convolution with {site.channels} output channels runs before {site.output}, so "
                         f"there is no L1 ranking for it; leave 'l1' out of the rankings.")
    # the L1 norm of each output filter of the producing convolutions, or of each input slice of the reading one
    dims = (0, 2, 3) if site.reads else (1, 2, 3)
    norms = sum(model.get_submodule(n).weight.detach().abs().sum(dims).double() for n in site.convs)
    sources = getattr(model.get_submodule(site.gate), "input_channel_of_output", None)
    if callable(sources):  # a module that reorders the channels (Shuffle Attention): each output's producing filter
        norms = norms[torch.as_tensor(sources())]
    return np.argsort(norms.cpu().numpy(), kind="stable")


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Loader) -> float:
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in batches:
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / total


def prune(model: nn.Module, data: Dataset, fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
          rankings: Sequence[str] = RANKINGS, seed: int = 0, random_draws: int = 3, max_samples: int | None = None,
          batch_size: int = 256) -> PruneResult:
    """Test accuracy of `model` (eval mode) with the round(f·C) lowest-ranked channels of every attention site zeroed
    (the attention module's output), for each fraction f and ranking:

        gate    the mean channel weight (as attnkit stats computes it) over the training split, or `max_samples`
                samples of it evenly spaced; evaluated on the test split
        l1      the L1 norm of each output filter of the convolution producing the gated channels (summed over sk's
                paths; BatchNorm scales are not folded in); for a module on a convolution's input (GCT), of the
                weights of that convolution that read each channel
        random  a permutation per site from numpy's generator seeded with (seed, draw), for `random_draws` draws

    Fraction 0 is the unpruned network, evaluated once, with no hook installed."""
    fractions = _check(fractions, rankings, random_draws)
    gates = channel_sites(model)
    with evaluating(model):
        test = sample_batches(data, "test", None, batch_size)
        sites = _sites(model, gates, next(iter(test))[0][:2].to(next(model.parameters()).device))
        orders: dict[str, list[dict[str, np.ndarray]]] = {}
        for ranking in rankings:
            if ranking == "gate":
                weights = channel_weights(model, sample_batches(data, "train", max_samples, batch_size)).weights
                orders[ranking] = [{s.gate: np.argsort(weights[s.gate].mean(0, dtype=np.float64), kind="stable")
                                    for s in sites}]
            elif ranking == "l1":
                orders[ranking] = [{s.gate: _l1_order(model, s) for s in sites}]
            else:
                generators = [np.random.default_rng([seed, draw]) for draw in range(random_draws)]
                orders[ranking] = [{s.gate: g.permutation(s.channels) for s in sites} for g in generators]
        unpruned = _accuracy(model, test)
        result = PruneResult(data.name, fractions, sites, orders, {}, unpruned, seed)
        for ranking, draws in orders.items():
            acc = np.empty((len(draws), len(fractions)))
            for d in range(len(draws)):
                for i, f in enumerate(fractions):
                    masks = result.masked(ranking, f, d)
                    if not any(len(v) for v in masks.values()):
                        acc[d, i] = unpruned
                        continue
                    with mask_channels(model, masks):
                        acc[d, i] = _accuracy(model, test)
            result.accuracy[ranking] = acc
    return result


def write_prune(result: PruneResult, out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Write prune.csv (PruneResult.rows()) and prune.png (accuracy against the fraction pruned, one curve per ranking;
    the band around 'random' spans its draws) into `out_dir`. Returns the paths."""
    from .plotting import figure, save_png  # matplotlib only where the plot is drawn

    out = make_folder(out_dir)
    rows = result.rows()
    cells = ([f"{v:.6g}" if isinstance(v, float) else v for v in r.values()] for r in rows)
    write_csv(out / "prune.csv", [list(rows[0]), *cells])

    fig = figure(*PLOT_INCHES, dpi=DPI)
    ax = fig.subplots()
    order = np.argsort(result.fractions, kind="stable")
    x = 100 * np.asarray(result.fractions)[order]
    styles = {"gate": ("tab:red", "o"), "l1": ("tab:blue", "s"), "random": ("0.4", "^")}
    for ranking, acc in result.accuracy.items():
        color, marker = styles[ranking]
        acc = 100 * acc[:, order]
        label = ranking if len(acc) == 1 else f"{ranking} (mean of {len(acc)} draws, band: min–max)"
        ax.plot(x, acc.mean(0), color=color, marker=marker, ms=4, label=label)
        if len(acc) > 1:
            ax.fill_between(x, acc.min(0), acc.max(0), color=color, alpha=0.2, lw=0)
    ax.axhline(100 * result.unpruned, color="black", ls=":", lw=1, label="unpruned")
    ax.set_xlabel("channels zeroed at each attention site (%)")
    ax.set_ylabel(f"test accuracy on {result.dataset} (%)")
    ax.set_title(f"{title or 'pruning'}: {len(result.sites)} attention sites", fontsize=10)
    ax.legend(fontsize=8)
    return [out / "prune.csv", save_png(fig, out / "prune.png")]
