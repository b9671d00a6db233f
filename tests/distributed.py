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


def run_steps(out: Path, args: list[str], nproc: int) -> list[dict]:
    """dist_step.py's results, one per config (configs separated by "--next" in `args`)."""
    if nproc == 1:
        cmd = [sys.executable, str(HARNESS), str(out), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(HARNESS),
            str(out),
            *args,
        ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out, weights_only=True)


def one_and_two_processes(
    tmp_path: Path, configs: list[list[str]], *flags: str
) -> list[tuple[dict, dict]]:
    """(one-process result, two-process result) of each config, from one launch of each;
    `flags` (e.g. "--float64") apply to all configs."""
    args = list(flags)
    for i, config in enumerate(configs):
        args += (["--next"] if i else []) + config
    return list(
        zip(run_steps(tmp_path / "one.pt", args, 1), run_steps(tmp_path / "two.pt", args, 2))
    )


def assert_same_step(
    tmp_path: Path, overrides: list[str], rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """One process with the global batch and two processes with half each agree."""
    assert_steps_match(*one_and_two_processes(tmp_path, [overrides])[0], rtol=rtol, atol=atol)


def assert_steps_match(single: dict, double: dict, rtol: float, atol: float) -> None:
    torch.testing.assert_close(double["loss"], single["loss"], rtol=rtol, atol=atol)
    assert single["state"].keys() == double["state"].keys()
    for key, value in single["state"].items():
        if key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(
            double["state"][key], value, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )
