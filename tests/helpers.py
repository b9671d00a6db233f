"""Shared test utilities: a tiny synthetic-shapes set, the real CLI as a subprocess, a plain kNN."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# Silhouettes: with random colours a short CPU run learns nothing a kNN can see (synthetic.py).
TINY_SHAPES = {
    "train_per_class": 64,
    "val_per_class": 8,
    "test_per_class": 24,
    "image_size": 32,
    "style": "silhouette",
}
# The same set with a 1,600-image test split, for "beats random init" claims. Every image is drawn
# from its own seed, so the train split is byte-identical to TINY_SHAPES'; 192 test images are too
# few (measured: the random-init score moved from 0.257 on 1,600 images to 0.271 on 192, and
# trained-minus-random gaps of ±0.04 flipped sign between the two).
KNN_SHAPES = {**TINY_SHAPES, "test_per_class": 200}


def shapes_options(shapes: dict) -> str:
    """A synthetic-shapes generator's parameters as one `data.options={k: v, ...}` override
    (the space matters: "k:v" would be one key)."""
    return "data.options={" + ", ".join(f"{k}: {v}" for k, v in shapes.items()) + "}"


def eval_overrides(root: Path, shapes: dict = TINY_SHAPES) -> list[str]:
    """Overrides for an eval recipe: synthetic-shapes at `root` (generated on first use), read
    at 16 px, one thread."""
    return [
        f"data.root={root}",
        shapes_options(shapes),
        "data.image_size=16",
        "run.progress=false",
        "run.threads=1",
    ]


def tiny_data_overrides(root: Path, shapes: dict = TINY_SHAPES) -> list[str]:
    """Overrides that point a recipe at a small cached synthetic-shapes set (TINY_SHAPES: 512
    train images)."""
    return [
        "data.name=synthetic-shapes",
        f"data.root={root}",
        shapes_options(shapes),
        "data.image_size=16",
        "data.num_workers=0",
        "train.progress=false",
    ]


def pretrain_simsiam(root: Path, shapes: dict, out: Path, epochs: int) -> Path:
    """A SimSiam backbone (the CPU recipe at batch 64) pretrained by the real CLI on `root`'s
    synthetic-shapes images; its run directory."""
    sslbench(
        "pretrain",
        str(ROOT / "configs/pretrain/simsiam_synthetic_r18.yaml"),
        *tiny_data_overrides(root, shapes),
        f"train.epochs={epochs}",
        "optim.batch_size=64",
        f"run.output_dir={out}",
        "run.name=simsiam",
        cwd=out,
    )
    return out / "simsiam"


def random_init_artifact(run_dir: Path, arch: str = "resnet18", **arch_kwargs) -> Path:
    """An untrained backbone (initialised from seed 0) saved as an artifact in `run_dir`."""
    from sslbench.artifact import save_backbone
    from sslbench.backbones import build_backbone

    torch.manual_seed(0)
    save_backbone(
        run_dir,
        build_backbone(arch, **arch_kwargs),
        arch=arch,
        arch_kwargs=arch_kwargs,
        method="random-init",
        run_name=run_dir.name,
    )
    return run_dir


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def sslbench_command(nproc: int = 1) -> list[str]:
    """`sslbench` as one process, or under torchrun as `nproc` on this machine."""
    if nproc == 1:
        return [sys.executable, "-m", "sslbench.cli"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "sslbench.cli",
    ]


def sslbench(
    *args: str, cwd: Path, check: bool = True, timeout: float = 900, nproc: int = 1
) -> subprocess.CompletedProcess:
    """Run the real `sslbench` command line (under torchrun when nproc > 1)."""
    cmd = [*sslbench_command(nproc), *args]
    proc = subprocess.run(
        cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (torchrun's workers run in sessions of their own,
    out of reach of a signal to its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def sslbench_killed_when(
    args: list[str],
    cwd: Path,
    ready: Callable[[], bool],
    waiting_for: str,
    timeout: float = 600,
    nproc: int = 1,
) -> None:
    """Start `sslbench ARGS` (under torchrun when nproc > 1) and SIGKILL it and every process it
    started as soon as `ready()` holds (polled every 50 ms); `waiting_for` says what ready()
    waits for, for the error when it never comes."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [*sslbench_command(nproc), *args],
            cwd=cwd,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    stderr.seek(0)
                    raise AssertionError(
                        f"run ended (rc {proc.returncode}) before it could be "
                        f"killed:\n{stderr.read()}"
                    )
                if ready():
                    for pid in [proc.pid, *_descendants(proc.pid)]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:  # ended meanwhile
                            pass
                    proc.wait()
                    return
                time.sleep(0.05)
            raise AssertionError(f"no {waiting_for} within {timeout}s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def saved_step(checkpoint: Path) -> int:
    """The step of a resume checkpoint (plain tensors and containers); -1 while there is none.
    Memory-mapped: polling reads the step, not the weights."""
    if not checkpoint.exists():
        return -1
    return torch.load(checkpoint, weights_only=True, mmap=True)["step"]


def pretrain_killed_at(
    args: list[str], cwd: Path, checkpoint: Path, min_step: int, timeout: float = 600
) -> None:
    """Start `sslbench pretrain ARGS`, SIGKILL it once `checkpoint` holds step >= min_step."""
    sslbench_killed_when(
        ["pretrain", *args],
        cwd,
        lambda: saved_step(checkpoint) >= min_step,
        f"checkpoint at step >= {min_step}",
        timeout,
    )


@torch.inference_mode()
def features(
    backbone: torch.nn.Module, dataset, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    feats, labels = zip(*((backbone(x), y) for x, y in loader))
    return torch.cat(feats), torch.cat(labels)


def knn_correct(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Weighted cosine kNN (Wu et al. 2018), brute force in torch: is each test image right?"""
    bank, bank_y = F.normalize(train[0], dim=1), train[1]
    query, query_y = F.normalize(test[0], dim=1), test[1]
    sims, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(query), int(bank_y.max()) + 1)
    votes.scatter_add_(1, bank_y[idx], (sims / temperature).exp())
    return votes.argmax(1) == query_y


def knn_top1(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int = 20,
    temperature: float = 0.07,
) -> float:
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
        return (
            f"kNN top-1 {self.trained:.3f} vs random init {self.random:.3f} "
            f"(only trained right {self.b}, only random right {self.c}, z {self.z:.2f})"
        )


def paired_knn(
    trained: torch.nn.Module, random_init: torch.nn.Module, data_root: Path, image_size: int = 16
) -> PairedKnn:
    """Score both backbones on KNN_SHAPES (bank: the train split; queries: its 1,600 test
    images)."""
    from sslbench.data import build_dataset
    from sslbench.transforms import build_eval_transform

    tf = build_eval_transform(image_size)
    train, test = (
        build_dataset("synthetic-shapes", data_root, split, tf, **KNN_SHAPES)
        for split in ("train", "test")
    )
    right_t, right_r = (
        knn_correct(features(b, train), features(b, test)) for b in (trained, random_init)
    )
    return PairedKnn(
        right_t.float().mean().item(),
        right_r.float().mean().item(),
        int((right_t & ~right_r).sum()),
        int((~right_t & right_r).sum()),
    )


def run_benchmark(script: str, *args: str) -> str:
    """Run benchmarks/SCRIPT with `args` in a fresh interpreter; its stdout (a failure raises)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=600,
    ).stdout
