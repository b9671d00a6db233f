"""What runs inside detectron2's launcher processes: dataset registration, MoCo's C4 head, the
config, the trainer. Imports detectron2 at the top, so only detectron2_backend (after checking
that detectron2 is installed) and the tests import it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.utils import comm

from sslbench.io import write_json_atomic


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """The C4 head of the MoCo protocol: res5 followed by one more norm layer
    (MODEL.RESNETS.NORM). The backbone's features are fine-tuned with normalisation throughout,
    and the extra norm gives the box and mask predictors normalised res5 features too."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        res5 = ret["res5"]
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, res5[-1].out_channels))
        return ret


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:  # MoCo's own train_net may have it
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


COUNT_TASK = "detections"  # the task name DetectionCount reports under


class DetectionCount(DatasetEvaluator):
    """Counts the detections on the test split over all processes: detectron2's evaluators
    do not say whether a zero AP (VOC) or NaN (COCO) means the model detected nothing."""

    def reset(self):
        self._count = 0

    def process(self, inputs, outputs):
        self._count += sum(len(output["instances"]) for output in outputs)

    def evaluate(self):
        counts = comm.gather(self._count, dst=0)
        return {COUNT_TASK: {"count": sum(counts)}} if comm.is_main_process() else None


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the COCO / VOC evaluators and the detection count; the
    main process writes each evaluation's metrics (JSON, NaN as null) and count to
    `results_path`, so the last one, after the last iteration, is what the backend reads."""

    def __init__(self, cfg, results_path: Path):
        super().__init__(cfg)
        self.results_path = results_path

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "pascal_voc":
            metrics = PascalVOCDetectionEvaluator(dataset_name)
        else:  # tasks named: left to itself it infers them from the predictions, none if none
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            metrics = COCOEvaluator(
                dataset_name, tasks=tasks, output_dir=str(Path(cfg.OUTPUT_DIR) / "inference")
            )
        return DatasetEvaluators([metrics, DetectionCount()])

    def test(self, cfg, model, evaluators=None):
        # An instance method (detectron2's is a classmethod) to reach results_path: detectron2's
        # evaluation hook calls it on the trainer, and nothing here calls it on the class.
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            finite = {
                task: {k: (float(v) if math.isfinite(v) else None) for k, v in vals.items()}
                for task, vals in results.items()
                if task != COUNT_TASK
            }
            write_json_atomic(
                self.results_path, {"metrics": finite, "detections": results[COUNT_TASK]["count"]}
            )
        return results


def register(datasets: list[tuple]) -> None:
    """Register (name, "coco" | "voc", arguments) with detectron2's own loaders."""
    for name, kind, args in datasets:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if kind == "coco":
            annotations, image_root = args
            register_coco_instances(name, {}, annotations, image_root)
        else:
            dirname, split, year, classes = args
            register_pascal_voc(name, dirname, split, year, class_names=classes)
            MetadataCatalog.get(name).set(evaluator_type="pascal_voc")


def build_config(base_config: str, options: dict[str, Any]):
    """detectron2's config: the model-zoo base file, then `options` (KEY.PATH -> value)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(base_config))
    cfg.merge_from_list([item for pair in options.items() for item in pair])
    cfg.freeze()
    return cfg


def main(
    base_config: str, options: dict[str, Any], datasets: list[tuple], results_path: str
) -> None:
    """One process of a detectron2 run: build the config, train, test; the main process writes
    the final metrics and detection count to `results_path`."""
    register(datasets)
    cfg = build_config(base_config, options)
    default_setup(cfg, argparse.Namespace())
    trainer = Trainer(cfg, Path(results_path))
    trainer.resume_or_load(resume=False)
    trainer.train()
