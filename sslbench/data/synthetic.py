"""synthetic-shapes: the embedded default dataset, generated deterministically from a seed.

It is written in the real on-disk formats, so the default run exercises the real loaders:

    root/{train,val,test}/<class>/<NNNNNN>.png   ImageFolder classification split (RGB)
    root/annotations/instances_{split}.json       COCO instances: boxes and polygons
    root/labels/{split}/<class>/<NNNNNN>.png      label maps (L: 0 background, k = category id)
    root/meta.json                                generator version and params, written last

An image shows one main object of its class (40-75% of the side, so it dominates) on a gradient
background, and with probability 0.4 a smaller distractor of another class (15-30%) beside it.
Colours, textures, poses and backgrounds are random, so only shape identifies the class. Objects
never overlap, and each object's image pixels, label-map pixels and COCO mask all come from one
pycocotools rasterisation of its polygon, so the three agree exactly.

Image i of class c in split s is drawn from its own Generator seeded by (seed, s, c, i): files do
not depend on generation order, and a larger split extends a smaller one.

style="silhouette" renders the same objects (same draws, so the same masks, boxes and labels)
white on black. It exists because colour is what a short CPU run cannot get past: with random
colours every image is identified by its colours and textures, which survive the augmentations,
so a few hundred SSL steps learn instance colour, not shape (kNN stays at chance, as does a
supervised net trained on 512 images), while on silhouettes the same SimSiam run gains ~12
points of kNN top-1 over random init. Smoke tests and the CPU pipeline use it; "colour" is the
harder, default task.
"""

from __future__ import annotations

import json
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..io import atomic_path, write_json_atomic
from .base import SPLITS, DatasetError
from .imagefolder import ImageFolder
from .registry import DATASETS, call_with_options
from .shapes import CLASSES, place

GENERATOR_VERSION = 1
META_FILE = "meta.json"
MIN_IMAGE_SIZE = 16
MAIN_SIZE = (0.40, 0.75)  # object diameter as a fraction of the image side
DISTRACTOR_SIZE = (0.15, 0.30)
DISTRACTOR_PROBABILITY = 0.4
PLACEMENT_TRIES = 20  # a distractor that finds no free spot in this many tries is left out
MIN_CONTRAST = 100.0  # RGB distance between an object's colour and the background's
TEXTURES = ("flat", "stripes", "checker", "noise")
_OWN_ENTRIES = {*SPLITS, "annotations", "labels"}
STYLES = ("colour", "silhouette")
_OWN_FILE = re.compile(r"\d{6}\.png")


def prepare_synthetic_shapes(
    root: str | Path,
    seed: int = 0,
    image_size: int = 64,
    train_per_class: int = 200,
    val_per_class: int = 50,
    test_per_class: int = 100,
    style: str = "colour",
    progress: bool = True,
) -> Path:
    """Generate the dataset under `root` unless its meta.json shows the same params; return root.

    A root generated with other params is never overwritten (DatasetError naming the params that
    differ). A root without meta.json is an interrupted generation and is completed in place,
    unless it holds entries the generator does not write.
    """
    root = Path(root)
    params = _check_params(
        generator_version=GENERATOR_VERSION,
        seed=seed,
        image_size=image_size,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
    )
    if style not in STYLES:
        raise DatasetError(f"synthetic-shapes: unknown style {style!r}; valid: {', '.join(STYLES)}")
    params["style"] = style
    if (root / META_FILE).exists():
        on_disk = _read_params(root)
        differ = [
            f"{k}: on disk {on_disk.get(k)!r}, requested {v!r}"
            for k, v in params.items()
            if on_disk.get(k) != v
        ]
        if differ:
            raise DatasetError(
                f"{root} already holds synthetic-shapes generated with other "
                f"params ({'; '.join(differ)}); use another root, or delete this "
                f"one to regenerate"
            )
        return root
    if root.exists():
        if not root.is_dir():
            raise DatasetError(f"{root} exists and is not a directory")
        foreign = sorted(
            n for n in os.listdir(root) if n not in _OWN_ENTRIES and not n.startswith(".")
        )
        if foreign:
            raise DatasetError(
                f"{root} has no {META_FILE} but holds {foreign[:5]}, which the "
                f"synthetic-shapes generator does not write; refusing to write "
                f"into it"
            )
    _generate(root, params, progress)
    write_json_atomic(
        root / META_FILE,
        {"generator": "synthetic-shapes", "params": params, "classes": list(CLASSES)},
    )
    return root


