"""Train and evaluate a segmentation recipe on a backbone with mmengine's Runner; write the record.

The Runner writes its log, the dumped mmengine config, `vis_data/scalars.json` and TensorBoard
events under `work_dir/<timestamp>/`; this module adds `train.csv` and `curves.png` (the training
curves) and `model_final.pth`, a plain state dict that `torch.load(weights_only=True)` reads
(mmengine's own checkpoints pickle mmengine classes, and it does not). Those checkpoints, every
run.checkpoint_every iterations, are what the same command run again resumes from (resume.py);
they go once the record is written.

The protocol holds what changes the number: data identity (not paths), backbone arch, model,
input and solver; the process count is a detail, since the same global batch on more processes
is the same protocol.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sslbench import distributed as D
from sslbench.artifact import describe_arch, load_backbone
from sslbench.config import config_hash, to_dict
from sslbench.data import default_data_root, prepare_synthetic_shapes
from sslbench.data.registry import call_with_options
from sslbench.io import atomic_path, write_text_atomic
from sslbench.metrics import plot_curves
from sslbench.results import DatasetInfo, TaskOutput, build_record, write_record

from ..common import default_work_dir
from .config import DEFAULT_DIRS
from .mmseg_config import DATASET_TYPES, required_paths, runner_config
from .model import build_segmentor, require_mmseg

METRICS = ("mIoU", "mAcc", "aAcc")  # the record's metrics (percent); per-class IoU goes to details
# Keys that change neither the run nor its number: a killed run may continue with other values.
RESUMABLE_CHANGES = (
    "run.progress",
    "run.threads",
    "run.work_dir",
    "run.checkpoint_every",
    "run.log_every",
)


class SegmentationDataError(ValueError):
    """A dataset root that does not hold the layout the recipe names."""


def transfer(cfg: DictConfig, backbone_dir: str | Path, out_dir: str | Path) -> Path | None:
    """Train and evaluate; returns the record's path (None on processes other than the main)."""
    started = time.perf_counter()
    versions = require_mmseg()
    backbone_dir, out_dir = Path(backbone_dir), Path(out_dir)
    backbone, manifest = load_backbone(backbone_dir, expected_arch=cfg.backbone.arch)
    work_dir = default_work_dir("segmentation", cfg.run, manifest, out_dir)
    env = _init_processes(cfg.run.device)
    try:
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        with D.main_process_first():  # synthetic data is generated once
            root = prepare_data(cfg.data, cfg.run.progress)
        output = _train(cfg, backbone.state_dict(), manifest, root, work_dir, env)
    finally:
        D.shutdown()
    if output is None:
        return None
    output = dataclasses.replace(
        output,
        versions=versions,
        details={**output.details, "backbone_dir": str(backbone_dir), "work_dir": str(work_dir)},
    )
    record = build_record(
        "segmentation",
        output,
        manifest,
        seed=cfg.run.seed,
        started=started,
        device=D.device_name(env.device, env.world_size),
        world_size=env.world_size,
        cuda=env.device.type == "cuda",
    )
    path = write_record(out_dir, record)
    from .resume import remove_checkpoints  # imports mmengine, known importable by now

    remove_checkpoints(work_dir)
    return path


def _init_processes(device: str) -> D.DistEnv:
    """One process, or torchrun's GPU processes (mmengine's data-parallel wrapper is GPU-only).

    run.device=cpu hides the GPUs, mmengine's documented way to train on CPU: its Runner puts
    the model on a GPU whenever one is visible.
    """
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            raise RuntimeError(
                "run.device=cpu, but CUDA was initialised before the GPUs could "
                "be hidden; set CUDA_VISIBLE_DEVICES='' before starting"
            )
    env = D.init_distributed(device)
    if env.world_size > 1 and env.device.type != "cuda":
        D.shutdown()
        raise RuntimeError(
            "several processes need one GPU each: mmengine's data-parallel "
            "training does not run on CPU processes; run one process"
        )
    return env


def prepare_data(data: DictConfig, progress: bool) -> Path:
    """The dataset root, after generating synthetic-shapes or checking a real layout is there."""
    root = default_data_root() / DEFAULT_DIRS[data.name] if data.root is None else Path(data.root)
    if data.name == "synthetic-shapes":
        return call_with_options(
            prepare_synthetic_shapes,
            "dataset 'synthetic-shapes'",
            root,
            **{"progress": progress, **data.options},
        )
    missing = [str(p) for p in required_paths(data, root) if not p.exists()]
    if missing:
        raise SegmentationDataError(
            f"{data.name} at {root}: missing {', '.join(missing)} "
            f"(mmseg's {DATASET_TYPES[data.name]} layout; set data.root "
            "or $SSLBENCH_DATA)"
        )
    if data.name == "cityscapes" and not any(
        (root / "gtFine" / data.train_split).rglob("*_gtFine_labelTrainIds.png")
    ):
        raise SegmentationDataError(
            f"{root / 'gtFine' / data.train_split} holds no "
            "*_gtFine_labelTrainIds.png: convert the labels with mmseg's "
            "tools/dataset_converters/cityscapes.py first"
        )
    return root


