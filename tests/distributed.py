"""Helpers to compare a one-process step with a torchrun step (see tests/dist_step.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "dist_step.py"


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def run_step(out: Path, overrides: list[str], nproc: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(HARNESS), str(out), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HARNESS), str(out), *overrides]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out, weights_only=True)


def assert_same_step(tmp_path: Path, overrides: list[str], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """One process with the global batch and two processes with half each agree."""
    single = run_step(tmp_path / "one.pt", overrides, 1)
    double = run_step(tmp_path / "two.pt", overrides, 2)
    torch.testing.assert_close(double["loss"], single["loss"], rtol=rtol, atol=atol)
    assert single["state"].keys() == double["state"].keys()
    for key, value in single["state"].items():
        if key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(double["state"][key], value, rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"{k}: {m}")
