"""The data sets by name. In-memory ones (digits, MNIST-family, CIFAR, synthetic) are held as uint8 tensors
and batched by TensorLoader; image folders are decoded from disk by torchvision's ImageFolder."""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Registry, check_kwargs
from .cluttered import make_cluttered
from .formats import DataNotFoundError, check_labels, find_file, read_cifar_batches, read_idx, read_image
from .loader import FolderLoader, Loader, TensorLoader

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Dataset:
    """Train and test splits plus what a model and a loader need to know about them.

    For in-memory data `train` and `test` are (images uint8 N×C×H×W, labels int64 N); for image folders they
    are torchvision ImageFolder data sets.
    """

    name: str
    train: Any
    test: Any
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # "none", "crop_flip" (pad 4, random crop, horizontal flip), or "resized_crop_flip"
    classes: list[str] = field(default_factory=list)
    #: in-memory data made anew for every epoch: the epoch's training split (`train` is epoch 0's); None: `train` always
    train_for_epoch: Callable[[int], tuple[Tensor, Tensor]] | None = None

    def loader(self, train: bool, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
               workers: int = 0) -> Loader:
        """Batches of one split. `batch_size` is the global batch; each of `world_size` ranks gets its share."""
        split = self.train if train else self.test
        if isinstance(split, tuple):
            return TensorLoader(*split, batch_size=batch_size, train=train, seed=seed, rank=rank,
                                world_size=world_size, mean=self.mean, std=self.std,
                                augment=self.augment if train else "none",
                                refresh=self.train_for_epoch if train else None)
        return FolderLoader(split, batch_size=batch_size, train=train, seed=seed, rank=rank,
                            world_size=world_size, workers=workers)

    def __len__(self) -> int:
        return len(self.train[1]) if isinstance(self.train, tuple) else len(self.train)


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255)
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())


def _in_memory(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], image_size: int | None,
               augment: str, classes: list[str]) -> Dataset:
    size = image_size or train[0].shape[-1]
    train, test = (_resize(train[0], size), train[1]), (_resize(test[0], size), test[1])
    mean, std = _stats(train[0])
    return Dataset(name, train, test, len(classes), train[0].shape[1], size, mean, std, augment, classes)


