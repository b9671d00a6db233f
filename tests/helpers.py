"""Shared test utilities: a tiny synthetic-shapes set, the real CLI as a subprocess, a plain kNN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# Silhouettes: with random colours a short CPU run learns nothing a kNN can see (synthetic.py).
TINY_SHAPES = {"train_per_class": 64, "val_per_class": 8, "test_per_class": 24, "image_size": 32,
               "style": "silhouette"}


def tiny_data_overrides(root: Path) -> list[str]:
    """Overrides that point a recipe at a small cached synthetic-shapes set (512 train images)."""
    opts = ", ".join(f"{k}: {v}" for k, v in TINY_SHAPES.items())  # "k:v" would be one key
    return ["data.name=synthetic-shapes", f"data.root={root}", f"data.options={{{opts}}}",
            "data.image_size=16", "data.num_workers=0", "train.progress=false"]


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def sslbench(*args: str, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `sslbench` command line."""
    cmd = [sys.executable, "-m", "sslbench.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def pretrain_killed_at(args: list[str], cwd: Path, checkpoint: Path, min_step: int,
                       timeout: float = 600) -> None:
    """Start `sslbench pretrain ARGS`, SIGKILL it once `checkpoint` holds step >= min_step."""
    cmd = [sys.executable, "-m", "sslbench.cli", "pretrain", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before it could be killed:"
                                     f"\n{proc.stderr.read()}")
            if checkpoint.exists():
                step = torch.load(checkpoint, weights_only=True)["step"]
                if step >= min_step:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
            time.sleep(0.05)
        raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@torch.inference_mode()
def features(backbone: torch.nn.Module, dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    feats, labels = zip(*((backbone(x), y) for x, y in loader))
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             k: int = 20, temperature: float = 0.07) -> float:
    """Weighted cosine kNN (Wu et al. 2018), brute force in torch."""
    bank, bank_y = F.normalize(train[0], dim=1), train[1]
    query, query_y = F.normalize(test[0], dim=1), test[1]
    sims, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(query), int(bank_y.max()) + 1)
    votes.scatter_add_(1, bank_y[idx], (sims / temperature).exp())
    return (votes.argmax(1) == query_y).float().mean().item()


def knn_of_backbone(backbone: torch.nn.Module, data_root: Path, image_size: int = 16) -> float:
    from sslbench.transforms import build_eval_transform
    from sslbench.data import build_dataset

    tf = build_eval_transform(image_size)
    opts = {k: v for k, v in TINY_SHAPES.items()}
    train = build_dataset("synthetic-shapes", data_root, "train", tf, **opts)
    test = build_dataset("synthetic-shapes", data_root, "test", tf, **opts)
    return knn_top1(features(backbone, train), features(backbone, test))