def _check_params(**params: Any) -> dict[str, int]:
    try:
        params = {k: operator.index(v) for k, v in params.items()}
    except TypeError:
        raise DatasetError(f"synthetic-shapes params must be integers, got {params}") from None
    bad = [
        f"{k}={v}"
        for k, v in params.items()
        if v < {"seed": 0, "image_size": MIN_IMAGE_SIZE}.get(k, 1)
    ]
    if bad:
        raise DatasetError(
            f"synthetic-shapes: invalid {', '.join(bad)} (need seed >= 0, "
            f"image_size >= {MIN_IMAGE_SIZE}, at least 1 image per class)"
        )
    return params


def _read_params(root: Path) -> dict[str, Any]:
    path = root / META_FILE
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["params"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(
            f"{path} is not a synthetic-shapes meta file ({err!r}); delete {root} to regenerate"
        ) from None


def _generate(root: Path, params: dict[str, int], progress: bool) -> None:
    size = params["image_size"]
    total = len(CLASSES) * sum(params[f"{split}_per_class"] for split in SPLITS)
    with tqdm(
        total=total, desc=f"synthetic-shapes -> {root}", unit="img", disable=not progress
    ) as bar:
        for split_id, split in enumerate(SPLITS):
            per_class = params[f"{split}_per_class"]
            images: list[dict] = []
            annotations: list[dict] = []
            for label, name in enumerate(CLASSES):
                image_dir, label_dir = root / split / name, root / "labels" / split / name
                image_dir.mkdir(parents=True, exist_ok=True)
                label_dir.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    rng = np.random.default_rng([params["seed"], split_id, label, i])
                    pixels, label_map, objects = render(rng, label, size, params["style"])
                    file = f"{i:06d}.png"
                    Image.fromarray(pixels).save(image_dir / file)
                    Image.fromarray(label_map).save(label_dir / file)
                    images.append(
                        {
                            "id": len(images) + 1,
                            "file_name": f"{split}/{name}/{file}",
                            "width": size,
                            "height": size,
                        }
                    )
                    for obj in objects:
                        annotations.append(
                            {"id": len(annotations) + 1, "image_id": images[-1]["id"], **obj}
                        )
                    bar.update()
                _remove_stale(image_dir, per_class)
                _remove_stale(label_dir, per_class)
            _write_coco(
                root / "annotations" / f"instances_{split}.json", images, annotations, params
            )


def _remove_stale(directory: Path, count: int) -> None:
    """Delete our own numbered files beyond `count`, left by an interrupted larger generation."""
    for path in directory.iterdir():
        if _OWN_FILE.fullmatch(path.name) and int(path.name[:6]) >= count:
            path.unlink()


def _write_coco(path: Path, images: list, annotations: list, params: dict) -> None:
    coco = {
        "info": {"description": "synthetic-shapes", **params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)
        ],
    }
    with atomic_path(path) as tmp:  # compact: indenting would triple the size of the polygons
        tmp.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")