def _digit_split(test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as uint8 N×8×8 images (0–16 grey levels scaled to 0–255) and labels, with the
    indices of a fixed stratified train/test split: the same test images on every machine."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images * (255 / 16)).round().to(torch.uint8)
    tr, te = train_test_split(range(len(bunch.target)), test_size=test_fraction, stratify=bunch.target, random_state=0)
    return images, torch.from_numpy(bunch.target).long(), torch.tensor(sorted(tr)), torch.tensor(sorted(te))


def digits(image_size: int | None = 16, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's handwritten digits (1,797 real 8×8 images), shipped inside the package, upsampled to
    16×16 by default."""
    images, labels, tr, te = _digit_split(test_fraction)
    images = images[:, None]
    return _in_memory("digits", (images[tr], labels[tr]), (images[te], labels[te]), image_size, "none",
                      [str(i) for i in range(10)])


def _cluttered_seed(seed: int, part: int, epoch: int) -> int:
    """The generator's seed for a split (part 0: training, 1: test) and, for fresh training images, an epoch ≥ 1."""
    return seed * 2 + part if epoch == 0 else int(np.random.SeedSequence([seed, part, epoch]).generate_state(1)[0])


@functools.lru_cache(maxsize=64)
def _cluttered_split(part: int, count: int, seed: int, epoch: int, knobs: tuple[tuple[str, Any], ...]) -> tuple[Tensor, Tensor]:
    """One split of cluttered digits as uint8 N×1×canvas×canvas images and labels, from the digits' training split
    (part 0) or test split (part 1). Cached: the runs of a comparison that share a process make each epoch once."""
    images, labels, tr, te = _digit_split()
    idx = te if part else tr
    made = make_cluttered(images[idx].numpy(), labels[idx].numpy(), count, seed=_cluttered_seed(seed, part, epoch),
                          **dict(knobs))
    return torch.from_numpy(made.images)[:, None], torch.from_numpy(made.labels)


def cluttered_digits(canvas: int = 20, fragments: int = 3, scale: tuple[float, float] = (1.0, 1.5),
                     fragment_size: int = 4, noise: float = 0.0, samples: int = 1500, test_samples: int = 500,
                     seed: int = 0, fresh: bool = False, image_size: int | None = None) -> Dataset:
    """The digits on a `canvas`-pixel canvas among `fragments` pieces of other digits (attnkit.data.cluttered).
    Training images are made from the digits' training split only and test images from its test split, so no
    source digit appears on both sides. With `fresh`, every epoch trains on `samples` new images (new positions,
    scales and clutter for the same training digits; epoch 0's are `train`); the test images stay the same.
    docs/cluttered-digits.md says why the defaults are what they are."""
    if not isinstance(fresh, bool):
        raise TypeError(f"cluttered-digits: `fresh` is True or False, got {fresh!r}.")
    knobs = tuple(dict(canvas=canvas, fragments=fragments, scale=tuple(scale), fragment_size=fragment_size,
                       noise=noise).items())
    train, test = _cluttered_split(0, samples, seed, 0, knobs), _cluttered_split(1, test_samples, seed, 0, knobs)
    data = _in_memory("cluttered-digits", train, test, image_size, "none", [str(i) for i in range(10)])
    if fresh:
        data.train_for_epoch = functools.partial(_fresh_training_split, samples=samples, seed=seed, knobs=knobs,
                                                 size=data.image_size)
    return data


def _fresh_training_split(epoch: int, *, samples: int, seed: int, knobs: tuple[tuple[str, Any], ...],
                          size: int) -> tuple[Tensor, Tensor]:
    images, labels = _cluttered_split(0, samples, seed, epoch, knobs)
    return _resize(images, size), labels


def _mnist_family(name: str, folder: str, url: str, classes: list[str]) -> Callable[..., Dataset]:
    def load(data_dir: str | os.PathLike = "data", image_size: int | None = None, download: bool = False) -> Dataset:
        root = Path(data_dir).expanduser()
        if download:
            import torchvision.datasets as tvd

            getattr(tvd, folder)(str(root), download=True)
        roots = [root, root / "raw", root / folder / "raw", root / name]
        how = f"Pass --data-dir with the four idx files, --download where a network is available, or get them from {url}."
        split = {}
        for part, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(find_file(roots, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], name, how))
            labels_file = find_file(roots, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], name, how)
            labels = read_idx(labels_file)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"{name} {part}: expected N×H×W images and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}.")
            if images.dtype != torch.uint8 or labels.is_floating_point():
                raise ValueError(f"{name} {part}: expected images of unsigned bytes (idx type 0x08) and integer labels, "
                                 f"got {images.dtype} images and {labels.dtype} labels ({labels_file}).")
            split[part] = (images[:, None].to(torch.uint8), check_labels(labels.long(), len(classes), labels_file))
        return _in_memory(name, split["train"], split["test"], image_size, "none", classes)

    load.__doc__ = f"{name} from its idx files (gzipped or not), looked for in data_dir, data_dir/raw and data_dir/{folder}/raw."
    return load


_FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
mnist = _mnist_family("mnist", "MNIST", "http://yann.lecun.com/exdb/mnist/", [str(i) for i in range(10)])
fashion_mnist = _mnist_family("fashion-mnist", "FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist", _FASHION)


def _cifar(name: str, folder: str, train_files: list[str], test_files: list[str], label_key: str,
           num_classes: int) -> Callable[..., Dataset]:
    def load(data_dir: str | os.PathLike = "data", image_size: int | None = None, download: bool = False) -> Dataset:
        root = Path(data_dir).expanduser()
        if download:
            import torchvision.datasets as tvd

            getattr(tvd, name.upper())(str(root), download=True)
        roots = [root / folder, root]
        how = f"Pass --data-dir with the python batches ({folder}/ from https://www.cs.toronto.edu/~kriz/cifar.html) or --download where a network is available."
        train = read_cifar_batches([find_file(roots, [f], name, how) for f in train_files], label_key, num_classes)
        test = read_cifar_batches([find_file(roots, [f], name, how) for f in test_files], label_key, num_classes)
        classes = [str(i) for i in range(num_classes)]
        return _in_memory(name, train, test, image_size, "crop_flip", classes)

    load.__doc__ = f"{name} from its python batches, looked for in data_dir/{folder} and data_dir."
    return load


