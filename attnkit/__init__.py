"""attnkit: plug-and-play attention modules for convolutional networks."""
from .modules import (
    BAM,
    CBAM,
    ECA,
    SRM,
    CoordAttention,
    GatherExcite,
    GlobalContext,
    SelectiveKernel,
    SqueezeExcite,
    TripletAttention,
    SpatialGroupEnhance,
    GatedChannelTransformation,
    FrequencyChannelAttention,
    SCSE,
    EfficientLocalAttention,
    PolarizedSelfAttention,
)
from .modules import EMA, GAM, NAM, NonLocal, ShuffleAttention, SimAM  # simam, ema, gam, shuffle, nam, nonlocal
from ._version import __version__
from .capture import capture
from .deploy import ExportReport, export, fuse
from .models import create_model, list_models
from .registry import create, get_module_class, list_modules, parse_spec, register
from .surgery import AttachReport, BlockLayout, IdentityStart, LoadReport, attach, block_layouts, load_pretrained, register_block_layout


_SUBPACKAGES = ("analysis", "data", "train")


def __getattr__(name: str) -> object:
    """attnkit.train, attnkit.data and attnkit.analysis, and attnkit.profile, imported on first use (they pull
    in scipy, tqdm...)."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "profile":
        from .analysis.profile import profile

        return profile
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")

__all__ = [
    "BAM",
    "CBAM",
    "ECA",
    "SRM",
    "CoordAttention",
    "GatherExcite",
    "GlobalContext",
    "SelectiveKernel",
    "SqueezeExcite",
    "TripletAttention",
    # simam, ema, gam, shuffle, nam, nonlocal
    "EMA",
    "GAM",
    "NAM",
    "NonLocal",
    "ShuffleAttention",
    "SimAM",
    "SpatialGroupEnhance",
    "GatedChannelTransformation",
    "FrequencyChannelAttention",
    "SCSE",
    "EfficientLocalAttention",
    "PolarizedSelfAttention",
    "AttachReport",
    "BlockLayout",
    "block_layouts",
    "register_block_layout",
    "IdentityStart",
    "LoadReport",
    "attach",
    "ExportReport",
    "export",
    "fuse",
    "capture",
    "create",
    "create_model",
    "list_models",
    "load_pretrained",
    "get_module_class",
    "list_modules",
    "parse_spec",
    "profile",
    "register",
]
