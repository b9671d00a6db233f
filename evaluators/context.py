"""What an evaluation task is handed: the config, the loaded backbone, the data, the cache, and
where its training may keep resume state.

An evaluation task is `run(ctx: EvalContext) -> sslbench.results.TaskOutput`. Under torchrun
only the main process's output is recorded; a task that scores what only the main process holds
(features, logits: see features.infer) returns None on the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from sslbench.data import SPLITS, LabeledDataset, build_dataset
from sslbench.results import protocol_id, record_stem

from .features import Features, cached_features, readout
from .training import Resume

RESUME_FILE = "resume.pt"


@dataclass
class EvalContext:
    cfg: DictConfig
    backbone: nn.Module  # on `device`, eval mode
    manifest: dict
    device: torch.device
    datasets: dict[str, LabeledDataset]  # train / val / test with the evaluation transform
    cache_dir: Path | None
    cache_use: dict[str, str] = field(default_factory=dict)  # split -> "hit" | "miss"
    task: str = ""  # the task's registered name
    work_root: Path | None = None  # RESULTS_DIR/.work; None: no resume state is kept
    resume: Resume | None = None  # what `resume_state` handed out

    @property
    def num_classes(self) -> int:
        return self.datasets["train"].num_classes

    def features(self, split: str) -> Features:
        """The backbone's features on a split, from the cache when it holds them; every process
        calls it, only the main one gets the features (see features.cached_features)."""
        dataset = self.datasets[split]
        feats = cached_features(
            self.backbone,
            self.manifest["weights_sha256"],
            dataset,
            cache_dir=self.cache_dir,
            batch_size=self.cfg.features.batch_size,
            device=self.device,
            num_workers=self.cfg.data.num_workers,
            progress=self.cfg.run.progress,
        )
        self.cache_use[split] = "hit" if feats.from_cache else "miss"
        return feats

    def all_features(self) -> list[Features]:
        """Features of train, val and test (on processes other than the main one: None)."""
        return [self.features(split) for split in SPLITS]

    def protocol(self, task_protocol: dict) -> dict:
        """The record's protocol: the data, the backbone's readout, then the task's own part."""
        return {
            "data": data_protocol(self.cfg.data.image_size, self.datasets),
            **readout(self.backbone),
            **task_protocol,
        }

    def resume_state(self, task_protocol: dict) -> Resume | None:
        """Where the task's training keeps its resume state (None with run.checkpoint_every=0):
        work_root/<the name of the record it will write>/, one per protocol, backbone and seed,
        so only the same evaluation continues from it."""
        every = self.cfg.run.checkpoint_every
        if every < 0:
            raise ValueError(f"run.checkpoint_every must be >= 0 (0: no checkpoints), got {every}")
        if self.work_root is None or every == 0:
            return None
        stem = record_stem(
            self.task,
            self.manifest["weights_sha256"],
            protocol_id(self.protocol(task_protocol)),
            self.cfg.run.seed,
        )
        self.resume = Resume(self.work_root / stem / RESUME_FILE, every)
        return self.resume


def data_protocol(image_size: int, datasets: dict) -> dict:
    """The data half of every protocol: which data (not where it lies), at which input size,
    and how much of it."""
    identity = {
        k: v for k, v in datasets["train"].describe().items() if k not in ("root", "split", "size")
    }
    return {
        "dataset": identity,
        "image_size": image_size,
        "sizes": {split: len(ds) for split, ds in datasets.items()},
    }


def load_splits(data_cfg: DictConfig, transform: Callable) -> dict[str, LabeledDataset]:
    return {
        split: build_dataset(
            data_cfg.name, data_cfg.root, split, transform, **(data_cfg.options or {})
        )
        for split in SPLITS
    }
