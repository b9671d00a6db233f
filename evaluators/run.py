"""Run one evaluation task on one backbone and write its result record.

Every evaluation task runs in this frame (backbone and data loaded, features cached) and its
output gets the data part of the protocol and the dataset before build_record makes the record.
Works as one process or under torchrun (the main process writes the record). A task that trains
keeps its resume state under RESULTS_DIR/.work/ (EvalContext.resume_state); the same command run
again continues from it, and it goes once the record is written.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import faiss
import torch
from omegaconf import DictConfig

from sslbench import distributed as D
from sslbench.artifact import input_normalization, load_backbone
from sslbench.results import DatasetInfo, build_record, write_record
from sslbench.tasks import WORK_DIR, get_task
from sslbench.transforms import build_eval_transform

from .context import EvalContext, load_splits
from .features import cache_location


def evaluate(
    task: str, cfg: DictConfig, backbone_dir: str | Path, out_dir: str | Path
) -> Path | None:
    """Evaluate the backbone in `backbone_dir` and write the record into `out_dir`.

    Returns the record's path (None on processes other than the main one).
    """
    env = D.init_distributed(cfg.run.device)
    try:
        return _evaluate(task, cfg, Path(backbone_dir), Path(out_dir), env)
    finally:
        D.shutdown()


def _evaluate(
    task: str, cfg: DictConfig, backbone_dir: Path, out_dir: Path, env: D.DistEnv
) -> Path | None:
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
        faiss.omp_set_num_threads(cfg.run.threads)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    started = time.perf_counter()
    backbone, manifest = load_backbone(backbone_dir)
    backbone.to(env.device).eval()
    transform = build_eval_transform(cfg.data.image_size, *input_normalization(manifest))
    with D.main_process_first():  # a synthetic dataset is generated once
        datasets = load_splits(cfg.data, transform)
    cache_dir = cache_location(cfg.features.cache, cfg.features.cache_dir, out_dir)
    torch.manual_seed(cfg.run.seed)
    ctx = EvalContext(
        cfg,
        backbone,
        manifest,
        env.device,
        datasets,
        cache_dir,
        task=task,
        work_root=out_dir / WORK_DIR,
    )
    output = get_task(task).run_function()(ctx)
    if not env.is_main:
        return None
    train = datasets["train"]
    resumed = ctx.resume is not None and ctx.resume.from_step is not None
    output = dataclasses.replace(
        output,
        protocol=ctx.protocol(output.protocol),
        dataset=DatasetInfo(
            train.name,
            train.num_classes,
            {**{s: len(ds) for s, ds in datasets.items()}, **output.splits},
            train.describe(),
        ),
        details={
            **output.details,
            "feature_cache": ctx.cache_use,
            "backbone_dir": str(backbone_dir),
            **({"resumed_from_step": ctx.resume.from_step} if resumed else {}),
        },
    )
    record = build_record(
        task,
        output,
        manifest,
        seed=cfg.run.seed,
        started=started,
        device=D.device_name(env.device, env.world_size),
        world_size=env.world_size,
        cuda=env.device.type == "cuda",
    )
    path = write_record(out_dir, record)
    if ctx.resume is not None:  # recorded: nothing left to resume
        shutil.rmtree(ctx.resume.path.parent, ignore_errors=True)
    return path