cifar10 = _cifar("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10)
cifar100 = _cifar("cifar100", "cifar-100-python", ["train"], ["test"], "fine_labels", 100)


def _drop_unreadable(folder: Any) -> list[str]:
    """Remove the images that cannot be decoded from a torchvision ImageFolder; return their paths."""
    bad = []
    for path, _ in folder.samples:
        try:
            read_image(path)
        except ValueError:
            bad.append(path)
    if bad:
        left_out = set(bad)
        folder.samples = folder.imgs = [s for s in folder.samples if s[0] not in left_out]
        folder.targets = [label for _, label in folder.samples]
    return bad


def imagefolder(data_dir: str | os.PathLike = "data", image_size: int | None = 224, skip_bad: bool = False) -> Dataset:
    """data_dir/train/<class>/* and data_dir/val/<class>/*, decoded by torchvision's ImageFolder; random-resized-crop
    and flip for training, resize to 8/7 of the size and centre crop for evaluation (the ImageNet recipe).

    An image that cannot be decoded is an error naming it when it is read; with `skip_bad=True` every image is
    decoded once up front and the unreadable ones are left out, with a warning that names them."""
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    root, size = Path(data_dir).expanduser(), image_size or 224
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise DataNotFoundError(f"imagefolder: {root / part} is not a folder. Expected {root}/train/<class>/*.png|jpg and {root}/val/<class>/*.")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), T.ToTensor(), normalize])
    train = tvd.ImageFolder(str(root / "train"), train_tf, loader=read_image)
    test = tvd.ImageFolder(str(root / "val"), test_tf, loader=read_image)
    if train.classes != test.classes:
        raise ValueError(f"imagefolder: train and val have different classes: {train.classes} vs {test.classes}.")
    if skip_bad:
        bad = _drop_unreadable(train) + _drop_unreadable(test)
        if bad:
            warnings.warn(f"imagefolder: left out {len(bad)} image(s) that cannot be decoded: {', '.join(bad[:5])}"
                          f"{' ...' if len(bad) > 5 else ''}", stacklevel=2)
    return Dataset("imagefolder", train, test, len(train.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD,
                   "resized_crop_flip", list(train.classes))


def synthetic(image_size: int | None = 32, samples: int = 2048, test_samples: int = 512, channels: int = 3,
              num_classes: int = 10) -> Dataset:
    """Random uint8 images with random labels (fixed seed): for measuring speed, not for learning."""
    g = torch.Generator().manual_seed(0)
    size = image_size or 32
    make = lambda n: (torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8),  # noqa: E731
                      torch.randint(0, num_classes, (n,), generator=g))
    train, test = make(samples), make(test_samples)
    return Dataset("synthetic", train, test, num_classes, channels, size, (0.5,) * channels, (0.29,) * channels,
                   "none", [str(i) for i in range(num_classes)])


DATASETS = Registry("dataset", {
    "digits": digits,
    "cluttered-digits": cluttered_digits,
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "imagefolder": imagefolder,
    "synthetic": synthetic,
})


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(spec: str, data_dir: str | os.PathLike = "data", image_size: int | None = None,
                 download: bool = False) -> Dataset:
    """Load a data set by spec: a name, or a name with options, e.g. "synthetic(samples=512, channels=1)"."""
    name, factory, options = DATASETS.parse(spec)
    check_kwargs(name, factory, options, skip=0)
    accepted = inspect.signature(factory).parameters
    given = {"data_dir": data_dir, "download": download, "image_size": image_size}
    for key, value in given.items():
        if key in options and key != "image_size":
            raise ValueError(f"dataset spec {spec!r}: give {key} with its command-line option, not in the spec.")
        if key in accepted and value is not None and (key != "download" or value):
            options[key] = value
    if download and "download" not in accepted:
        raise ValueError(f"--download: there is nothing to download for {name}; leave the option out.")
    return factory(**options)


__all__ = ["DATASETS", "DataNotFoundError", "Dataset", "list_datasets", "load_dataset"]
