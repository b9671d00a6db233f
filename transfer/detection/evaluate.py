"""COCO-style evaluation: detector outputs -> COCO result entries -> pycocotools COCOeval.

Metrics are COCOeval's first six statistics in percent, as detectron2 reports them: AP
(IoU .50:.95), AP50, AP75, APs, APm, APl, prefixed by the IoU type (bbox_AP50, segm_AP, ...).
COCOeval writes -1 for an area range without ground truth (e.g. no large object in 64 px
images); such a metric is left out rather than reported as a number. A detector that detects
nothing is a result, not an error (`score`): both backends report it the same way.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from sslbench import distributed as D

from .data import DetectionDataset, collate

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5  # torchvision's and detectron2's mask binarisation
NO_DETECTIONS = (
    "no detection on the test split: every AP is 0 where the split has objects "
    "(COCOeval of an empty result set); too short or diverged training ends so"
)


def to_coco_results(
    image_id: int, output: dict[str, torch.Tensor], category_of: dict[int, int]
) -> list[dict]:
    """One image's detections as COCO result entries: xywh boxes and, when the output has masks,
    RLE masks; labels become the test file's category ids (labels it lacks are dropped)."""
    boxes = output["boxes"].detach().cpu().numpy().astype(np.float64)
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = None
    if "masks" in output:
        binary = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    results = []
    for k, (label, score) in enumerate(zip(labels, scores)):
        if label not in category_of:
            continue
        x0, y0, x1, y1 = boxes[k].tolist()
        entry = {
            "image_id": image_id,
            "category_id": category_of[label],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(score),
        }
        if rles is not None:
            entry["segmentation"] = {
                "size": [int(v) for v in rles[k]["size"]],
                "counts": rles[k]["counts"].decode("ascii"),
            }
        results.append(entry)
    return results


def coco_metrics(gt: COCO, results: list[dict], iou_type: str) -> dict[str, float]:
    """COCOeval of `results` against `gt` for iou_type "bbox" or "segm", in percent."""
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints progress and the table
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes cannot take an empty list; no detection scores 0 wherever GT exists
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        f"{iou_type}_{name}": float(100 * value)
        for name, value in zip(STATS, evaluator.stats[: len(STATS)])
        if value >= 0
    }


def score(
    gt: COCO, results: list[dict], iou_types: Sequence[str]
) -> tuple[dict[str, float], list[str]]:
    """The metrics of `results` for each IoU type and the warnings for the record: none, or
    NO_DETECTIONS when `results` is empty (its metrics are then 0, not an error)."""
    metrics = {}
    for iou_type in iou_types:
        metrics.update(coco_metrics(gt, results, iou_type))
    return metrics, [] if results else [NO_DETECTIONS]


@torch.inference_mode()
def predict(
    model: nn.Module,
    dataset: DetectionDataset,
    category_of: dict[int, int],
    device: torch.device,
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> list[dict]:
    """COCO result entries for every image of `dataset`; under torchrun each process predicts
    every world_size-th image and all processes return the gathered list."""
    model.eval()
    shard = Subset(dataset, range(D.rank(), len(dataset), D.world_size()))
    loader = DataLoader(shard, batch_size=1, collate_fn=collate, num_workers=num_workers)
    results = []
    for images, targets in tqdm(
        loader, desc="evaluate", unit="batch", leave=False, disable=not (progress and D.rank() == 0)
    ):
        outputs = model([x.to(device) for x in images])
        for target, output in zip(targets, outputs):
            results += to_coco_results(target["image_id"], output, category_of)
    if D.world_size() > 1:
        parts = [None] * D.world_size()
        torch.distributed.all_gather_object(parts, results)
        results = [entry for part in parts for entry in part]
    return results
