"""Resuming a killed segmentation run exactly, from mmengine checkpoints in its own work directory.

mmengine's Runner resumes weights, optimizer, schedulers, message hub and iteration from a
checkpoint, and its loop replays the data loader past the batches already trained (the data
draws come out as they did: the same seeds, the same batches). What it leaves out is added by
`ExactResume`: the main process's torch RNG (dropout), saved in every checkpoint and restored
before the first iteration after a resume, and a check that the checkpoint is this recipe's.

mmengine's checkpoints pickle mmengine objects (its HistoryBuffer holds bound methods), which
torch.load(weights_only=True) refuses, rightly for a file of unknown origin. They are unpickled
here only from the run's own work directory, written by this run's earlier process, through a
loader scheme that `latest_checkpoint` hands out for files it found there.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.runner import CheckpointLoader

from sslbench.checkpoint import require_same_recipe, restore_rng_state, rng_state

SCHEME = "sslbench-work-dir://"  # a checkpoint in the run's own work directory
_CHECKPOINT = re.compile(r"iter_(\d+)\.pth")  # mmengine's CheckpointHook names, by_epoch=False


@CheckpointLoader.register_scheme(prefixes=SCHEME)
def _load_own_checkpoint(filename: str, map_location=None) -> dict:
    # Full unpickling: the file is one this run wrote into its own work directory.
    return torch.load(filename[len(SCHEME) :], map_location=map_location, weights_only=False)


def latest_checkpoint(work_dir: Path) -> str | None:
    """The newest complete mmengine checkpoint in `work_dir` as Runner's load_from (with
    resume=True), or None. mmengine writes in place, so a kill while saving leaves a partial
    file (no zip directory yet) beside the complete one before it (two are kept)."""
    found = [
        (int(match[1]), path)
        for path in work_dir.glob("iter_*.pth")
        if (match := _CHECKPOINT.fullmatch(path.name)) and zipfile.is_zipfile(path)
    ]
    return SCHEME + str(max(found)[1]) if found else None


def remove_checkpoints(work_dir: Path) -> None:
    """Once the record is written nothing is left to resume: the checkpoints go."""
    for path in work_dir.glob("iter_*.pth"):
        if _CHECKPOINT.fullmatch(path.name):
            path.unlink()
    (work_dir / "last_checkpoint").unlink(missing_ok=True)


def _device() -> torch.device:
    """The GPU mmengine trains on once CUDA is in use (its current device), else the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ExactResume(Hook):
    """Stores the torch RNG states and the recipe's `key` in each checkpoint; after a resume,
    refuses another recipe's checkpoint and restores the RNG before the first iteration.
    Every process seeds alike (mmengine's diff_rank_seed is off), so the main one's state
    stands for all. `resumed_from` is the iteration a run continued from."""

    def __init__(self, key: str):
        self.key = key
        self.resumed_from: int | None = None
        self._rng: dict | None = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["sslbench"] = {"key": self.key, "rng": rng_state(_device())}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get("sslbench", {})
        require_same_recipe(
            runner.work_dir, saved.get("key"), self.key, "delete its iter_*.pth checkpoints"
        )
        self._rng = saved["rng"]
        self.resumed_from = int(checkpoint["meta"]["iter"])

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._rng is not None:  # after the loop replayed the data loader, before the model
            restore_rng_state(self._rng, _device())
            self._rng = None
