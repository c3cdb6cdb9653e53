"""What a training run leaves and what reads it back: its options (TrainConfig), its checkpoints (written
atomically, read through one check), its network rebuilt from them, and a run loaded with its data set to analyse.
Training writes runs and analysis reads them; both stand on this package."""
from .checkpoint import check_checkpoint, load_checkpoint, nonfinite_tensors, save_checkpoint
from .config import CHOICES, RESUMABLE_CHANGES, TrainConfig
from .load import LoadedRun, load_run, run_data
from .model import build_model, load_weights, model_arch, model_from_checkpoint

__all__ = ["CHOICES", "LoadedRun", "RESUMABLE_CHANGES", "TrainConfig", "build_model", "check_checkpoint", "load_checkpoint",
           "load_run", "load_weights", "model_arch", "model_from_checkpoint", "nonfinite_tensors", "run_data",
           "save_checkpoint"]
