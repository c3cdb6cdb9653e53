"""Per-epoch metrics to metrics.csv (rewritten whole from the run's history, so it always agrees with the
checkpoint) and to TensorBoard when the tensorboard package is installed."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from ..files import make_folder, write_text

__all__ = ["MetricsLogger"]


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, history: list[dict[str, Any]] | None = None) -> None:
        """`history`: the epochs a resumed run has saved. Their metrics are written again, the last epoch's to
        TensorBoard too: its events may be missing (written after the checkpoint, which a kill can prevent), and
        events of later epochs, which a killed run may have written, are dropped."""
        self.csv_path = run_dir / "metrics.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to metrics.csv only (pip install tensorboard).", stacklevel=2)
            else:
                # purge_step hides the events from that step on that earlier event files hold
                folder = make_folder(run_dir / "tensorboard", own=True)
                self.writer = SummaryWriter(str(folder), purge_step=history[-1]["epoch"] if history else None)
        if history:
            self.log(history)

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
        write_text(self.csv_path, text.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
