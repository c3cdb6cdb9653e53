"""Figures for the analysis files, drawn with matplotlib's object API (a Figure on its own Agg canvas): no pyplot
state, no display, and the caller's matplotlib backend untouched."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from ..files import write_file

__all__ = ["colormap", "figure", "save_png"]


def figure(width: float, height: float, dpi: float = 100,
           layout: Literal["constrained", "tight"] = "constrained") -> Figure:
    """A `width`×`height`-inch figure drawn on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` as a PNG at the figure's dpi, atomically (attnkit.files)."""
    write_file(path, lambda f: fig.savefig(f, dpi=fig.dpi, format="png"))
    return path


def colormap(name: str) -> Colormap:
    """A registered colormap, e.g. 'tab10' (matplotlib.colormaps; pyplot's get_cmap without pyplot)."""
    return colormaps[name]
