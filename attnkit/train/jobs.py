"""What one cluster job of a comparison runs: train() for one run, in every process of the job. A job with several
processes (one per GPU) is a torchrun-style world: the job's ranks become RANK/LOCAL_RANK/WORLD_SIZE and
MASTER_ADDR/PORT, which setup_distributed() reads. The job is checkpointable in submitit's sense: when the
cluster preempts it or its time runs out, submitit calls checkpoint() and requeues the same call, and train()
resumes from the run's own last.pt."""
from __future__ import annotations

import os
import zlib
from typing import Any

from ..runs.config import TrainConfig
from .trainer import train

__all__ = ["TrainJob"]


class TrainJob:
    """A picklable callable that trains `config` (which must have resume=True and a run_dir) and returns the run's
    result as compare() records it."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def __call__(self) -> dict[str, Any]:
        os.environ.update(_torchrun_environment())
        return {**train(self.config).to_dict(), "run_dir": self.config.run_dir}

    def checkpoint(self) -> Any:
        """submitit's hook on preemption or time-out: requeue the same call; the run's last.pt is the state."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _torchrun_environment() -> dict[str, str]:
    """The variables torchrun would set, from the job's own ranks; nothing for a job of one process."""
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks == 1:
        return {}
    # a job's processes share one node; one port per job, so that two jobs on a node do not meet on it
    port = 20000 + zlib.crc32(job.job_id.encode()) % 20000
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
