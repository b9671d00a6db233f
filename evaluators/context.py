"""What an evaluation task is handed: the config, the loaded backbone, the data, the cache.

An evaluation task is `run(ctx: EvalContext) -> sslbench.results.TaskOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from sslbench.data import SPLITS, LabeledDataset, build_dataset

from .features import Features, cached_features


@dataclass
class EvalContext:
    cfg: DictConfig
    backbone: nn.Module  # on `device`, eval mode
    manifest: dict
    device: torch.device
    datasets: dict[str, LabeledDataset]  # train / val / test with the evaluation transform
    cache_dir: Path | None
    cache_use: dict[str, str] = field(default_factory=dict)  # split -> "hit" | "miss"

    @property
    def num_classes(self) -> int:
        return self.datasets["train"].num_classes

    def features(self, split: str) -> Features:
        """The backbone's features on a split, from the cache when it holds them."""
        dataset = self.datasets[split]
        feats = cached_features(self.backbone, self.manifest["weights_sha256"], dataset,
                                cache_dir=self.cache_dir, batch_size=self.cfg.features.batch_size,
                                device=self.device, num_workers=self.cfg.data.num_workers,
                                progress=self.cfg.run.progress)
        self.cache_use[split] = "hit" if feats.from_cache else "miss"
        return feats


def load_splits(data_cfg: DictConfig, transform: Callable) -> dict[str, LabeledDataset]:
    return {split: build_dataset(data_cfg.name, data_cfg.root, split, transform,
                                 **(data_cfg.options or {})) for split in SPLITS}
