"""Training: TrainConfig holds a run's options, train() runs it (one process or torchrun), compare() runs the
plain network and each attention variant over paired seeds and reports what the attention bought."""
from ..runs import TrainConfig, build_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from .trainer import TrainResult, seed_everything, train

_COMPARISON = ("DEFAULT_MODULES", "CompareResult", "compare")


def __getattr__(name: str) -> object:
    """compare(), CompareResult and DEFAULT_MODULES, which live in attnkit.compare (a layer above training: it
    trains and then reports), imported on first use."""
    if name in _COMPARISON:
        from .. import compare

        return getattr(compare, name)
    raise AttributeError(f"module 'attnkit.train' has no attribute {name!r}")


__all__ = ["DEFAULT_MODULES", "CompareResult", "TrainConfig", "compare", "TrainResult", "build_model", "load_checkpoint", "model_from_checkpoint",
           "save_checkpoint", "seed_everything", "train"]