def _train(
    cfg: DictConfig, state: dict, manifest: dict, root: Path, work_dir: Path, env: D.DistEnv
) -> TaskOutput | None:
    from mmengine.config import Config
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner
    from mmseg.registry import DATASETS

    from .components import LastMetrics
    from .resume import ExactResume, latest_checkpoint

    classes = DATASETS.get(DATASET_TYPES[cfg.data.name]).METAINFO["classes"]
    norm = "SyncBN" if cfg.model.norm == "SyncBN" and env.device.type == "cuda" else "BN"
    settings = runner_config(
        cfg,
        manifest,
        num_classes=len(classes),
        root=root,
        work_dir=work_dir,
        norm=norm,
        world_size=env.world_size,
        resume_from=latest_checkpoint(work_dir),
    )
    model, report = build_segmentor(
        settings["model"], state, f"backbone {describe_arch(manifest)}", cfg.run.seed
    )
    last, resume = LastMetrics(), ExactResume(config_hash(cfg, RESUMABLE_CHANGES))
    runner = Runner(
        **{**settings, "model": model, "cfg": Config(settings), "custom_hooks": [last, resume]}
    )
    trained = runner.train()
    trained = trained.module if is_model_wrapper(trained) else trained
    if not env.is_main:
        return None
    if last.metrics is None:
        raise RuntimeError("mmengine's Runner finished without evaluating the test split")
    scalars = sorted(work_dir.glob("*/vis_data/scalars.json"))  # each run's log, oldest first
    if resume.resumed_from is None:  # this run's alone; a resumed one continues earlier ones
        scalars = [path for path in scalars if path.is_relative_to(runner.log_dir)]
    if scalars:
        write_text_atomic(work_dir / "train.csv", training_curves(*scalars))
        plot_curves(work_dir, ("train",))  # curves.png
    with atomic_path(work_dir / "model_final.pth") as tmp:
        torch.save({k: v.detach().cpu() for k, v in trained.state_dict().items()}, tmp)
    per_class = {name: _finite_or_none(last.metrics[f"IoU.{name}"]) for name in classes}
    sizes = {
        "train": len(runner.train_dataloader.dataset),
        "test": len(runner.val_dataloader.dataset),
    }
    # per_class: IoU per class, None where a class is absent from labels and predictions
    return TaskOutput(
        metrics={k: round(float(last.metrics[k]), 2) for k in METRICS},  # float32 percent
        protocol=protocol(cfg),
        dataset=DatasetInfo(
            cfg.data.name, len(per_class), sizes, {"root": str(root), **_data_options(cfg)}
        ),
        details={
            "per_class_IoU": per_class,
            "backbone_loaded": dataclasses.asdict(report),
            "norm_layer": norm,
            **(
                {}
                if resume.resumed_from is None
                else {"resumed_from_iteration": resume.resumed_from}
            ),
        },
    )


def training_curves(*scalars: Path) -> str:
    """mmengine's scalars.json (one JSON object per logged step) as CSV: one row per training
    log step, `step` (the iteration) first, then every scalar logged at all of them.

    Several files are the runs of one training, oldest first, each resumed from a checkpoint of
    the one before: a run gives the steps before the next one's first (those after it were
    trained again from the checkpoint)."""
    runs = []
    for path in scalars:
        lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        runs.append([{k: v for k, v in r.items() if k != "iter"} for r in lines if "loss" in r])
    rows = []
    for i, run in enumerate(runs):
        until = min((later[0]["step"] for later in runs[i + 1 :] if later), default=math.inf)
        rows += [r for r in run if r["step"] < until]
    common = set.intersection(*(set(r) for r in rows)) if rows else {"step"}
    columns = ["step", *sorted(common - {"step"})]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _data_options(cfg: DictConfig) -> dict:
    return {"options": to_dict(cfg.data.options)} if cfg.data.name == "synthetic-shapes" else {}


def protocol(cfg: DictConfig) -> dict:
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "root"}
    solver = {k: v for k, v in to_dict(cfg.solver).items() if k != "val_interval"}
    return {
        "backbone_arch": cfg.backbone.arch,
        "data": data,
        "model": to_dict(cfg.model),
        "input": to_dict(cfg.input),
        "solver": solver,
    }
