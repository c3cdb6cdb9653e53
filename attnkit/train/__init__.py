"""Training: TrainConfig holds a run's options, train() runs it (one process or torchrun), compare() runs the
plain network and each attention variant over paired seeds and reports what the attention bought."""
from .checkpoint import load_checkpoint, save_checkpoint
from .compare import DEFAULT_MODULES, CompareResult, compare
from .config import TrainConfig
from .trainer import TrainResult, build_model, model_from_checkpoint, seed_everything, train

__all__ = ["DEFAULT_MODULES", "CompareResult", "TrainConfig", "compare", "TrainResult", "build_model", "load_checkpoint", "model_from_checkpoint",
           "save_checkpoint", "seed_everything", "train"]
