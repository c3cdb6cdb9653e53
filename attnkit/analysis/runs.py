"""A trained run to analyse, defined in attnkit.runs.load (below both training and analysis)."""
from ..runs.load import LoadedRun, load_run, run_data

__all__ = ["LoadedRun", "load_run", "run_data"]
