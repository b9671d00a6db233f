"""CIFAR-10 / CIFAR-100 in the official python-pickle layout, read through the safe unpickler.

`root` may be the batches directory itself or its parent. The official release has no val split,
so val is a fixed class-stratified slice of train (seed 0) and train is the rest; test is the
official test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .base import ArrayDataset, DatasetError
from .registry import DATASETS
from .safe_pickle import load_pickle
from .splits import SPLIT_SEED, stratified_split


@dataclass(frozen=True)
class Layout:
    directory: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


LAYOUTS = {
    "cifar10": Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": Layout(
        "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"
    ),
}


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _read_dict(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The pickled dict at path with str keys (files written by Python 3 may use bytes keys)."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    obj = {_text(k): v for k, v in obj.items()}
    for key in keys:
        if key not in obj:
            raise DatasetError(f"{path}: missing key {key!r} (has {sorted(map(str, obj))})")
    return obj


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) labels from one batch file."""
    batch = _read_dict(path, ("data", label_key))
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        raise DatasetError(
            f"{path}: key 'data' must be a uint8 array of shape (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {np.shape(data)}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: key {label_key!r} must hold {len(data)} integer labels")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise DatasetError(f"{path}: labels in {label_key!r} must lie in [0, {num_classes})")
    # rows are channel-major (1024 red, 1024 green, 1024 blue), each plane row-major
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _batches_dir(name: str, root: Path, layout: Layout) -> Path:
    for candidate in (root / layout.directory, root):
        if (candidate / layout.meta).is_file():
            return candidate
    raise DatasetError(
        f"{name}: found no {layout.meta} in {root / layout.directory} or {root} "
        f"(expected the python-pickle release, e.g. {layout.directory}/)"
    )


def load_cifar(
    name: str, root: Path, split: str, transform: Callable | None, val_fraction: float
) -> ArrayDataset:
    if not 0 < val_fraction < 1:
        raise DatasetError(f"{name}: val_fraction must lie in (0, 1), got {val_fraction}")
    layout = LAYOUTS[name]
    directory = _batches_dir(name, root, layout)
    meta_path = directory / layout.meta
    classes = [str(_text(c)) for c in _read_dict(meta_path, (layout.names_key,))[layout.names_key]]
    batches = [
        _read_batch(directory / f, layout.label_key, len(classes))
        for f in (layout.test if split == "test" else layout.train)
    ]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if split != "test":
        train, val = stratified_split(labels, (1 - val_fraction, val_fraction), SPLIT_SEED)
        keep = val if split == "val" else train
        images, labels = images[keep], labels[keep]
    return ArrayDataset(
        name,
        root,
        split,
        classes,
        labels.tolist(),
        images,
        transform,
        params={"val_fraction": val_fraction, "split_seed": SPLIT_SEED},
    )


@DATASETS.register("cifar10")
def cifar10(
    root: Path, split: str, transform: Callable | None = None, val_fraction: float = 0.1
) -> ArrayDataset:
    return load_cifar("cifar10", root, split, transform, val_fraction)


@DATASETS.register("cifar100")
def cifar100(
    root: Path, split: str, transform: Callable | None = None, val_fraction: float = 0.1
) -> ArrayDataset:
    return load_cifar("cifar100", root, split, transform, val_fraction)
