"""The attention modules, one file per family; importing this package registers them all."""
from .bam import BAM
from .cbam import CBAM
from .coord import CoordAttention
from .eca import ECA, eca_kernel_size
from .gc import GlobalContext
from .ge import GatherExcite
from .se import SqueezeExcite
from .sk import SelectiveKernel
from .srm import SRM
from .triplet import TripletAttention
from .sge import SpatialGroupEnhance
from .gct import GatedChannelTransformation
from .fca import FrequencyChannelAttention
from .scse import SCSE
from .ela import EfficientLocalAttention
from .psa import PolarizedSelfAttention

# simam, ema, gam, shuffle, nam, nonlocal
from .ema import EMA
from .gam import GAM
from .nam import NAM
from .non_local import NonLocal
from .shuffle import ShuffleAttention
from .simam import SimAM

__all__ = [
    "BAM",
    "CBAM",
    "CoordAttention",
    "ECA",
    "GatherExcite",
    "GlobalContext",
    "SRM",
    "SelectiveKernel",
    "SqueezeExcite",
    "TripletAttention",
    "eca_kernel_size",
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
]
