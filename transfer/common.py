"""What every transfer task does the same way: where its run's files go, how its device is named."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig


def default_work_dir(task: str, run: DictConfig, manifest: dict, out_dir: Path) -> Path:
    """run.work_dir, else RESULTS_DIR/.work/<task>-<weights sha256 prefix>-seed<seed> (hidden, so
    the leaderboard's record scan skips it)."""
    if run.work_dir:
        return Path(run.work_dir)
    return out_dir / ".work" / f"{task}-{manifest['weights_sha256'][:12]}-seed{run.seed}"


def device_name(device: torch.device, world_size: int) -> str:
    """The result record's device: the GPU's name (or cpu), with the process count when > 1."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name if world_size == 1 else f"{name} x{world_size}"
