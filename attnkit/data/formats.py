"""Readers for the files the data sets come in: MNIST-family idx files (gzipped or not), CIFAR python batches and
image files. A file that is damaged, cut short or not what it claims to be is a ValueError naming it, never a
decoder's traceback, and a reader never allocates more memory than the file's real contents need, whatever its
header declares."""
from __future__ import annotations

import gzip
import io
import math
import pickle
import pickletools
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable

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


def _read_up_to(f: BinaryIO, size: int) -> bytes:
    """At most `size` bytes of `f`, read in pieces: memory follows what the file holds, not what it declares."""
    pieces, left = [], size
    while left > 0:
        piece = f.read(min(left, 1 << 24))
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def _count_rest(f: BinaryIO) -> int:
    return sum(len(piece) for piece in iter(lambda: f.read(1 << 24), b""))


def read_idx(path: Path) -> Tensor:
    """An idx file (magic: two zero bytes, a type code, the number of dimensions; big-endian int32 sizes)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise ValueError(f"{path} is not an idx file: expected the magic 00 00 <type> <ndim>, got {magic.hex()}.")
            head = 4 + 4 * magic[3]
            sizes = f.read(head - 4)
            shape = struct.unpack(f">{magic[3]}i", sizes) if len(sizes) == head - 4 else None
            if shape is None or any(s < 0 for s in shape):
                given = "cut short" if shape is None else shape
                raise ValueError(f"{path}: the idx header's {magic[3]} sizes are {given}; sizes are counts, 0 or more.")
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            expected = head + math.prod(shape) * dtype.itemsize  # Python integers: no overflow
            body = _read_up_to(f, expected - head)
            found = head + len(body) + _count_rest(f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a whole gzip file ({type(error).__name__}: {error}). Download it again, "
                         f"or unpack it and drop the .gz.") from None
    if found != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes in all), the file has {found} bytes.")
    array = np.frombuffer(body, dtype).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


class _NdarrayClass:
    """What a CIFAR batch's pickle gets for numpy.ndarray: the class to name in numpy's _reconstruct, which it
    cannot call (numpy.ndarray((2**28, 3072), 'u1') would allocate 768 GiB a file of 60 bytes asks for)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayClass()


def _empty_array(subtype: object, shape: tuple, dtype: object) -> np.ndarray:
    """numpy's _reconstruct as pickled arrays use it: an empty array, which the pickle's next step fills from bytes
    it holds itself (numpy checks that the shape it then declares matches them)."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"a CIFAR batch rebuilds arrays as numpy pickles them; refusing _reconstruct"
                                     f"({subtype!r}, {shape!r})")
    return np.ndarray((0,), dtype)


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """codecs.encode as Python 3 pickles bytes at protocols 0-2 (text, 'latin1'), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"a CIFAR batch encodes bytes as latin-1 text; refusing codecs.encode with "
                                     f"{encoding!r}")
    return text.encode("latin-1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch needs nothing else, and a pickle
    that asks for any other callable is refused instead of run. Arrays are rebuilt only from the pickle's own
    bytes, so a small file cannot ask for a large allocation."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _empty_array,
        ("numpy._core.multiarray", "_reconstruct"): _empty_array,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.numeric", "_frombuffer"): None,  # protocol 5 (Python 3.14's default): a view of its bytes
        ("numpy._core.numeric", "_frombuffer"): None,
        ("_codecs", "encode"): _latin1_bytes,  # protocols 0-2 in Python 3: bytes as latin-1 text
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"a CIFAR batch holds only arrays, lists and bytes; refusing {module}.{name}")
        return self._ALLOWED[module, name] or super().find_class(module, name)


def _unpickle_batch(data: bytes) -> Any:
    """A CIFAR batch from its bytes. Every length the pickle declares is checked against the bytes that follow
    first (pickletools reads them; the unpickler would allocate the length before finding the bytes missing)."""
    if not data:
        raise EOFError("the file is empty")
    for _ in pickletools.genops(data):
        pass
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()


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
            batch = _unpickle_batch(path.read_bytes())
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                MemoryError, OverflowError, RecursionError) as error:
            raise ValueError(f"{path} is not a readable CIFAR batch ({type(error).__name__}: {error}).") from error
        key = label_key.encode()
        if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
            raise ValueError(f"{path} is not a CIFAR batch: expected a dict with b'data' and {key!r}.")
        try:
            data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[key])
        except (ValueError, TypeError, OverflowError) as error:  # lists of mixed lengths or types
            raise ValueError(f"{path}: b'data' and {key!r} must be arrays or lists of numbers ({error}).") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(f"{path}: b'data' must be N×3072 uint8 (32×32 RGB planes), got {data.shape} {data.dtype}.")
        if batch_labels.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but labels of shape {batch_labels.shape}.")
        if batch_labels.size and not np.issubdtype(batch_labels.dtype, np.integer):  # ints beyond 64 bits, text, floats
            raise ValueError(f"{path}: labels must be integers (class indices), got {batch_labels.dtype} values such as "
                             f"{batch_labels[:1].tolist()[0]!r:.40}.")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(check_labels(torch.from_numpy(batch_labels.astype(np.int64)), num_classes, path))
    return torch.from_numpy(np.concatenate(images)), torch.cat(labels)


def read_image(path: str | Path, mode: str = "RGB") -> Any:
    """The image at `path`, decoded by Pillow and converted to `mode`. A file that cannot be decoded (corrupt,
    truncated, not an image) and one with more pixels than Pillow decodes safely (a decompression bomb: Pillow's
    Image.MAX_IMAGE_PIXELS, twice over) are a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path} is too large to decode safely ({error}). Resize it, or leave it out.") from None
    # PIL's UnidentifiedImageError is an OSError; an ImportError comes from a fallback another library patched into
    # Image.open for files Pillow cannot identify (Ultralytics tries the pi-heif plugin, which may be missing)
    except (OSError, SyntaxError, ValueError, ImportError) as error:
        raise ValueError(f"{path} is not a readable image ({type(error).__name__}: {error}).") from error
