"""What sslbench adds to mmseg's registries: importing this module registers them (it imports
mmseg, so only `model.require_mmseg` does, once mmseg is known to be importable)."""

from __future__ import annotations

from typing import Any

from mmcv.cnn import build_conv_layer
from mmengine.hooks import Hook
from mmseg.datasets import BaseSegDataset
from mmseg.evaluation import IoUMetric
from mmseg.models.backbones import ResNet
from mmseg.registry import DATASETS, METRICS, MODELS
from torch import nn

from sslbench.data import SHAPE_CLASSES

# Label k of synthetic-shapes' label maps is SEG_CLASSES[k]: 0 background, then the shapes.
SEG_CLASSES = ("background", *SHAPE_CLASSES)
SEG_PALETTE = [
    [0, 0, 0],
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
]


@MODELS.register_module()
class SmallStemResNet(ResNet):
    """mmseg's ResNet with sslbench's small-image stem (3x3 stride-1 conv, no max-pool), so
    backbones pretrained on small images load with the same names and compute the same maps."""

    def _make_stem_layer(self, in_channels: int, stem_channels: int) -> None:
        super()._make_stem_layer(in_channels, stem_channels)
        self.conv1 = build_conv_layer(
            self.conv_cfg,
            in_channels,
            stem_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            bias=False,
        )
        self.maxpool = nn.Identity()


@DATASETS.register_module()
class SyntheticShapesDataset(BaseSegDataset):
    """synthetic-shapes' label maps: <root>/<split>/<class>/N.png with its label map at
    <root>/labels/<split>/<class>/N.png (0 background, k the k-th shape class)."""

    METAINFO = {"classes": SEG_CLASSES, "palette": SEG_PALETTE}

    def __init__(self, **kwargs: Any):
        super().__init__(
            img_suffix=".png", seg_map_suffix=".png", reduce_zero_label=False, **kwargs
        )


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """mmseg's IoUMetric, also returning each class's IoU as `IoU.<class>` (IoUMetric only logs
    them); NaN for a class absent from both predictions and labels."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        totals = [sum(column) for column in zip(*results)]
        iou = self.total_area_to_metrics(*totals, ["mIoU"], self.nan_to_num, self.beta)["IoU"]
        for name, value in zip(self.dataset_meta["classes"], iou.tolist()):
            metrics[f"IoU.{name}"] = round(100 * value, 2)
        return metrics


class LastMetrics(Hook):
    """Keeps the latest evaluation's metrics: Runner.train() returns only the model."""

    def __init__(self):
        self.metrics: dict[str, float] | None = None

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        self.metrics = dict(metrics or {})
