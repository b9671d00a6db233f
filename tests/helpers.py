"""Shared test utilities: a tiny synthetic-shapes set, the real CLI as a subprocess, a plain kNN."""

from __future__ import annotations

import dataclasses
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
# The same set with a 1,600-image test split, for "beats random init" claims. Every image is drawn
# from its own seed, so the train split is byte-identical to TINY_SHAPES'; 192 test images are too
# few (measured: the random-init score moved from 0.257 on 1,600 images to 0.271 on 192, and
# trained-minus-random gaps of ±0.04 flipped sign between the two).
KNN_SHAPES = {**TINY_SHAPES, "test_per_class": 200}


def tiny_data_overrides(root: Path, shapes: dict = TINY_SHAPES) -> list[str]:
    """Overrides that point a recipe at a small cached synthetic-shapes set (TINY_SHAPES: 512
    train images)."""
    opts = ", ".join(f"{k}: {v}" for k, v in shapes.items())  # "k:v" would be one key
    return ["data.name=synthetic-shapes", f"data.root={root}", f"data.options={{{opts}}}",
            "data.image_size=16", "data.num_workers=0", "train.progress=false"]


def pretrain_simsiam(root: Path, shapes: dict, out: Path, epochs: int) -> Path:
    """A SimSiam backbone (the CPU recipe at batch 64) pretrained by the real CLI on `root`'s
    synthetic-shapes images; its run directory."""
    sslbench("pretrain", str(ROOT / "configs/pretrain/simsiam_synthetic_r18.yaml"),
             *tiny_data_overrides(root, shapes), f"train.epochs={epochs}", "optim.batch_size=64",
             f"run.output_dir={out}", "run.name=simsiam", cwd=out)
    return out / "simsiam"


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


def knn_correct(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Weighted cosine kNN (Wu et al. 2018), brute force in torch: is each test image right?"""
    bank, bank_y = F.normalize(train[0], dim=1), train[1]
    query, query_y = F.normalize(test[0], dim=1), test[1]
    sims, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(query), int(bank_y.max()) + 1)
    votes.scatter_add_(1, bank_y[idx], (sims / temperature).exp())
    return votes.argmax(1) == query_y


def knn_top1(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             k: int = 20, temperature: float = 0.07) -> float:
    return knn_correct(train, test, k, temperature).float().mean().item()


@dataclasses.dataclass(frozen=True)
class PairedKnn:
    """kNN top-1 of a trained backbone and of its random-init twin on the same test images, and
    the sign test between them: b images only the trained one gets right, c the reverse,
    z = (b − c)/√(b + c) (McNemar's statistic, normal approximation; > 2 ≈ one-sided p < 0.023)."""

    trained: float
    random: float
    b: int
    c: int

    @property
    def z(self) -> float:
        return (self.b - self.c) / max(self.b + self.c, 1) ** 0.5

    def __str__(self) -> str:
        return (f"kNN top-1 {self.trained:.3f} vs random init {self.random:.3f} "
                f"(only trained right {self.b}, only random right {self.c}, z {self.z:.2f})")


def paired_knn(trained: torch.nn.Module, random_init: torch.nn.Module, data_root: Path,
               image_size: int = 16) -> PairedKnn:
    """Score both backbones on KNN_SHAPES (bank: the train split; queries: its 1,600 test images)."""
    from sslbench.data import build_dataset
    from sslbench.transforms import build_eval_transform

    tf = build_eval_transform(image_size)
    train, test = (build_dataset("synthetic-shapes", data_root, split, tf, **KNN_SHAPES)
                   for split in ("train", "test"))
    right_t, right_r = (knn_correct(features(b, train), features(b, test)) for b in (trained, random_init))
    return PairedKnn(right_t.float().mean().item(), right_r.float().mean().item(),
                     int((right_t & ~right_r).sum()), int((~right_t & right_r).sum()))
