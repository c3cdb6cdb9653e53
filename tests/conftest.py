from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's interpreter, on the CPU (tests/kernels/test_triton.py). Triton and
# attnkit's Triton backend read this when they are imported, which must come after it: attnkit.train below imports
# torch.utils.flop_counter, which imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnkit.train import TrainConfig  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist, the cores are shared among the workers: each gets its share of torch threads instead of
    every worker starting one thread per core (which makes them wait on each other at every operation)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def tiny(tmp_path):
    """A run that takes a second or two: LeNet on the embedded digits at 28×28."""

    def make(**overrides):
        options = dict(model="lenet", dataset="digits", image_size=28, epochs=2, batch_size=64, lr=0.05,
                       progress=False, tensorboard=False, run_dir=str(tmp_path / "run"), threads=1)
        return TrainConfig(**{**options, **overrides})

    return make


@pytest.fixture
def one_thread():
    """For tests that count and compare, not time: one intra-op thread keeps them fast when another process
    shares the cores (two threads on two busy cores wait on each other at every operation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
