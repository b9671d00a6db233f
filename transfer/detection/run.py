"""Run a detection recipe on a backbone with the recipe's backend and write its result record.

Both backends go through here, so their records are made the same way. The protocol holds what
changes the number: backend, data identity (not paths), model, input, the solver as it ran
(after linear scaling to the process count) and the test settings; the process count itself is
a detail, since the same global batch on more processes is the same protocol.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from omegaconf import DictConfig

from sslbench.artifact import read_manifest
from sslbench.config import to_dict
from sslbench.results import (
    DatasetInfo,
    TaskOutput,
    build_record,
    distribution_version,
    write_record,
)

from ..common import default_work_dir
from . import detectron2_backend, torchvision_backend
from .detectron2_resume import LAST_CHECKPOINT
from .outcome import Outcome
from .train import RESUME_FILE

BACKENDS = {"torchvision": torchvision_backend.run, "detectron2": detectron2_backend.run}


def transfer(cfg: DictConfig, backbone_dir: str | Path, out_dir: str | Path) -> Path | None:
    """Train and evaluate; returns the record's path (None on processes other than the main)."""
    started = time.perf_counter()
    backbone_dir, out_dir = Path(backbone_dir), Path(out_dir)
    manifest = read_manifest(backbone_dir)
    work_dir = default_work_dir("detection", cfg.run, manifest, out_dir)
    outcome = BACKENDS[cfg.backend](cfg, backbone_dir, work_dir)
    if outcome is None:
        return None
    output = TaskOutput(
        metrics=outcome.metrics,
        protocol=protocol(cfg, outcome),
        dataset=DatasetInfo(
            cfg.data.name,
            len(outcome.data.classes),
            {"train": outcome.train_images, "test": len(outcome.data.test.coco.imgs)},
            {
                "train": [s.describe() for s in outcome.data.train],
                "test": outcome.data.test.describe(),
            },
        ),
        details={**outcome.details, "backbone_dir": str(backbone_dir), "work_dir": str(work_dir)},
        versions={"pycocotools": distribution_version("pycocotools"), **outcome.versions},
    )
    record = build_record(
        "detection",
        output,
        manifest,
        seed=cfg.run.seed,
        started=started,
        device=outcome.device,
        world_size=outcome.schedule.world_size,
        cuda=outcome.cuda,
    )
    path = write_record(out_dir, record)
    (work_dir / RESUME_FILE).unlink(missing_ok=True)  # recorded: nothing left to resume
    # detectron2's checkpoints stay (the fine-tuned model), but no longer as a run to continue
    (work_dir / LAST_CHECKPOINT).unlink(missing_ok=True)
    return path


def protocol(cfg: DictConfig, outcome: Outcome) -> dict:
    data = {"name": cfg.data.name, **outcome.data.identity()}
    if cfg.data.name == "synthetic-shapes":
        data["options"] = to_dict(cfg.data.options)
    schedule = {k: v for k, v in dataclasses.asdict(outcome.schedule).items() if k != "world_size"}
    solver = {k: v for k, v in to_dict(cfg.solver).items() if k != "checkpoint_period"}
    return {
        "backend": cfg.backend,
        "backbone_arch": cfg.backbone.arch,
        "data": data,
        "model": to_dict(cfg.model),
        "input": to_dict(cfg.input),
        "solver": {**solver, "as_run": {**schedule, "steps": list(schedule["steps"])}},
        "test": to_dict(cfg.test),
    }
