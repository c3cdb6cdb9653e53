"""Put attention modules into existing networks: attach() and its sites, identity start, load_pretrained().

    sites.py     where attention goes: declared sites, block layouts, traced residual additions, stage outputs
    layouts.py   one declared entry per family of blocks (torchvision's, timm's, attnkit's; users register theirs)
    probe.py     the one forward pass that measures channel counts and stages
    gating.py    how a gate follows a layer without renaming anything (and stays picklable and traceable)
    endings.py   torchvision's and timm's ResNet blocks ending in their last gate's pass, as attnkit's own
    attach.py    attach() and its report
    pretrained.py  load_pretrained()
"""
from .attach import AttachedSite, AttachReport, IdentityStart, attach, parse_placement
from .gating import gates_before, gates_of, is_gated, with_gates_of
from .layouts import BlockLayout, block_layouts, has_attributes, of_class, register_block_layout
from .pretrained import LoadReport, load_pretrained

__all__ = [
    "AttachReport",
    "AttachedSite",
    "BlockLayout",
    "IdentityStart",
    "LoadReport",
    "attach",
    "block_layouts",
    "gates_before",
    "gates_of",
    "has_attributes",
    "is_gated",
    "load_pretrained",
    "of_class",
    "parse_placement",
    "register_block_layout",
    "with_gates_of",
]
