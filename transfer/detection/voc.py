"""Pascal VOC in its own layout (VOCdevkit/VOC20XX/{ImageSets/Main,Annotations,JPEGImages}).

Read into a COCO-format dict so the torchvision backend trains and evaluates VOC through the same
path as COCO. Conventions follow detectron2's VOC loader: boxes are 1-based inclusive pixel
indices, so xmin and ymin move by -1 to become coordinates; "difficult" objects are trained on.
For evaluation they become COCO crowd regions, which COCOeval ignores the way the VOC metric
ignores difficult objects (a detection on one is neither a hit nor a false positive).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from .errors import DetectionDataError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_to_coco(
    directory: Path, split: str, classes: Sequence[str], difficult_as_crowd: bool
) -> dict:
    """The images of ImageSets/Main/<split>.txt and their objects as a COCO instances dict;
    file names are relative to `directory`."""
    listing = directory / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DetectionDataError(
            f"VOC split list {listing} not found (expected the VOCdevkit "
            "layout: ImageSets/Main, Annotations, JPEGImages)"
        )
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    category_id = {name: k + 1 for k, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, stem in enumerate(ids, start=1):
        xml = directory / "Annotations" / f"{stem}.xml"
        root = _parse(xml)
        images.append(
            {
                "id": image_id,
                "file_name": f"JPEGImages/{stem}.jpg",
                "width": int(_text(root, "size/width", xml)),
                "height": int(_text(root, "size/height", xml)),
            }
        )
        for obj in root.findall("object"):
            name = _text(obj, "name", xml).strip()
            if name not in category_id:
                raise DetectionDataError(
                    f"{xml}: object class {name!r} is not in the recipe's "
                    f"data.classes {list(classes)}"
                )
            x0, y0, x1, y1 = (
                float(_text(obj, f"bndbox/{k}", xml)) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            x0, y0 = x0 - 1.0, y0 - 1.0
            difficult = obj.find("difficult") is not None and _text(obj, "difficult", xml) == "1"
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id[name],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(difficult and difficult_as_crowd),
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories}


def _parse(path: Path) -> ET.Element:
    if not path.is_file():
        raise DetectionDataError(f"VOC annotation {path} not found")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DetectionDataError(f"{path}: not valid XML ({err})") from None


def _text(node: ET.Element, tag: str, path: Path) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise DetectionDataError(f"{path}: missing <{tag}>")
    return found.text
