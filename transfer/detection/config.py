"""The detection recipe schema: every key a configs/transfer/detection_*.yaml may set.

One schema serves both backends. Keys mirror detectron2's (named in the comments) so the
detectron2 backend translates them one to one; the torchvision backend builds the same model
where torchvision can (FPN only) and refuses what it cannot. Defaults are detectron2's for
Mask R-CNN R50-FPN, fine-tuned throughout with SyncBN (a norm both backends build; the MoCo
recipes set detectron2's naiveSyncBN, as MoCo's configs do); every shipped recipe sets its
protocol values explicitly anyway. `data` is a variant section chosen by `data.name`: coco
(JSON files), voc (the VOCdevkit XML layout) or synthetic-shapes (the embedded generator's COCO
JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from sslbench.config import ConfigError, build_config, check_choices
from sslbench.data import SHAPE_CLASSES

from .voc import VOC_CLASSES

BACKENDS = ("torchvision", "detectron2")
ARCHS = ("mask_rcnn", "faster_rcnn")
HEADS = ("fpn", "c4")
NORMS = ("FrozenBN", "BN", "SyncBN", "naiveSyncBN")  # detectron2's names
HEAD_NORMS = ("", "BN", "SyncBN", "naiveSyncBN")  # "" = no norm in FPN and heads
BOX_HEADS = ("2fc", "4conv1fc")


@dataclass
class RunConfig:
    seed: int = 0  # detectron2 SEED; also data order and flips in the torchvision backend
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch CPU threads; None leaves the default
    progress: bool = True
    num_workers: int = 2  # data-loader processes per training process (DATALOADER.NUM_WORKERS)
    work_dir: Optional[str] = None  # logs, weights, predictions; None: RESULTS_DIR/.work/<run>
    log_every: int = 20  # iterations between rows of train.csv


@dataclass
class BackboneConfig:
    arch: Optional[str] = None  # the architecture the recipe is for (e.g. resnet50); None: any


@dataclass
class ModelConfig:
    arch: str = "mask_rcnn"  # mask_rcnn | faster_rcnn (MODEL.MASK_ON)
    head: str = "fpn"  # fpn | c4 (C4 = res5 ROI head with the MoCo extra norm; detectron2 only)
    norm: str = "SyncBN"  # backbone norm (MODEL.RESNETS.NORM): FrozenBN | BN | SyncBN | naiveSyncBN
    head_norm: str = "SyncBN"  # FPN + box/mask head norm (FPN.NORM, ROI_*_HEAD.NORM); "" = none
    box_head: str = "4conv1fc"  # 2fc | 4conv1fc (ROI_BOX_HEAD.NUM_CONV / NUM_FC)
    freeze_at: int = 0  # stages frozen: 0 none, 1 stem, 2 stem+res2, ... (BACKBONE.FREEZE_AT)
    fpn_channels: int = 256  # FPN.OUT_CHANNELS
    box_head_dim: int = 1024  # ROI_BOX_HEAD.FC_DIM
    head_conv_dim: int = 256  # ROI_BOX_HEAD.CONV_DIM and ROI_MASK_HEAD.CONV_DIM
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_topk_train: int = 2000  # per FPN level (RPN.PRE_NMS_TOPK_TRAIN)
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 1000  # per image (RPN.POST_NMS_TOPK_TRAIN)
    rpn_post_nms_topk_test: int = 1000
    roi_batch_size_per_image: int = 512  # ROI_HEADS.BATCH_SIZE_PER_IMAGE
    roi_positive_fraction: float = 0.25


@dataclass
class InputConfig:
    min_size_train: List[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip: bool = True  # random horizontal flip (INPUT.RANDOM_FLIP)


@dataclass
class SolverConfig:
    ims_per_batch: int = 16  # global batch at reference_world_size processes
    base_lr: float = 0.02
    reference_world_size: int = 8  # linear scaling to the actual world size; 0 = no scaling
    max_iter: int = 90000
    steps: List[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    weight_decay_norm: float = 0.0
    checkpoint_period: int = 5000  # iterations between checkpoints (torchvision: 0 = none)


@dataclass
class TestConfig:
    precise_bn: bool = True  # recompute BN statistics on training batches before evaluating
    precise_bn_iters: int = 200
    detections_per_image: int = 100


@dataclass
class Detectron2Config:
    """detectron2's launcher (the torchvision backend uses torchrun instead)."""

    num_gpus: int = 1  # processes per machine
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"


@dataclass
class CocoSource:
    annotations: str = ""  # instances JSON, relative to data.root unless absolute
    images: str = ""  # directory the JSON's file_name entries are relative to


@dataclass
class CocoData:
    name: str = "coco"
    root: Optional[str] = None  # base of relative paths; None: $SSLBENCH_DATA, else ./data
    classes: List[str] = field(default_factory=list)  # every category an annotation file may use
    train: List[CocoSource] = field(default_factory=list)
    test: CocoSource = field(default_factory=CocoSource)


@dataclass
class VocSource:
    dir: str = ""  # e.g. VOCdevkit/VOC2007, relative to data.root unless absolute
    split: str = ""  # an ImageSets/Main list: train | val | trainval | test
    year: int = 0  # 2007 selects the 11-point AP in detectron2's VOC evaluator


