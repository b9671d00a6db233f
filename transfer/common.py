"""What every transfer task does the same way: where its run's files go."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sslbench.tasks import WORK_DIR


def default_work_dir(task: str, run: DictConfig, manifest: dict, out_dir: Path) -> Path:
    """run.work_dir, else RESULTS_DIR/.work/<task>-<weights sha256 prefix>-seed<seed> (hidden, so
    the leaderboard's record scan skips it)."""
    if run.work_dir:
        return Path(run.work_dir)
    return out_dir / WORK_DIR / f"{task}-{manifest['weights_sha256'][:12]}-seed{run.seed}"
