"""The detectron2 backend: the MoCo protocol, trained by detectron2's own launcher and trainer.

This module translates a recipe into detectron2 config values without importing detectron2
(`detectron2_options`, so the translation is tested everywhere) and reads detectron2's metrics
back (`metrics_from_detectron2`; no detection scores 0 with a warning, as in the torchvision
backend). `run` exports the backbone to detectron2's format, validates the data with the same
checks as the torchvision backend, and hands over to `detectron2_trainer.main` through
`detectron2.engine.launch` (one process per GPU).

A killed run continues when the same command runs again: detectron2 resumes from the newest
checkpoint in the work directory (`last_checkpoint`, every solver.checkpoint_period iterations),
whose recipe key must be this recipe's (`resume_point`; the keys that may change are the
torchvision backend's RESUMABLE_CHANGES), and ends as an uninterrupted run would (see
detectron2_trainer). Once the record is written the pointer goes (run.py), so the checkpoints
stay as the fine-tuned model and the same command run again trains anew, as with torchvision.

Protocol values fixed by the artifact rather than the recipe: RGB input normalised with the
torchvision mean/std the backbone was pretrained with, and STRIDE_IN_1X1=False (torchvision's
ResNet strides in the 3x3 conv; detectron2's MSRA default strides in the 1x1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from pycocotools.coco import COCO

from sslbench.artifact import (
    ArtifactError,
    backbone_facts,
    describe_arch,
    input_normalization,
    read_manifest,
)
from sslbench.config import ConfigError, config_hash
from sslbench.distributed import device_name, resolve_device
from sslbench.transforms import pixel_stats

from ..export import export_backbone
from .config import scale_to_world
from .data import AnnotationSet, DetectionData, DetectionDataset, load_data
from .detectron2_resume import resume_point
from .evaluate import STATS, score
from .model import require_resnet
from .outcome import Outcome
from .torchvision_backend import RESUMABLE_CHANGES

INSTALL_HINT = (
    "the detectron2 backend needs detectron2, which is not importable here. detectron2 is not on "
    "PyPI: run this command in the project's GPU Docker image, which has it installed "
    "(docker build -t sslbench . && docker run --gpus all sslbench transfer detection ...), or "
    "build it from source against your torch: pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'. On a machine without it, use "
    "backend=torchvision."
)
BASE_CONFIGS = {"c4": "Base-RCNN-C4.yaml", "fpn": "Base-RCNN-FPN.yaml"}  # detectron2 model zoo
RESULTS_FILE = "eval_results.json"


def require_detectron2() -> str:
    """detectron2's version; a RuntimeError saying how to get it when it is not importable."""
    try:
        import detectron2
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return detectron2.__version__


def resnet_options(manifest: dict, head: str) -> dict[str, Any]:
    """MODEL.RESNETS values that rebuild the artifact's network in detectron2, or a clear error."""
    what = describe_arch(manifest)
    facts = backbone_facts(manifest)
    require_resnet(facts, what)
    r = facts.structure
    if r["block"] == "basic" and (r["stem_channels"] != 64 or head == "c4"):
        raise ArtifactError(
            f"backbone {what} cannot be built by detectron2: its ResNet-"
            f"{r['depth']} needs width 64 (RES2_OUT_CHANNELS=64) and has no C4 "
            "res5 head (that head is built of bottleneck blocks); use a "
            "bottleneck ResNet (resnet50 or deeper)"
        )
    return {
        "MODEL.RESNETS.DEPTH": r["depth"],
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.NUM_GROUPS": 1,  # detectron2's bottleneck width: groups x this
        "MODEL.RESNETS.WIDTH_PER_GROUP": r["stem_channels"] * r["width_per_group"] // 64,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": r["stem_channels"],
        "MODEL.RESNETS.RES2_OUT_CHANNELS": facts.stages[0].channels,
    }


