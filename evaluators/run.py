"""Run one evaluation task on one backbone and write its result record.

Every task goes through here, so every record is made the same way: the backbone's identity from
its manifest, the data part of the protocol, wall time and peak memory, device and versions.
Works as one process or under torchrun (the main process writes the record).
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import torch
from omegaconf import DictConfig

from sslbench import distributed as D
from sslbench.artifact import load_backbone
from sslbench.results import (BackboneIdentity, DatasetInfo, ResultRecord, library_versions,
                              peak_memory_mb, write_record)
from sslbench.transforms import build_eval_transform

from . import knn, linear, semisup
from .context import EvalContext, load_splits
from .features import cache_location

TASKS = {"knn": knn.run, "linear": linear.run, "semisup": semisup.run}


def _device_name(device: torch.device, world_size: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name if world_size == 1 else f"{name} x{world_size}"


def data_protocol(image_size: int, datasets: dict) -> dict:
    """The data half of every protocol: which data (not where it lies), at which input size,
    and how much of it."""
    identity = {k: v for k, v in datasets["train"].describe().items()
                if k not in ("root", "split", "size")}
    return {"dataset": identity, "image_size": image_size,
            "sizes": {split: len(ds) for split, ds in datasets.items()}}


def evaluate(task: str, cfg: DictConfig, backbone_dir: str | Path,
             out_dir: str | Path) -> Path | None:
    """Evaluate the backbone in `backbone_dir` and write the record into `out_dir`.

    Returns the record's path (None on processes other than the main one).
    """
    env = D.init_distributed(cfg.run.device)
    try:
        return _evaluate(task, cfg, Path(backbone_dir), Path(out_dir), env)
    finally:
        D.shutdown()


def _evaluate(task: str, cfg: DictConfig, backbone_dir: Path, out_dir: Path,
              env: D.DistEnv) -> Path | None:
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
        faiss.omp_set_num_threads(cfg.run.threads)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    started = time.perf_counter()
    backbone, manifest = load_backbone(backbone_dir)
    backbone.to(env.device).eval()
    transform = build_eval_transform(cfg.data.image_size)
    if not env.is_main:  # the main process generates a synthetic dataset first
        D.barrier()
    datasets = load_splits(cfg.data, transform)
    if env.is_main:
        D.barrier()
    cache_dir = cache_location(cfg.features.cache, cfg.features.cache_dir, out_dir)
    torch.manual_seed(cfg.run.seed)
    ctx = EvalContext(cfg, backbone, manifest, env.device, datasets, cache_dir)
    output = TASKS[task](ctx)
    if not env.is_main:
        return None
    train = datasets["train"]
    record = ResultRecord(
        task=task, metrics=output.metrics, backbone=BackboneIdentity.from_manifest(manifest),
        protocol={"data": data_protocol(cfg.data.image_size, datasets), **output.protocol},
        dataset=DatasetInfo(train.name, train.num_classes,
                            {**{s: len(ds) for s, ds in datasets.items()}, **output.splits},
                            train.describe()),
        seed=cfg.run.seed, wall_time_s=round(time.perf_counter() - started, 3),
        peak_memory_mb=peak_memory_mb(env.device.type == "cuda"),
        device=_device_name(env.device, env.world_size), versions=library_versions(),
        details={**output.details, "feature_cache": ctx.cache_use,
                 "backbone_dir": str(backbone_dir), "world_size": env.world_size})
    return write_record(out_dir, record)
