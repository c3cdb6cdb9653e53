"""Batching that is the same on one process and on many: every rank draws the same global order and the same
augmentation for the global batch, and takes its slice, so `--batch-size` means the global batch whatever the
number of processes, and a run is reproducible from its seed alone."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

__all__ = ["FolderLoader", "Loader", "TensorLoader", "epoch_generator"]


class Loader(Protocol):
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def __len__(self) -> int: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for one epoch's order and augmentation: a function of (seed, epoch) only, so a resumed
    run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def _check_batch(batch_size: int, world_size: int, samples: int, train: bool) -> int:
    """The batch of one process; training drops the last incomplete batch, so it needs one whole batch at least."""
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(f"--batch-size is the global batch and must be a multiple of the {world_size} processes, got {batch_size}.")
    if train and samples < batch_size:
        raise ValueError(f"--batch-size {batch_size} is larger than the {samples} training images: training would have "
                         f"no batch. Give a smaller --batch-size or more images.")
    return batch_size // world_size


def pad_crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, pad: int = 4) -> Tensor:
    """Zero-pad by `pad`, crop back to the original size at `offsets` (B×2: row, column), mirror where `flips`."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h)
    cols = torch.where(flips[:, None], torch.arange(w - 1, -1, -1), torch.arange(w)) + offsets[:, 1:]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class TensorLoader:
    """Batches of in-memory uint8 images, normalised to float32; training batches are shuffled per epoch and
    drop the last incomplete batch, evaluation batches cover every sample once across the ranks. `refresh(epoch)`,
    where given, gives each epoch's images and labels instead of `images` and `labels`."""

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 augment: str = "none", refresh: Callable[[int], tuple[Tensor, Tensor]] | None = None) -> None:
        if augment not in ("none", "crop_flip"):
            raise ValueError(f"in-memory data takes augment 'none' or 'crop_flip', got {augment!r}.")
        self.images, self.labels, self.train, self.seed = images, labels, train, seed
        self.batch_size, self.rank, self.world_size, self.augment = batch_size, rank, world_size, augment
        self.local_batch = _check_batch(batch_size, world_size, len(labels), train)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.refresh = refresh
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.refresh is not None:  # data made anew for every epoch: the same count, other images
            self.images, self.labels = self.refresh(epoch)

    def __len__(self) -> int:
        if self.train:
            return len(self.labels) // self.batch_size
        return math.ceil(len(range(self.rank, len(self.labels), self.world_size)) / self.local_batch)

    def _normalize(self, images: Tensor) -> Tensor:
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.train:
            shard = torch.arange(self.rank, len(self.labels), self.world_size)
            for idx in shard.split(self.local_batch):
                yield self._normalize(self.images[idx]), self.labels[idx]
            return
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(len(self.labels), generator=g)
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        for step in range(len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.images[idx[mine]]
            if self.augment == "crop_flip":
                offsets = torch.randint(0, 9, (self.batch_size, 2), generator=g)
                flips = torch.rand(self.batch_size, generator=g) < 0.5
                images = pad_crop_flip(images, offsets[mine], flips[mine])
            yield self._normalize(images), self.labels[idx[mine]]


class _ShardSampler(Sampler[int]):
    def __init__(self, loader: "FolderLoader") -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[int]:
        lo = self.loader
        n = len(lo.dataset)
        if not lo.train:
            yield from range(lo.rank, n, lo.world_size)
            return
        order = torch.randperm(n, generator=epoch_generator(lo.seed, lo.epoch))
        for step in range(n // lo.batch_size):
            start = step * lo.batch_size + lo.rank * lo.local_batch
            yield from order[start:start + lo.local_batch].tolist()

    def __len__(self) -> int:
        lo = self.loader
        return (len(lo.dataset) // lo.batch_size) * lo.local_batch if lo.train else len(range(lo.rank, len(lo.dataset), lo.world_size))


class FolderLoader:
    """Batches of a torchvision data set decoded by `workers` processes, in the same order scheme as TensorLoader."""

    def __init__(self, dataset: torch.utils.data.Dataset, *, batch_size: int, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 0) -> None:
        self.dataset, self.train, self.seed, self.batch_size = dataset, train, seed, batch_size
        self.rank, self.world_size, self.workers, self.epoch = rank, world_size, workers, 0
        self.local_batch = _check_batch(batch_size, world_size, len(dataset), train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(_ShardSampler(self)) / self.local_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = epoch_generator(self.seed + 1, self.epoch)  # worker seeds for the random transforms
        yield from DataLoader(self.dataset, batch_size=self.local_batch, sampler=_ShardSampler(self),
                              num_workers=self.workers, generator=g, persistent_workers=False,
                              pin_memory=torch.cuda.is_available())