def detectron2_options(
    cfg: DictConfig,
    manifest: dict,
    *,
    weights: str,
    train: list[str],
    test: str,
    num_classes: int,
    output_dir: str,
    device: str,
) -> dict[str, Any]:
    """detectron2 config values (KEY.PATH -> value) for the recipe, applied over BASE_CONFIGS."""
    m, i, s, t = cfg.model, cfg.input, cfg.solver, cfg.test
    mean, std = pixel_stats(*input_normalization(manifest))
    fpn = m.head == "fpn"
    options: dict[str, Any] = {
        "MODEL.WEIGHTS": weights,
        "MODEL.DEVICE": device,
        "MODEL.MASK_ON": m.arch == "mask_rcnn",
        "MODEL.PIXEL_MEAN": mean,
        "MODEL.PIXEL_STD": std,
        "INPUT.FORMAT": "RGB",
        "MODEL.BACKBONE.FREEZE_AT": m.freeze_at,
        "MODEL.RESNETS.NORM": m.norm,
        **resnet_options(manifest, m.head),
        "MODEL.ROI_HEADS.NAME": "StandardROIHeads" if fpn else "Res5ROIHeadsExtraNorm",
        "MODEL.ROI_HEADS.NUM_CLASSES": num_classes,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": m.roi_batch_size_per_image,
        "MODEL.ROI_HEADS.POSITIVE_FRACTION": m.roi_positive_fraction,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": m.rpn_pre_nms_topk_train,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": m.rpn_pre_nms_topk_test,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": m.rpn_post_nms_topk_train,
        "MODEL.RPN.POST_NMS_TOPK_TEST": m.rpn_post_nms_topk_test,
        # FPN: one size per level (P2..P6); C4: all sizes on the single res4 map
        "MODEL.ANCHOR_GENERATOR.SIZES": (
            [[int(x)] for x in m.anchor_sizes] if fpn else [[int(x) for x in m.anchor_sizes]]
        ),
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[float(r) for r in m.aspect_ratios]],
        "INPUT.MIN_SIZE_TRAIN": tuple(i.min_size_train),
        "INPUT.MAX_SIZE_TRAIN": i.max_size_train,
        "INPUT.MIN_SIZE_TEST": i.min_size_test,
        "INPUT.MAX_SIZE_TEST": i.max_size_test,
        "INPUT.RANDOM_FLIP": "horizontal" if i.flip else "none",
        "SOLVER.IMS_PER_BATCH": s.ims_per_batch,
        "SOLVER.BASE_LR": s.base_lr,
        "SOLVER.REFERENCE_WORLD_SIZE": s.reference_world_size,
        "SOLVER.MAX_ITER": s.max_iter,
        "SOLVER.STEPS": tuple(s.steps),
        "SOLVER.GAMMA": s.gamma,
        "SOLVER.WARMUP_ITERS": s.warmup_iters,
        "SOLVER.WARMUP_FACTOR": s.warmup_factor,
        "SOLVER.MOMENTUM": s.momentum,
        "SOLVER.WEIGHT_DECAY": s.weight_decay,
        "SOLVER.WEIGHT_DECAY_NORM": s.weight_decay_norm,
        "SOLVER.CHECKPOINT_PERIOD": s.checkpoint_period,
        "TEST.PRECISE_BN.ENABLED": t.precise_bn,
        "TEST.PRECISE_BN.NUM_ITER": t.precise_bn_iters,
        "TEST.DETECTIONS_PER_IMAGE": t.detections_per_image,
        "TEST.EVAL_PERIOD": 0,
        "DATASETS.TRAIN": tuple(train),
        "DATASETS.TEST": (test,),
        "DATALOADER.NUM_WORKERS": cfg.run.num_workers,
        "OUTPUT_DIR": output_dir,
        "SEED": cfg.run.seed,
    }
    if fpn:
        convs, fcs = (4, 1) if m.box_head == "4conv1fc" else (0, 2)
        options.update(
            {
                "MODEL.FPN.NORM": m.head_norm,
                "MODEL.FPN.OUT_CHANNELS": m.fpn_channels,
                "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
                "MODEL.ROI_BOX_HEAD.NUM_CONV": convs,
                "MODEL.ROI_BOX_HEAD.NUM_FC": fcs,
                "MODEL.ROI_BOX_HEAD.NORM": m.head_norm,
                "MODEL.ROI_BOX_HEAD.CONV_DIM": m.head_conv_dim,
                "MODEL.ROI_BOX_HEAD.FC_DIM": m.box_head_dim,
                "MODEL.ROI_MASK_HEAD.NORM": m.head_norm,
                "MODEL.ROI_MASK_HEAD.CONV_DIM": m.head_conv_dim,
            }
        )
    return options


