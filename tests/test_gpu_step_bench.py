"""benchmarks/gpu_step.py runs its CPU path and reports a ratio per method."""

import re
import subprocess
import sys

from helpers import ROOT, run_benchmark


def test_gpu_step_runs_on_cpu_with_tiny_settings():
    out = run_benchmark(
        "gpu_step.py",
        "--methods",
        "simclr,byol",
        "--batch",
        "2",
        "--size",
        "32",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    )
    rows = {
        m.group(1): (float(m.group(4)), float(m.group(5)))
        for m in re.finditer(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)$", out, re.M)
    }
    assert set(rows) == {"simclr", "byol"}, out
    assert all(ratio > 0 for ratio, _ in rows.values()), out
    assert rows["simclr"][1] == 0.9 and rows["byol"][1] == 0.85, out  # BYOL has a target


def test_gpu_step_refuses_an_unknown_method():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_step.py"),
            "--methods",
            "nope",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode != 0 and "nope_imagenet_r50.yaml" in proc.stderr
