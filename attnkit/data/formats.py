"""Readers for the files the data sets come in: MNIST-family idx files (gzipped or not) and CIFAR python batches."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

# idx type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing; the message names where they were looked for and how to get them."""


def find_file(roots: Iterable[Path], names: Iterable[str], dataset: str, how_to_get: str) -> Path:
    """The first of `names` (each also tried with .gz) that exists in one of `roots`."""
    roots, names = list(roots), list(names)
    for root in roots:
        for name in names:
            for candidate in (root / name, root / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    looked = ", ".join(str(r) for r in roots)
    raise DataNotFoundError(
        f"{dataset}: none of {', '.join(names)} (or .gz) found in {looked}. {how_to_get}"
    )


def read_idx(path: Path) -> Tensor:
    """An idx file (magic: two zero bytes, a type code, the number of dimensions; big-endian int32 sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file: expected the magic 00 00 <type> <ndim>, got {data[:4].hex()}.")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes in all), the file has {len(data)} bytes.")
    array = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch needs nothing else, and a pickle
    that asks for any other callable is refused instead of run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"a CIFAR batch holds only arrays, lists and bytes; refusing {module}.{name}")
        return super().find_class(module, name)


def check_labels(labels: Tensor, num_classes: int, source: object) -> Tensor:
    """`labels` if every one is a class index 0..num_classes−1, else a ValueError naming the file and a bad label."""
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(f"{source}: labels must be class indices 0..{num_classes - 1}, but {len(bad)} are not "
                         f"(the first, at index {i}, is {int(labels[i])}).")
    return labels


def read_cifar_batches(paths: list[Path], label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """CIFAR-10/100 python batches: a pickled dict with b'data' (N×3072 uint8, RGB planes) and labels."""
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"{path} is not a readable CIFAR batch ({type(error).__name__}: {error}).") from error
        key = label_key.encode()
        if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
            raise ValueError(f"{path} is not a CIFAR batch: expected a dict with b'data' and {key!r}.")
        data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[key])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(f"{path}: b'data' must be N×3072 uint8 (32×32 RGB planes), got {data.shape} {data.dtype}.")
        if batch_labels.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but labels of shape {batch_labels.shape}.")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(check_labels(torch.from_numpy(batch_labels.astype(np.int64)), num_classes, path))
    return torch.from_numpy(np.concatenate(images)), torch.cat(labels)
