"""Detection data: validated annotation sets and the datasets the torchvision backend reads.

Every source (a COCO JSON, a VOC split, synthetic-shapes' COCO JSON) becomes an `AnnotationSet`:
a pycocotools index plus the directory its file names are relative to. It is checked once, when
loaded, before any training: every category must be one of the recipe's classes and every listed
image must exist, so bad input fails in seconds with the file named, not hours into a run. Both
backends load through here; detectron2 then re-reads the same files with its own loaders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from sslbench.data import default_data_root, prepare_synthetic_shapes
from sslbench.data.registry import call_with_options

from .errors import DetectionDataError
from .voc import voc_to_coco


@dataclass
class AnnotationSet:
    coco: COCO
    image_root: Path
    source: str  # what was read: the JSON path, or "<VOC dir>:<split>"
    label_of: dict[int, int]  # category id -> label; label k + 1 is data.classes[k], 0 background
    kind: str = "coco"  # coco | voc (detectron2 registers the two differently)
    voc_split: str = ""
    voc_year: int = 0

    @property
    def category_of(self) -> dict[int, int]:
        """label -> this file's category id (the inverse of label_of)."""
        return {label: cat for cat, label in self.label_of.items()}

    def describe(self) -> dict:
        return {
            "source": self.source,
            "images": len(self.coco.imgs),
            "annotations": len(self.coco.anns),
        }


def index_coco(
    dataset: dict, image_root: Path, source: str, classes: Sequence[str]
) -> AnnotationSet:
    """Check a COCO instances dict against the recipe and index it with pycocotools.

    Fills the optional fields COCOeval reads (iscrowd 0, area from the box) where absent.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DetectionDataError(f"{source}: missing the {key!r} list of a COCO instances file")
    label_of = {}
    for category in dataset["categories"]:
        name = category.get("name")
        if name not in classes:
            raise DetectionDataError(
                f"{source}: category {name!r} (id {category.get('id')}) is not in the recipe's "
                f"data.classes {list(classes)}; add it there or remove it from the file"
            )
        label_of[category["id"]] = list(classes).index(name) + 1
    image_ids = {image["id"] for image in dataset["images"]}
    for ann in dataset["annotations"]:
        if ann.get("category_id") not in label_of:
            raise DetectionDataError(
                f"{source}: annotation {ann.get('id')} has category_id "
                f"{ann.get('category_id')}, which no category in the file has"
            )
        if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
            raise DetectionDataError(
                f"{source}: annotation {ann.get('id')} has no bbox [x, y, width, height]"
            )
        if ann.get("image_id") not in image_ids:
            raise DetectionDataError(
                f"{source}: annotation {ann.get('id')} refers to image_id "
                f"{ann.get('image_id')}, which the file does not list"
            )
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    missing = [
        image["file_name"]
        for image in dataset["images"]
        if not (image_root / image["file_name"]).is_file()
    ]
    if missing:
        raise DetectionDataError(
            f"{source}: {len(missing)} image(s) listed but missing under "
            f"{image_root}, e.g. {image_root / missing[0]}"
        )
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return AnnotationSet(coco, image_root, source, label_of)


def load_coco_json(annotations: Path, images: Path, classes: Sequence[str]) -> AnnotationSet:
    if not annotations.is_file():
        raise DetectionDataError(f"annotation file {annotations} not found")
    try:
        dataset = json.loads(annotations.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DetectionDataError(f"{annotations}: not valid JSON ({err})") from None
    if not isinstance(dataset, dict):
        raise DetectionDataError(f"{annotations}: expected a COCO instances object")
    return index_coco(dataset, images, str(annotations), classes)


def load_voc(
    directory: Path, split: str, year: int, classes: Sequence[str], for_eval: bool
) -> AnnotationSet:
    """A VOCdevkit split; for_eval turns "difficult" objects into crowd regions (see voc.py)."""
    dataset = voc_to_coco(directory, split, classes, difficult_as_crowd=for_eval)
    return dataclasses.replace(
        index_coco(dataset, directory, f"{directory}:{split}", classes),
        kind="voc",
        voc_split=split,
        voc_year=year,
    )


@dataclass
class DetectionData:
    train: list[AnnotationSet]
    test: AnnotationSet
    classes: tuple[str, ...]

    def identity(self) -> dict:
        """Which data (not where it lies): for the result record's protocol."""
        return {
            "classes": list(self.classes),
            "train": [Path(s.source).name for s in self.train],
            "test": Path(self.test.source).name,
        }


