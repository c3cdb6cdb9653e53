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
)
from .registry import create, get_module_class, list_modules, parse_spec, register

__version__ = "0.1.0"

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
    "create",
    "get_module_class",
    "list_modules",
    "parse_spec",
    "register",
]
