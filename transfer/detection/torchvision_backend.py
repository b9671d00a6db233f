"""The torchvision backend: runs anywhere torch runs (one CPU process, or torchrun on CPUs/GPUs).

Loads the artifact, builds Mask R-CNN (or Faster R-CNN) with ResNet-FPN on it, trains with the
recipe's schedule scaled to the process count, optionally recomputes BN statistics, and
evaluates the test split with COCOeval. The main process writes train.csv, the final weights and
the predictions into the work directory, and there, while training runs, the state a killed run
continues from (train.RESUME_FILE).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from omegaconf import DictConfig

from sslbench import distributed as D
from sslbench.artifact import input_normalization, load_backbone
from sslbench.config import config_hash
from sslbench.io import atomic_path, write_json_atomic, write_text_atomic

from .config import scale_to_world
from .data import DetectionDataset, load_data
from .evaluate import predict, score
from .model import build_detector, require_resnet, use_test_sizes
from .outcome import Outcome
from .train import RESUME_FILE, precise_bn, train

# Keys that change neither the run nor its number: a killed run may continue with other values.
RESUMABLE_CHANGES = (
    "run.progress",
    "run.threads",
    "run.num_workers",
    "run.work_dir",
    "solver.checkpoint_period",
    "detectron2",
)


def run(cfg: DictConfig, backbone_dir: Path, work_dir: Path) -> Outcome | None:
    """Train and evaluate; returns the outcome on the main process, None on the others."""
    env = D.init_distributed(cfg.run.device)
    try:
        return _run(cfg, backbone_dir, work_dir, env)
    finally:
        D.shutdown()


def _run(cfg: DictConfig, backbone_dir: Path, work_dir: Path, env: D.DistEnv) -> Outcome | None:
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    backbone, manifest = load_backbone(backbone_dir, expected_arch=cfg.backbone.arch)
    require_resnet(backbone.facts, manifest["arch"])  # before any data is made or read
    with D.main_process_first():  # synthetic data is generated once
        data = load_data(cfg.data, cfg.run.progress)
    schedule = scale_to_world(cfg.solver, env.world_size)
    torch.manual_seed(cfg.run.seed)  # new layers start alike on every process
    masks = cfg.model.arch == "mask_rcnn"
    mean, std = input_normalization(manifest)
    model = build_detector(
        backbone, cfg.model, cfg.input, cfg.test, len(data.classes), env.device, mean=mean, std=std
    )
    torch.manual_seed(cfg.run.seed * 1000 + env.rank)  # per-process draws (multi-scale sizes)
    train_set = DetectionDataset(
        data.train, train=True, masks=masks, flip=cfg.input.flip, seed=cfg.run.seed
    )
    log, resumed = train(
        model,
        train_set,
        schedule,
        cfg.solver,
        env.device,
        seed=cfg.run.seed,
        num_workers=cfg.run.num_workers,
        progress=cfg.run.progress,
        log_every=cfg.run.log_every,
        checkpoint=work_dir / RESUME_FILE,
        key=config_hash(cfg, RESUMABLE_CHANGES),
    )
    bn_layers = 0
    if cfg.test.precise_bn:
        bn_layers = precise_bn(
            model,
            train_set,
            schedule.ims_per_batch // env.world_size,
            cfg.test.precise_bn_iters,
            env.device,
            seed=cfg.run.seed,
            num_workers=cfg.run.num_workers,
            progress=cfg.run.progress,
        )
    use_test_sizes(model, cfg.input)
    test_set = DetectionDataset([data.test], train=False)
    results = predict(
        model,
        test_set,
        data.test.category_of,
        env.device,
        num_workers=cfg.run.num_workers,
        progress=cfg.run.progress,
    )
    if not env.is_main:
        return None
    metrics, warnings = score(data.test.coco, results, ("bbox", "segm") if masks else ("bbox",))
    write_text_atomic(work_dir / "train.csv", log)
    with atomic_path(work_dir / "model_final.pth") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json_atomic(work_dir / "predictions.json", results)
    return Outcome(
        metrics=metrics,
        schedule=schedule,
        data=data,
        train_images=len(train_set),
        device=D.device_name(env.device, env.world_size),
        cuda=env.device.type == "cuda",
        details={
            "precise_bn_layers": bn_layers,
            "detections": len(results),
            "warnings": warnings,
            "final_losses": _last_row(log),
            **({} if resumed is None else {"resumed_from_iteration": resumed}),
        },
    )


def _last_row(log: str) -> dict[str, float]:
    rows = list(csv.DictReader(io.StringIO(log)))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}
