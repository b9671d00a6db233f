"""The segmentation recipe schema: every key a configs/transfer/segmentation_*.yaml may set.

Keys mirror mmsegmentation's config fields (named in the comments), so `mmseg_config.py`
translates them one to one. Defaults are mmseg's FCN-R50-D8 on VOC12aug 512x512 20k, the
protocol mmselfsup reports (`model.vit`'s are mmseg's ViT-B UPerNet); every shipped recipe
sets its protocol values explicitly anyway.
`data` is a variant section chosen by `data.name`: voc12aug, cityscapes, ade20k (mmseg's
layouts under a local root) or synthetic-shapes (the embedded generator's PNG label maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from sslbench.config import ConfigError, build_config, check_choices

HEADS = ("fcn", "upernet")
OPTIMIZERS = ("sgd", "adamw")
NORMS = ("SyncBN", "BN")
TEST_MODES = ("whole", "slide")


@dataclass
class RunConfig:
    seed: int = 0  # randomness.seed; also the new layers' initialisation
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch CPU threads; None leaves the default
    progress: bool = True  # progress bar while synthetic-shapes is generated
    num_workers: int = 4  # data-loader processes per training process
    work_dir: Optional[str] = None  # logs, mmengine config, weights; None: RESULTS_DIR/.work/...
    log_every: int = 50  # LoggerHook interval (iterations)
    # iterations between mmengine checkpoints in work_dir, which a killed run resumes from (and
    # one at the end); 0: none. Not part of the protocol: it never changes the number.
    checkpoint_every: int = 2000


@dataclass
class BackboneConfig:
    arch: Optional[str] = None  # the architecture the recipe is for (e.g. resnet50); None: any


@dataclass
class VitConfig:
    """How a ViT backbone feeds the heads (mmseg's VisionTransformer + MultiLevelNeck): the
    patch tokens after the listed blocks, as maps, each resized by its neck scale. Read only
    when the backbone is a ViT."""

    out_indices: List[int] = field(default_factory=lambda: [2, 5, 8, 11])  # blocks, from 0
    neck_scales: List[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    drop_path: float = 0.1  # drop_path_rate of the fine-tuned blocks


@dataclass
class ModelConfig:
    head: str = "fcn"  # fcn (FCNHead) | upernet (UPerHead)
    dilated: bool = True  # ResNets: output stride 8: strides (1,2,1,1), dilations (1,1,2,4) ("D8")
    norm: str = "SyncBN"  # backbone and heads (norm_cfg); SyncBN runs as BN on one process/CPU
    channels: int = 512  # decode_head.channels
    num_convs: int = 2  # FCNHead.num_convs
    concat_input: bool = True  # FCNHead.concat_input
    pool_scales: List[int] = field(default_factory=lambda: [1, 2, 3, 6])  # UPerHead.pool_scales
    dropout: float = 0.1  # dropout_ratio of both heads
    auxiliary: bool = True  # an FCNHead on the third stage's output (auxiliary_head)
    auxiliary_channels: int = 256
    auxiliary_weight: float = 0.4  # its loss weight
    auxiliary_index: int = 2  # the backbone map it reads (its in_index): a ResNet's third stage
    align_corners: bool = False
    test_mode: str = "whole"  # test_cfg.mode: whole image | slide (sliding window)
    test_crop: List[int] = field(default_factory=list)  # slide window (h, w); [] = input.crop_size
    test_stride: List[int] = field(default_factory=list)  # slide stride (h, w)
    vit: VitConfig = field(default_factory=VitConfig)


@dataclass
class InputConfig:
    crop_size: List[int] = field(default_factory=lambda: [512, 512])  # (h, w) RandomCrop
    scale: List[int] = field(default_factory=lambda: [2048, 512])  # RandomResize scale (w, h)
    ratio_range: List[float] = field(default_factory=lambda: [0.5, 2.0])  # RandomResize
    cat_max_ratio: float = 0.75  # RandomCrop: no single class above this share (1.0: off)
    flip: float = 0.5  # RandomFlip probability
    photometric: bool = True  # PhotoMetricDistortion
    test_scale: List[int] = field(default_factory=lambda: [2048, 512])  # test Resize (w, h)


@dataclass
class SolverConfig:
    batch_size: int = 16  # global; each of N processes takes batch_size / N (mmseg: 4 GPUs x 4)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    weight_decay: float = 5.0e-4
    # parameter-name substrings trained without weight decay (paramwise_cfg.custom_keys with
    # decay_mult 0, matched as mmengine matches them: anywhere in the full name)
    no_decay: List[str] = field(default_factory=list)
    warmup_iters: int = 0  # LinearLR from warmup_factor x lr, then PolyLR; 0: PolyLR alone
    warmup_factor: float = 1.0e-6  # LinearLR start_factor
    max_iters: int = 20000  # IterBasedTrainLoop
    poly_power: float = 0.9  # PolyLR power
    min_lr: float = 1.0e-4  # PolyLR eta_min
    val_interval: int = 0  # evaluate every N iterations as well as at the end; 0: at the end only


@dataclass
class Voc12AugData:
    """mmseg's PascalVOCDataset: VOC2012 train (+ SBD's aug set converted by mmseg's voc_aug.py)
    for training, VOC2012 val for testing."""

    name: str = "voc12aug"
    root: Optional[str] = None  # None: $SSLBENCH_DATA/VOCdevkit/VOC2012, else ./data/...
    aug: bool = True  # add SegmentationClassAug + ImageSets/Segmentation/aug.txt to training


@dataclass
class CityscapesData:
    """mmseg's CityscapesDataset: leftImg8bit/<split> and gtFine/<split>/*_labelTrainIds.png."""

    name: str = "cityscapes"
    root: Optional[str] = None  # None: $SSLBENCH_DATA/cityscapes, else ./data/cityscapes
    train_split: str = "train"
    test_split: str = "val"


@dataclass
class Ade20kData:
    """mmseg's ADE20KDataset: images/<split> and annotations/<split> (150 classes; label 0,
    "other", is ignored)."""

    name: str = "ade20k"
    root: Optional[str] = None  # None: $SSLBENCH_DATA/ADEChallengeData2016, else ./data/...
    train_split: str = "training"
    test_split: str = "validation"


@dataclass
class ShapesData:
    name: str = "synthetic-shapes"
    root: Optional[str] = None  # None: $SSLBENCH_DATA/synthetic-shapes, else ./data/...
    options: Dict[str, Any] = field(default_factory=dict)  # generator params (image_size, ...)
    train_split: str = "train"
    test_split: str = "val"


@dataclass
class SegmentationConfig:
    run: RunConfig = field(default_factory=RunConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: Any = field(default_factory=Voc12AugData)  # by data.name
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)


DATA = {
    "voc12aug": Voc12AugData,
    "cityscapes": CityscapesData,
    "ade20k": Ade20kData,
    "synthetic-shapes": ShapesData,
}
# Where each layout lies under $SSLBENCH_DATA when data.root is not set.
DEFAULT_DIRS = {
    "voc12aug": "VOCdevkit/VOC2012",
    "cityscapes": "cityscapes",
    "ade20k": "ADEChallengeData2016",
    "synthetic-shapes": "synthetic-shapes",
}
_CHOICES = {
    "model.head": HEADS,
    "model.norm": NORMS,
    "model.test_mode": TEST_MODES,
    "solver.optimizer": OPTIMIZERS,
}
_PAIRS = ("input.crop_size", "input.scale", "input.ratio_range", "input.test_scale", "solver.betas")


def _data_class(name: str) -> type:
    if name not in DATA:
        raise KeyError(f"unknown segmentation data format {name!r}; known: {', '.join(DATA)}")
    return DATA[name]


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge recipe files and dotted overrides onto the schema, then check the values."""
    cfg = build_config(SegmentationConfig, paths, overrides, variants={"data": _data_class})
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Reject values mmseg would fail on later (or silently misread), naming the key."""
    check_choices(cfg, _CHOICES)
    for key in _PAIRS:
        value = list(OmegaConf.select(cfg, key))
        if len(value) != 2 or any(v <= 0 for v in value):
            raise ConfigError(f"{key}={value}: expected two positive numbers")
    m = cfg.model
    if m.test_mode == "slide":
        for key in ("test_crop", "test_stride"):
            if m[key] and (len(m[key]) != 2 or any(v <= 0 for v in m[key])):
                raise ConfigError(f"model.{key}={list(m[key])}: expected (h, w)")
        if not m.test_stride:
            raise ConfigError("model.test_mode='slide' needs model.test_stride (h, w)")
    elif m.test_crop or m.test_stride:
        raise ConfigError("model.test_crop and model.test_stride apply to model.test_mode='slide'")
    if m.head == "upernet" and not m.pool_scales:
        raise ConfigError("model.pool_scales is empty: UPerNet's pyramid pooling needs scales")
    if m.auxiliary_index < 0:
        raise ConfigError(f"model.auxiliary_index={m.auxiliary_index}: expected a map index >= 0")
    _check_vit(m.vit)
    s = cfg.solver
    if any(not 0 <= b < 1 for b in s.betas):
        raise ConfigError(f"solver.betas={list(s.betas)}: expected two numbers in [0, 1)")
    if not 0 <= s.warmup_iters < s.max_iters or not 0 < s.warmup_factor <= 1:
        raise ConfigError(
            f"solver.warmup_iters={s.warmup_iters}, solver.warmup_factor="
            f"{s.warmup_factor}: expected 0..max_iters-1 iterations from a "
            "factor in (0, 1]"
        )
    if s.max_iters <= 0 or s.batch_size <= 0:
        raise ConfigError(
            f"solver.max_iters={s.max_iters}, solver.batch_size={s.batch_size}: "
            "expected positive integers"
        )
    if not 0 <= s.val_interval <= s.max_iters:
        raise ConfigError(f"solver.val_interval={s.val_interval}: expected 0..solver.max_iters")
    if not 0 <= cfg.input.flip <= 1:
        raise ConfigError(f"input.flip={cfg.input.flip}: expected a probability")


def _check_vit(vit: DictConfig) -> None:
    indices, scales = list(vit.out_indices), list(vit.neck_scales)
    if not indices or indices != sorted(set(indices)) or indices[0] < 0:
        raise ConfigError(
            f"model.vit.out_indices={indices}: expected increasing block indices >= 0"
        )
    if len(scales) != len(indices) or any(v <= 0 for v in scales):
        raise ConfigError(
            f"model.vit.neck_scales={scales}: expected one positive scale per "
            f"entry of model.vit.out_indices={indices}"
        )
    if not 0 <= vit.drop_path < 1:
        raise ConfigError(f"model.vit.drop_path={vit.drop_path}: expected a rate in [0, 1)")
