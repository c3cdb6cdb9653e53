"""Training checkpoints, defined in attnkit.runs.checkpoint (below both training and analysis, which read them)."""
from ..runs.checkpoint import ARCH_LIMITS, check_checkpoint, load_checkpoint, nonfinite_tensors, save_checkpoint

__all__ = ["ARCH_LIMITS", "check_checkpoint", "load_checkpoint", "nonfinite_tensors", "save_checkpoint"]
