"""Each data set's loader on small files written here in the real formats: idx (raw and gzipped), CIFAR python
batches, an image folder of PNGs; and the embedded and synthetic sets."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from attnkit.data import load_dataset
from attnkit.data.formats import DataNotFoundError, read_cifar_batches, read_idx


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(str(path) + (".gz" if compress else ""), "wb").write(data)


def fake_mnist(root, n_train=12, n_test=6, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_family_reads_idx_files(tmp_path, compress, name):
    arrays = fake_mnist(tmp_path, compress=compress)
    data = load_dataset(name, tmp_path)
    images, labels = data.train
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["train"][0].astype(np.uint8)))
    assert torch.equal(labels, torch.from_numpy(arrays["train"][1]).long())
    assert data.test[0].shape == (6, 1, 28, 28) and data.num_classes == 10 and data.in_chans == 1


def test_idx_files_in_torchvision_layout_and_resized(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    fake_mnist(raw)
    data = load_dataset("mnist", tmp_path, image_size=32)
    assert data.train[0].shape == (12, 1, 32, 32) and data.image_size == 32


def test_idx_header_that_disagrees_with_the_file_is_an_error(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes([0, 0, 8, 2]) + struct.pack(">2i", 5, 5) + bytes(20))
    with pytest.raises(ValueError, match=r"shape \(5, 5\) \(37 bytes in all\), the file has 32 bytes"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="is not an idx file"):
        read_idx(path)


def test_missing_data_names_the_folders_and_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "train-images-idx3-ubyte" in message and "--download" in message
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)


def write_cifar(path, n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, label_key.encode(): labels}, f)
    return data, labels


def test_cifar10_reads_the_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = [write_cifar(folder / f"data_batch_{i}", 4, "labels", 10, i) for i in range(1, 6)]
    write_cifar(folder / "test_batch", 3, "labels", 10, 9)
    data = load_dataset("cifar10", tmp_path)
    images, labels = data.train
    assert images.shape == (20, 3, 32, 32) and data.augment == "crop_flip"
    # the rows are the R, G and B planes of a 32×32 image, in that order
    assert torch.equal(images[4], torch.from_numpy(written[1][0][0].reshape(3, 32, 32)))
    assert labels.tolist() == sum((w[1] for w in written), [])


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _, labels = write_cifar(folder / "train", 5, "fine_labels", 100, 0)
    write_cifar(folder / "test", 2, "fine_labels", 100, 1)
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.train[1].tolist() == labels


def test_cifar_reader_refuses_a_pickle_that_runs_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match=f"{path} is not a readable CIFAR batch .*refusing builtins.print"):
        read_cifar_batches([path], "labels", 10)


def _cifar_file(path, contents) -> object:
    path.write_bytes(contents if isinstance(contents, bytes) else pickle.dumps(contents))
    return path


@pytest.mark.parametrize(
    "contents, message",
    [
        (b"", r"is not a readable CIFAR batch \(EOFError"),
        (np.random.default_rng(0).bytes(500), r"is not a readable CIFAR batch"),
        ([1, 2, 3], r"is not a CIFAR batch: expected a dict with b'data' and b'labels'"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"b'data' must be N×3072 uint8 .*got \(2, 1024\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"b'data' must be N×3072 uint8 .*float32"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 images but labels of shape \(1,\)"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 10, -1]},
         r"labels must be class indices 0..9, but 2 are not \(the first, at index 1, is 10\)"),
    ],
    ids=["empty", "random-bytes", "not-a-dict", "wrong-width", "wrong-dtype", "label-count", "label-range"],
)
def test_broken_cifar_batches_are_named(tmp_path, contents, message):
    path = _cifar_file(tmp_path / "data_batch_1", contents)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        read_cifar_batches([path], "labels", 10)


def test_mnist_labels_out_of_range_name_the_file(tmp_path):
    fake_mnist(tmp_path, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 12]), compress=False)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels must be class indices 0..9.*index 5, is 12"):
        load_dataset("mnist", tmp_path)


def test_image_folder_reads_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / part / cls / f"{i}.png")
    data = load_dataset("imagefolder", tmp_path, image_size=24)
    assert data.classes == ["cat", "dog"] and len(data) == 6
    x, y = next(iter(data.loader(True, 4, seed=0)))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    batches = list(data.loader(False, 4))
    assert sum(len(b[1]) for b in batches) == 4 and batches[0][0].shape[-2:] == (24, 24)
    (tmp_path / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"val/dog/broken.png is not a readable image"):
        list(load_dataset("imagefolder", tmp_path, image_size=24).loader(False, 4))
    with pytest.warns(UserWarning, match=r"left out 1 image\(s\) that cannot be decoded: .*val/dog/broken.png"):
        skipping = load_dataset("imagefolder(skip_bad=True)", tmp_path, image_size=24)
    assert len(skipping.test) == 4 and sum(len(b[1]) for b in skipping.loader(False, 4)) == 4
    with pytest.raises(DataNotFoundError, match="val is not a folder"):
        (tmp_path / "val").rename(tmp_path / "validation")
        load_dataset("imagefolder", tmp_path)


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert len(a.train[1]) == 1437 and len(a.test[1]) == 360 and a.train[0].shape[-1] == 16
    counts = torch.bincount(a.test[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 20% of each class
    native = load_dataset("digits", image_size=8)
    train_rows = {tuple(x.flatten().tolist()) for x in native.train[0]}
    overlap = sum(tuple(x.flatten().tolist()) in train_rows for x in native.test[0])
    assert overlap <= 2  # scikit-learn's digits hold a couple of identical images; the split is by index


def test_synthetic_options_and_unknown_options():
    data = load_dataset("synthetic(samples=64, test_samples=16, channels=1, num_classes=3)", image_size=12)
    assert data.train[0].shape == (64, 1, 12, 12) and data.num_classes == 3 and data.train[1].max() < 3
    with pytest.raises(ValueError, match="'synthetic' has no argument 'sample'.*Did you mean 'samples'"):
        load_dataset("synthetic(sample=64)")
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'.*Did you mean"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="nothing to download for digits"):
        load_dataset("digits", download=True)