@dataclass
class VocData:
    name: str = "voc"
    root: Optional[str] = None
    classes: List[str] = field(default_factory=lambda: list(VOC_CLASSES))
    train: List[VocSource] = field(
        default_factory=lambda: [
            VocSource("VOCdevkit/VOC2007", "trainval", 2007),
            VocSource("VOCdevkit/VOC2012", "trainval", 2012),
        ]
    )
    test: VocSource = field(default_factory=lambda: VocSource("VOCdevkit/VOC2007", "test", 2007))


@dataclass
class ShapesData:
    name: str = "synthetic-shapes"
    root: Optional[str] = None  # None: $SSLBENCH_DATA/synthetic-shapes, else ./data/...
    options: Dict[str, Any] = field(default_factory=dict)  # generator params (image_size, ...)
    classes: List[str] = field(default_factory=lambda: list(SHAPE_CLASSES))
    train_split: str = "train"
    test_split: str = "val"


@dataclass
class DetectionConfig:
    backend: str = "torchvision"  # torchvision | detectron2
    run: RunConfig = field(default_factory=RunConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: Any = field(default_factory=ShapesData)  # CocoData | VocData | ShapesData by data.name
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    detectron2: Detectron2Config = field(default_factory=Detectron2Config)


DATA = {"coco": CocoData, "voc": VocData, "synthetic-shapes": ShapesData}
_CHOICES = {
    "backend": BACKENDS,
    "model.arch": ARCHS,
    "model.head": HEADS,
    "model.norm": NORMS,
    "model.head_norm": HEAD_NORMS,
    "model.box_head": BOX_HEADS,
}


def _data_class(name: str) -> type:
    if name not in DATA:
        raise KeyError(f"unknown detection data format {name!r}; known: {', '.join(DATA)}")
    return DATA[name]


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge recipe files and dotted overrides onto the schema, then check the values."""
    cfg = build_config(DetectionConfig, paths, overrides, variants={"data": _data_class})
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Reject values no backend could use, naming the key."""
    check_choices(cfg, _CHOICES)
    if not cfg.data.classes:
        raise ConfigError("data.classes is empty: list the category names of the annotation files")
    if len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError(f"data.classes has duplicates: {list(cfg.data.classes)}")
    if cfg.data.name != "synthetic-shapes":
        if not cfg.data.train:
            raise ConfigError("data.train is empty: give at least one training annotation source")
        fields = ("annotations", "images") if cfg.data.name == "coco" else ("dir", "split", "year")
        for where, source in [
            *((f"data.train[{k}]", s) for k, s in enumerate(cfg.data.train)),
            ("data.test", cfg.data.test),
        ]:
            unset = [f for f in fields if not source[f]]
            if unset:
                raise ConfigError(f"{where}: set {', '.join(unset)}")
    s = cfg.solver
    if list(s.steps) != sorted(s.steps) or any(not 0 < x < s.max_iter for x in s.steps):
        raise ConfigError(
            f"solver.steps={list(s.steps)}: expected increasing iterations inside "
            f"(0, solver.max_iter={s.max_iter})"
        )
    if s.reference_world_size and s.ims_per_batch % s.reference_world_size:
        raise ConfigError(
            f"solver.ims_per_batch={s.ims_per_batch} is not divisible by "
            f"solver.reference_world_size={s.reference_world_size}"
        )
    if not cfg.input.min_size_train:
        raise ConfigError("input.min_size_train is empty")
    if cfg.model.head == "c4" and cfg.model.head_norm:
        raise ConfigError(
            f"model.head_norm={cfg.model.head_norm!r} applies to FPN and its heads; "
            "the C4 head is res5, normalised by model.norm (set model.head_norm='')"
        )
    if not 0 <= cfg.model.freeze_at <= 5:
        raise ConfigError(f"model.freeze_at={cfg.model.freeze_at}: expected 0..5")


@dataclass(frozen=True)
class Schedule:
    """The solver as it runs on `world_size` processes (detectron2's auto_scale_workers rule:
    keep the per-process batch of the reference, scale lr with the batch and iterations
    inversely)."""

    ims_per_batch: int
    base_lr: float
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    world_size: int


def scale_to_world(solver: DictConfig, world_size: int) -> Schedule:
    reference = solver.reference_world_size
    if reference == 0 or reference == world_size:
        schedule = Schedule(
            solver.ims_per_batch,
            solver.base_lr,
            solver.max_iter,
            tuple(solver.steps),
            solver.warmup_iters,
            world_size,
        )
    else:
        scale = world_size / reference
        schedule = Schedule(
            int(round(solver.ims_per_batch * scale)),
            solver.base_lr * scale,
            int(round(solver.max_iter / scale)),
            tuple(int(round(s / scale)) for s in solver.steps),
            int(round(solver.warmup_iters / scale)),
            world_size,
        )
    if schedule.ims_per_batch % world_size:
        raise ConfigError(
            f"solver.ims_per_batch={schedule.ims_per_batch} cannot be split over "
            f"{world_size} processes"
        )
    return schedule
