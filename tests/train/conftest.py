from __future__ import annotations

import pytest

from attnkit.train import TrainConfig


@pytest.fixture
def tiny(tmp_path):
    """A run that takes a second or two: LeNet on the embedded digits at 28×28."""

    def make(**overrides):
        options = dict(model="lenet", dataset="digits", image_size=28, epochs=2, batch_size=64, lr=0.05,
                       progress=False, tensorboard=False, run_dir=str(tmp_path / "run"), threads=1)
        return TrainConfig(**{**options, **overrides})

    return make
