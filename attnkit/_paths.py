"""Where attnkit keeps files it makes for itself."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ATTNKIT_CACHE, else $XDG_CACHE_HOME/attnkit, else ~/.cache/attnkit (the compiled CPU kernels, generated YOLO
    yamls)."""
    if os.environ.get("ATTNKIT_CACHE"):
        return Path(os.environ["ATTNKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnkit"