def metrics_from_detectron2(
    results: dict, detections: int, gt: COCO
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """detectron2's evaluator output {"bbox": {"AP": ..., "AP-person": ...}, "segm": ...} as
    (our metrics, per-category APs, warnings for the record); NaN (no ground truth in an area
    range) is left out. Without detections detectron2's COCO evaluator skips COCOeval and
    answers NaN for every metric: such an IoU type is scored by `score` on the test split `gt`,
    as the torchvision backend scores no detections (0 where there are objects, a warning)."""
    metrics, per_class = {}, {}
    for iou_type, values in results.items():
        for name, value in values.items():
            key = f"{iou_type}_{name}"
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if name in STATS:
                metrics[key] = float(value)
            else:
                per_class[key] = float(value)
    warnings = []
    if detections == 0:
        unscored = [t for t in results if not any(k.startswith(f"{t}_") for k in metrics)]
        zeros, warnings = score(gt, [], unscored)
        metrics.update(zeros)
    if not metrics:
        raise RuntimeError(f"detectron2 returned no metrics: {json.dumps(results)[:300]}")
    return metrics, per_class, warnings


def registrations(data: DetectionData) -> tuple[list[tuple], int]:
    """(name, kind, arguments) of every dataset detectron2 must register, and the class count."""
    if data.test.kind == "coco":
        _check_same_categories(data)
        num_classes = len(data.train[0].label_of)
    else:
        num_classes = len(data.classes)

    def spec(name: str, s: AnnotationSet) -> tuple:
        if s.kind == "voc":
            return (name, "voc", (str(s.image_root), s.voc_split, s.voc_year, list(data.classes)))
        return (name, "coco", (s.source, str(s.image_root)))

    specs = [spec(f"sslbench_train_{k}", s) for k, s in enumerate(data.train)]
    return [*specs, spec("sslbench_test", data.test)], num_classes


def _check_same_categories(data: DetectionData) -> None:
    """detectron2 numbers a COCO file's categories by sorted id, per file: all files must agree."""
    reference = data.train[0]
    expected = {c["id"]: c["name"] for c in reference.coco.dataset["categories"]}
    for s in [*data.train[1:], data.test]:
        found = {c["id"]: c["name"] for c in s.coco.dataset["categories"]}
        if found != expected:
            raise ConfigError(
                f"{s.source} and {reference.source} list different categories; "
                "the detectron2 backend needs the same (id, name) list in every file"
            )


def run(cfg: DictConfig, backbone_dir: Path, work_dir: Path) -> Outcome | None:
    """Train and test through detectron2; None on machines other than machine_rank 0."""
    version = require_detectron2()
    # Here, not at the top: both import detectron2, which this module must not need to import.
    from detectron2.engine import launch

    from . import detectron2_trainer

    manifest = read_manifest(backbone_dir)
    if cfg.backbone.arch is not None and manifest["arch"] != cfg.backbone.arch:
        raise ArtifactError(
            f"{backbone_dir}: backbone is {manifest['arch']}, but this task "
            f"needs {cfg.backbone.arch}"
        )
    resnet_options(manifest, cfg.model.head)  # refuse before exporting or loading data
    key = config_hash(cfg, RESUMABLE_CHANGES)
    resumed = resume_point(work_dir, key)  # refuse another recipe's checkpoint before starting
    weights = export_backbone(backbone_dir, "detectron2", work_dir / "backbone.detectron2.pkl")
    data = load_data(cfg.data, cfg.run.progress)
    datasets, num_classes = registrations(data)
    device = resolve_device(cfg.run.device)
    options = detectron2_options(
        cfg,
        manifest,
        weights=str(weights),
        train=[d[0] for d in datasets[:-1]],
        test=datasets[-1][0],
        num_classes=num_classes,
        output_dir=str(work_dir),
        device=device.type,
    )
    results_path = work_dir / RESULTS_FILE
    results_path.unlink(missing_ok=True)
    launcher = cfg.detectron2
    launch(
        detectron2_trainer.main,
        launcher.num_gpus,
        num_machines=launcher.num_machines,
        machine_rank=launcher.machine_rank,
        dist_url=launcher.dist_url,
        args=(
            BASE_CONFIGS[cfg.model.head],
            options,
            datasets,
            str(results_path),
            key,
            cfg.run.log_every,
        ),
    )
    if launcher.machine_rank != 0:  # global rank 0, on machine 0, wrote the metrics
        return None
    if not results_path.is_file():
        raise RuntimeError(f"detectron2 finished without writing {results_path}")
    evaluation = json.loads(results_path.read_text())
    metrics, per_class, warnings = metrics_from_detectron2(
        evaluation["metrics"], evaluation["detections"], data.test.coco
    )
    world = launcher.num_gpus * launcher.num_machines
    # one process trains in this one (its CUDA peak is the run's); more run in child processes
    return Outcome(
        metrics=metrics,
        schedule=scale_to_world(cfg.solver, world),
        data=data,
        train_images=len(DetectionDataset(data.train, train=True)),
        device=device_name(device, world),
        cuda=device.type == "cuda" and world == 1,
        details={
            "detections": evaluation["detections"],
            "warnings": warnings,
            "per_category": per_class,
            "detectron2_options": _jsonable(options),
            **({} if resumed is None else {"resumed_from_iteration": resumed}),
        },
        versions={"detectron2": version},
    )


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
