"""What a detection backend hands back for the result record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Schedule
from .data import DetectionData


@dataclass(frozen=True)
class Outcome:
    metrics: dict[str, float]  # bbox_AP, bbox_AP50, ..., segm_AP, ... (percent)
    schedule: Schedule  # the solver as it ran (after linear scaling to the process count)
    data: DetectionData
    train_images: int  # images trained on (after dropping those without objects)
    device: str
    cuda: bool  # this process trained on a GPU: the record reports its CUDA peak memory
    details: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)  # beyond library_versions()
