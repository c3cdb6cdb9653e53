"""Datasets: the embedded digits, MNIST-family idx files, CIFAR python batches, image folders, synthetic tensors.

`load_dataset(name, ...)` returns a `Dataset` (train and test splits and what the model needs to know about
them); `Dataset.loader(...)` batches a split, sharded across distributed ranks, with the data set's standard
augmentation.
"""
from .datasets import DATASETS, Dataset, list_datasets, load_dataset
from .loader import TensorLoader

__all__ = ["DATASETS", "Dataset", "TensorLoader", "list_datasets", "load_dataset"]
