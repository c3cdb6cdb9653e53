"""Data files that are hostile, damaged or not what they say, written here: each is one error naming the file (no
traceback, no allocation the file's contents do not justify, no silent truncation); and genuine CIFAR batches
however Python pickled them are read."""
from __future__ import annotations

import gzip
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from attnkit.data import load_dataset
from attnkit.data.formats import read_cifar_batches
from tests.data.test_formats import fake_mnist

from .conftest import one_line_error


# ---------------------------------------------------------------------------------------------- images
def _png(path, width: int, height: int, rows: int | None = None) -> None:
    """An 8-bit grey PNG of width×height whose pixel data holds `rows` rows (all of them by default): a header that
    declares 20000×20000 is 60 bytes, and Pillow refuses it before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(width % 256))[:width].ljust(width, b"\x80")
                                    for _ in range(height if rows is None else rows)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _image_folder(root, per_class: int = 2, bomb: bool = False):
    for part in ("train", "val"):
        for label in ("a", "b"):
            for i in range(per_class):
                _png(root / part / label / f"{i}.png", 12, 12)
    if bomb:
        _png(root / "train" / "a" / "bomb.png", 20000, 20000, rows=1)
    return root


def test_a_decompression_bomb_in_an_image_folder_is_named(tmp_path, capsys):
    root = _image_folder(tmp_path / "images", per_class=4, bomb=True)
    err = one_line_error(capsys, "train", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16",
                         "--batch-size", "3", "--epochs", "1", "--threads", "1", "--run-dir", str(tmp_path / "run"),
                         "--no-tensorboard", "--no-progress")
    assert f"{root / 'train' / 'a' / 'bomb.png'} is too large to decode safely (Image size (400000000 pixels)" in err
    with pytest.warns(UserWarning, match="left out 1 image.*bomb.png"):
        data = load_dataset("imagefolder(skip_bad=True)", root, image_size=16)
    assert len(data.train) == 8


def test_a_decompression_bomb_given_to_explain_is_named(se_run, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _png(bomb, 20000, 20000, rows=1)
    err = one_line_error(capsys, "explain", str(se_run / "last.pt"), "--images", str(bomb), "--out", str(tmp_path / "x"))
    assert f"{bomb} is too large to decode safely" in err


def test_an_image_folder_smaller_than_the_batch_says_so(tmp_path, capsys):
    """It used to train on no batch at all and report 'loss became nan at step 1 ... Lower --lr'."""
    root = _image_folder(tmp_path / "images")
    err = one_line_error(capsys, "train", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16",
                         "--epochs", "1", "--run-dir", str(tmp_path / "run"), "--no-tensorboard", "--no-progress")
    assert "--batch-size 64 is larger than the 4 training images: training would have no batch" in err
    assert "nan" not in err


# ---------------------------------------------------------------------------------------------- idx files
def _idx(code: int, shape: tuple[int, ...], body: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}i", *shape) + body


IDX_DAMAGE = {  # file to replace in a good MNIST folder -> its new bytes (as written) -> what the error says
    "truncated-gz": ("train-images-idx3-ubyte.gz", lambda good: good[: len(good) // 2],
                     "is not a whole gzip file .*EOFError: Compressed file ended before the end-of-stream marker"),
    "not-gzip": ("train-images-idx3-ubyte.gz", lambda good: gzip.decompress(good),
                 "is not a whole gzip file .*BadGzipFile: Not a gzipped file"),
    "negative-size": ("train-labels-idx1-ubyte.gz", lambda good: gzip.compress(_idx(0x08, (-5,), b"")),
                      r"the idx header's 1 sizes are \(-5,\); sizes are counts, 0 or more"),
    "overflowing-sizes": ("train-images-idx3-ubyte.gz",
                          lambda good: gzip.compress(_idx(0x08, (2**31 - 1,) * 3, bytes(100))),
                          rf"header says shape \(2147483647, 2147483647, 2147483647\) \({16 + (2**31 - 1)**3} bytes "
                          rf"in all\), the file has 116 bytes"),
    "sizes-cut-short": ("t10k-labels-idx1-ubyte.gz", lambda good: gzip.compress(bytes([0, 0, 8, 3, 0, 0])),
                        "the idx header's 3 sizes are cut short"),
    "float-labels": ("train-labels-idx1-ubyte.gz",
                     lambda good: gzip.compress(_idx(0x0D, (12,), struct.pack(">12f", *[1.7] * 12))),
                     "expected images of unsigned bytes .* and integer labels, got torch.uint8 images and torch.float32 labels"),
}


@pytest.mark.parametrize("kind", IDX_DAMAGE)
def test_damaged_idx_files_are_named(tmp_path, capsys, kind):
    fake_mnist(tmp_path)
    name, damage, message = IDX_DAMAGE[kind]
    path = tmp_path / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("mnist", tmp_path)
    assert name in str(info.value)
    err = one_line_error(capsys, "train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--run-dir",
                         str(tmp_path / "run"), "--no-progress")
    assert name in err


# ---------------------------------------------------------------------------------------------- CIFAR batches
def _cifar_folder(root, batches: dict[str, bytes]):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batches.get(name, good))
    return folder


class _Allocates:
    """Unpickles as numpy.ndarray((2**28, 3072), 'u1'): 768 GiB, asked for by a pickle of under 200 bytes."""

    def __reduce__(self):
        return np.ndarray, ((2**28, 3072), np.dtype("u1"))


CIFAR_DAMAGE = {
    "label-2**70": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 2**70]}),
                    r"labels must be integers \(class indices\), got object values such as 0"),
    "string-label": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "cat"]}),
                     r"labels must be integers \(class indices\), got <U21 values such as '0'"),
    "float-label": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.0]}),
                    "labels must be integers"),
    "bytes8-of-1-TiB": (b"\x80\x04}\x94(C\x04data\x94\x8e" + struct.pack("<Q", 2**40) + b"\x00" * 39,
                        "expected 1099511627776 bytes in a bytes8, but only 39 remain"),
    "array-of-768-GiB": (pickle.dumps({b"data": _Allocates(), b"labels": [0]}, protocol=2),
                         "is not a readable CIFAR batch"),
    "array-bigger-than-its-bytes": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
                                    .replace(b"K\x02M\x00\x0c\x86", b"J\x00\x00\x00\x10M\x00\x0c\x86"),
                                    "is not a readable CIFAR batch"),
}


@pytest.mark.parametrize("kind", CIFAR_DAMAGE)
def test_damaged_or_hostile_cifar_batches_are_named(tmp_path, kind):
    contents, message = CIFAR_DAMAGE[kind]
    if kind == "bytes8-of-1-TiB":
        assert len(contents) == 60
    if kind == "array-bigger-than-its-bytes":  # the shape (2, 3072) now says (2**28, 3072)
        assert b"J\x00\x00\x00\x10" in contents
    folder = _cifar_folder(tmp_path, {"data_batch_2": contents})
    with pytest.raises(ValueError, match=f"{folder / 'data_batch_2'}.*{message}"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_genuine_cifar_batches_are_read_whatever_the_pickle_protocol(tmp_path, protocol):
    """Protocol 5 is Python 3.14's default, protocol 2 what Python 3 writes for Python 2 readers (bytes as
    codecs.encode(text, 'latin1'))."""
    rng = np.random.default_rng(protocol)
    data, labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [3, 1, 4]
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"batch_label": b"training batch 1 of 5", b"data": data, b"labels": labels},
                                  protocol=protocol))
    images, read = read_cifar_batches([path], "labels", 10)
    assert torch.equal(images, torch.from_numpy(data.reshape(3, 3, 32, 32))) and read.tolist() == labels


def test_cifar_labels_beyond_int64_are_refused_not_wrapped_into_a_class(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([0, 2**64 - 1], np.uint64)}))
    with pytest.raises(ValueError, match=r"labels must be class indices 0..9, but 1 are not"):
        read_cifar_batches([path], "labels", 10)
