"""Per-epoch metrics to metrics.csv (rewritten whole from the run's history, so it always agrees with the
checkpoint) and to TensorBoard when the tensorboard package is installed."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes

__all__ = ["MetricsLogger"]


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, start_epoch: int = 0) -> None:
        self.csv_path = run_dir / "metrics.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to metrics.csv only (pip install tensorboard).", stacklevel=2)
            else:
                # purge_step drops events a killed run wrote after its last checkpoint
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch or None)

    def log(self, history: list[dict[str, Any]]) -> None:
        row = history[-1]
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
            self.writer.flush()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(self.csv_path, text.getvalue().encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
