"""Datasets: one registry used by every stage; real on-disk formats, read from local paths only.

    ds = build_dataset("cifar10", root, "train", transform)   # ds[i] -> (image, int label)

Registered: synthetic-shapes (the embedded default, generated from a seed), imagefolder,
cifar10, cifar100, digits, mnist-subset, shards (WebDataset tar shards that
`sslbench data shard` writes from an ImageFolder). Nothing is ever downloaded.
"""

from . import bundled, cifar, shards  # noqa: F401  (importing a module registers its datasets)
from .base import SPLITS, ArrayDataset, DatasetError, LabeledDataset, default_data_root
from .imagefolder import ImageFolder
from .registry import DATASETS, build_dataset
from .shapes import CLASSES as SHAPE_CLASSES
from .synthetic import prepare_synthetic_shapes

__all__ = [
    "DATASETS",
    "SHAPE_CLASSES",
    "SPLITS",
    "ArrayDataset",
    "DatasetError",
    "ImageFolder",
    "LabeledDataset",
    "build_dataset",
    "default_data_root",
    "prepare_synthetic_shapes",
]