def render(
    rng: np.random.Generator, label: int, size: int, style: str = "colour"
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One image: RGB pixels, its label map, and its objects as COCO annotation fields.

    Both styles make the same random draws, so they differ in pixels only.
    """
    grid = np.mgrid[0:size, 0:size] + 0.5  # (y, x) of pixel centres
    background = rng.uniform(0, 255, 3)
    canvas = _background(rng, background, grid, size)
    placed = [_shape(rng, label, MAIN_SIZE, size)]
    if rng.random() < DISTRACTOR_PROBABILITY:
        other = (label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
        for _ in range(PLACEMENT_TRIES):
            distractor = _shape(rng, other, DISTRACTOR_SIZE, size)
            if distractor[0]["area"] > 0 and _boxes_apart(
                placed[0][0]["bbox"], distractor[0]["bbox"]
            ):
                placed.append(distractor)
                break
    label_map = np.zeros((size, size), np.uint8)
    for annotation, mask in placed:
        canvas[mask] = _texture(rng, _contrasting(rng, background), grid, size)[mask]
        label_map[mask] = annotation["category_id"]
    if style == "silhouette":
        canvas = np.repeat(np.where(label_map[..., None] > 0, 255.0, 0.0), 3, axis=2)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return pixels, label_map, [annotation for annotation, _ in placed]


def _shape(
    rng: np.random.Generator, label: int, diameter: tuple[float, float], size: int
) -> tuple[dict[str, Any], np.ndarray]:
    """A random pose of class `label` with its enclosing disc inside the image: COCO fields, mask.

    The mask is pycocotools' rasterisation of the polygon exactly as the JSON stores it, so it is
    what annToMask returns; bbox and area are the mask's, so all three describe the same pixels.
    """
    d = rng.uniform(*diameter) * size
    centre = rng.uniform(d / 2, size - d / 2, 2)
    vertices = np.clip(place(CLASSES[label], d, centre, rng.uniform(0, 2 * np.pi)), 0, size)
    polygon = [round(v, 2) for v in vertices.ravel().tolist()]
    with warnings.catch_warnings():  # pycocotools' Cython code trips a numpy 2 copy= warning
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = mask_utils.frPyObjects([polygon], size, size)
        mask = mask_utils.decode(rle)[..., 0] > 0
    return {
        "category_id": label + 1,
        "bbox": mask_utils.toBbox(rle)[0].tolist(),
        "area": float(mask.sum()),
        "segmentation": [polygon],
        "iscrowd": 0,
    }, mask


def _boxes_apart(a: list[float], b: list[float], gap: float = 1.0) -> bool:
    return (
        a[0] + a[2] + gap <= b[0]
        or b[0] + b[2] + gap <= a[0]
        or a[1] + a[3] + gap <= b[1]
        or b[1] + b[3] + gap <= a[1]
    )


def _background(
    rng: np.random.Generator, colour: np.ndarray, grid: np.ndarray, size: int
) -> np.ndarray:
    """`colour` plus a linear gradient in a random direction plus mild pixel noise."""
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((grid[1] - size / 2) * np.cos(angle) + (grid[0] - size / 2) * np.sin(angle)) / size
    return colour + ramp[..., None] * rng.uniform(-80, 80, 3) + rng.normal(0, 4, (size, size, 3))


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) >= MIN_CONTRAST:
            return colour


def _texture(
    rng: np.random.Generator, colour: np.ndarray, grid: np.ndarray, size: int
) -> np.ndarray:
    """A full-image fill pattern around `colour`; the caller keeps the pixels under the mask."""
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    if kind == "flat":
        return np.broadcast_to(colour, (size, size, 3))
    if kind == "noise":
        return colour + rng.normal(0, 25, (size, size, 3))
    # two-tone patterns: the second tone is the colour moved halfway to black or to white
    second = colour * 0.5 if colour.mean() > 127.5 else colour + (255 - colour) * 0.5
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.06, 0.16) * size
        first = ((grid[1] * np.cos(angle) + grid[0] * np.sin(angle)) / period) % 1 < 0.5
    else:  # checker
        cell = rng.uniform(0.05, 0.12) * size
        first = (np.floor(grid[0] / cell) + np.floor(grid[1] / cell)) % 2 == 0
    return np.where(first[..., None], colour, second)


@DATASETS.register("synthetic-shapes")
def synthetic_shapes(
    root: Path, split: str, transform: Callable | None = None, **generation: Any
) -> ImageFolder:
    """Generate (or find) the dataset, then read the split back through the ImageFolder reader."""
    root = call_with_options(
        prepare_synthetic_shapes, "dataset 'synthetic-shapes'", root, **generation
    )
    params = _read_params(root)
    dataset = ImageFolder(root, split, transform, name="synthetic-shapes", params=params)
    expected = params[f"{split}_per_class"] * len(CLASSES)
    if dataset.classes != list(CLASSES) or len(dataset) != expected:
        raise DatasetError(
            f"{root / split} holds {len(dataset)} images in classes "
            f"{dataset.classes}, but the generator wrote {expected} in "
            f"{list(CLASSES)}; files were added or removed: delete {root} to "
            f"regenerate"
        )
    return dataset
