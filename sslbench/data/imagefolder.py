"""ImageFolder (the ImageNet layout): `root/{train,val,test}/<class>/<image files>`.

Classes are the sorted subdirectory names and files are sorted, so sample order and label indices
are the same on every machine. Names starting with "." (editor, VCS and macOS debris) are
skipped. Every split must list the same classes, or label k would mean different things in train
and test.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm import tqdm

from .base import SPLITS, DatasetError, LabeledDataset
from .registry import DATASETS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
# verify() decodes every pixel up to this many images (catches truncated JPEGs); beyond it, a
# full decode would take hours, so it checks headers and PNG checksums with PIL's verify().
FULL_DECODE_LIMIT = 50_000
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn PIL's many failure types into one DatasetError that names the file."""
    try:
        yield
    except _READ_ERRORS as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err


def open_rgb(path: Path) -> Image.Image:
    with _reading(path), Image.open(path) as image:
        return image.convert("RGB")


def _entries(directory: Path, want_dirs: bool) -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(directory)
        if not e.name.startswith(".") and (e.is_dir() if want_dirs else e.is_file())
    )


class ImageFolder(LabeledDataset):
    """One split of an ImageFolder tree; `files` are paths relative to the split directory."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        name: str = "imagefolder",
        params: dict[str, Any] | None = None,
    ):
        root = Path(root)
        split_dir = root / split
        if not root.is_dir():
            raise DatasetError(
                f"{name}: dataset root {root} does not exist (expected "
                f"{root}/{{{','.join(SPLITS)}}}/<class>/<images>)"
            )
        if not split_dir.is_dir():
            raise DatasetError(f"{name}: split directory {split_dir} does not exist")
        classes = _entries(split_dir, want_dirs=True)
        if not classes:
            raise DatasetError(f"{name}: {split_dir} has no class subdirectories")
        _check_same_classes(root, split, classes)
        files, targets = [], []
        for label, cls in enumerate(classes):
            images = [
                f
                for f in _entries(split_dir / cls, want_dirs=False)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
            if not images:
                raise DatasetError(
                    f"{name}: class directory {split_dir / cls} has no image files "
                    f"({' '.join(IMAGE_EXTENSIONS)})"
                )
            files += [f"{cls}/{f}" for f in images]
            targets += [label] * len(images)
        super().__init__(name, root, split, classes, targets, transform, files, params)
        self.split_dir = split_dir

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self.split_dir / self.files[index])

    def verify(self, progress: bool = True) -> None:
        """Read every file; raise DatasetError naming the first one that is corrupt."""
        decode = len(self) <= FULL_DECODE_LIMIT
        for file in tqdm(
            self.files, desc=f"verify {self.name}/{self.split}", unit="img", disable=not progress
        ):
            path = self.split_dir / file
            if decode:
                open_rgb(path)
            else:
                with _reading(path), Image.open(path) as image:
                    image.verify()


def _check_same_classes(root: Path, split: str, classes: list[str]) -> None:
    for other in SPLITS:
        if other != split and (root / other).is_dir():
            theirs = _entries(root / other, want_dirs=True)
            if theirs != classes:
                odd = sorted(set(theirs) ^ set(classes))[0]
                where, missing = (other, split) if odd in theirs else (split, other)
                raise DatasetError(
                    f"{root}: splits {split!r} and {other!r} have different "
                    f"classes: {odd!r} is in {where!r} but not in {missing!r}"
                )


@DATASETS.register("imagefolder")
def imagefolder(root: Path, split: str, transform: Callable | None = None) -> ImageFolder:
    return ImageFolder(root, split, transform)