def load_data(cfg: DictConfig, progress: bool = True) -> DetectionData:
    """Load and check the recipe's `data` section (generating synthetic-shapes if needed)."""
    classes = tuple(cfg.classes)
    if cfg.name == "synthetic-shapes":
        root = default_data_root() / cfg.name if cfg.root is None else Path(cfg.root)
        call_with_options(
            prepare_synthetic_shapes,
            "dataset 'synthetic-shapes'",
            root,
            **{"progress": progress, **cfg.options},
        )
        train = [
            load_coco_json(
                root / "annotations" / f"instances_{cfg.train_split}.json", root, classes
            )
        ]
        test = load_coco_json(
            root / "annotations" / f"instances_{cfg.test_split}.json", root, classes
        )
        return DetectionData(train, test, classes)
    root = default_data_root() if cfg.root is None else Path(cfg.root)
    if cfg.name == "coco":

        def coco(source):
            return load_coco_json(root / source.annotations, root / source.images, classes)

        return DetectionData([coco(s) for s in cfg.train], coco(cfg.test), classes)

    def voc(source, for_eval):
        return load_voc(root / source.dir, source.split, source.year, classes, for_eval)

    return DetectionData([voc(s, False) for s in cfg.train], voc(cfg.test, True), classes)


class DetectionDataset(Dataset):
    """Images of annotation sets as (image tensor in [0, 1], target) in torchvision's format.

    train=True: targets hold boxes (x0, y0, x1, y1), labels and, with masks=True, one uint8 mask
    per object; crowd regions and boxes without area are dropped and, as in detectron2, so are
    images left without objects. A horizontal flip is drawn per sample from (seed, epoch, index),
    so it does not depend on which process or worker loads the sample; set `epoch` per epoch.
    train=False: every image, with a target holding only its image id (for evaluation).
    """

    def __init__(
        self,
        sets: Sequence[AnnotationSet],
        train: bool,
        masks: bool = False,
        flip: bool = False,
        seed: int = 0,
    ):
        self.sets, self.train, self.masks = list(sets), train, masks
        self.flip, self.seed = flip, seed
        self.epoch = 0
        self.items = [
            (k, image_id)
            for k, s in enumerate(self.sets)
            for image_id in sorted(s.coco.imgs)
            if not train or self._objects(s, image_id)
        ]
        if train and not self.items:
            raise DetectionDataError(
                f"no training image has an object: {', '.join(s.source for s in self.sets)}"
            )
        if train and masks:
            for k, image_id in self.items:
                for a in self._objects(self.sets[k], image_id):
                    if not a.get("segmentation"):
                        raise DetectionDataError(
                            f"{self.sets[k].source}: annotation {a['id']} has no segmentation; "
                            "Mask R-CNN needs instance masks (use model.arch=faster_rcnn)"
                        )

    @staticmethod
    def _objects(s: AnnotationSet, image_id: int) -> list[dict]:
        return [
            a
            for a in s.coco.imgToAnns[image_id]
            if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        k, image_id = self.items[i]
        s = self.sets[k]
        info = s.coco.imgs[image_id]
        path = s.image_root / info["file_name"]
        with Image.open(path) as img:
            if img.size != (info["width"], info["height"]):
                raise DetectionDataError(
                    f"{path} is {img.size[0]}x{img.size[1]} but {s.source} "
                    f"says {info['width']}x{info['height']}"
                )
            image = to_tensor(img.convert("RGB"))
        if not self.train:
            return image, {"image_id": image_id}
        objects = self._objects(s, image_id)
        boxes = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([s.label_of[a["category_id"]] for a in objects]),
            "image_id": image_id,
        }
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack([s.coco.annToMask(a) for a in objects]))
        if self.flip and self._coin(i):
            image, target = flip_horizontal(image, target)
        return image, target

    def _coin(self, i: int) -> bool:
        state = np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]
        return bool(state & 1)


def flip_horizontal(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch)
    return list(images), list(targets)
