"""The dataset contract every stage codes against: (RGB PIL image, int label) samples plus metadata.

A dataset knows its class names, every sample's label (so samplers and probes need not load
images), where its samples came from (`describe()`, copied into result records) and how to check
its files (`verify()`), so a corrupt image is found before a long run rather than hours into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """Bad dataset input: a missing path, a malformed file, an unknown name, split or option."""


def default_data_root() -> Path:
    """Where datasets live when no root is given: `$SSLBENCH_DATA`, else `./data`."""
    return Path(os.environ.get("SSLBENCH_DATA", "data"))


class LabeledDataset(Dataset):
    """A classification split; subclasses say how to load sample i as an RGB image."""

    def __init__(
        self,
        name: str,
        root: Path | None,
        split: str,
        classes: Sequence[str],
        targets: Sequence[int],
        transform: Callable | None = None,
        files: list[str] | None = None,
        params: dict[str, Any] | None = None,
    ):
        self.name = name
        self.root = root
        self.split = split
        self.classes = list(classes)
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.files = files
        self.params = dict(params or {})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int):
        image = self.load_image(index)
        return (image if self.transform is None else self.transform(image)), self.targets[index]

    def verify(self, progress: bool = True) -> None:
        """Check every sample can be read; samples held in memory were checked when loaded."""

    def describe(self) -> dict[str, Any]:
        """What a result record needs to say which data a number was measured on."""
        return {
            "name": self.name,
            "root": None if self.root is None else str(self.root),
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            **self.params,
        }


class ArrayDataset(LabeledDataset):
    """Images held in memory as uint8 arrays, (N, H, W) grayscale or (N, H, W, 3) RGB."""

    def __init__(
        self,
        name: str,
        root: Path | None,
        split: str,
        classes: Sequence[str],
        targets: Sequence[int],
        images: np.ndarray,
        transform: Callable | None = None,
        params: dict[str, Any] | None = None,
    ):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(targets):
            raise DatasetError(
                f"{name}: expected {len(targets)} uint8 images, got an array of "
                f"shape {images.shape} and dtype {images.dtype}"
            )
        super().__init__(name, root, split, classes, targets, transform, params=params)
        self.images = np.ascontiguousarray(images)

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")
