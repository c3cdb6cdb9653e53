"""What a run's numbers depend on besides its options: the CPU, PyTorch's CPU kernels (the instruction set it chose,
which ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower), the thread count and the versions. A fixed seed reproduces a
run bit for bit when all of these are the same, and only then: another kernel set or thread count rounds differently,
and a few hundred steps of training turn that into other weights."""
from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["cpu_model", "environment", "warn_if_different"]


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """This process's: cpu, cpu_kernels (PyTorch's CPU capability, e.g. AVX512 or AVX2), onednn_max_isa where set,
    threads, and the versions of torch and numpy."""
    from .._version import __version__

    found: dict[str, Any] = {"cpu": cpu_model(), "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        found["onednn_max_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    found.update(threads=torch.get_num_threads(), torch=str(torch.__version__), numpy=str(np.__version__),
                 attnkit=__version__)
    return found


def warn_if_different(recorded: Mapping[str, Any] | None, what: str) -> None:
    """A RuntimeWarning when `recorded` (a run's environment) differs from this process's: `what` (a checkpoint being
    resumed) then goes on, but not bit for bit as it would have where it was started."""
    if not recorded:
        return
    now = environment()
    differences = [f"{key} {recorded.get(key)!r} there, {now.get(key)!r} here" for key in sorted(set(now) | set(recorded))
                   if recorded.get(key) != now.get(key)]
    if differences:
        warnings.warn(f"{what} was trained in another environment ({'; '.join(differences)}): it goes on, but not bit for "
                      f"bit as it would have there (float results depend on the CPU kernels and the thread count).",
                      RuntimeWarning, stacklevel=3)
