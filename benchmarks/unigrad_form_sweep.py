"""Does each method's unigrad form learn at the CPU budget? The smoke tier's criterion, swept.

Issue 12 asks that every unified form, with and without the momentum encoder, beat its own random
init on the CPU data. This runs exactly the integration test's check (tests/method_checks.py
`pretrain_and_score`: the unigrad family's CPU recipe, 30 epochs of 512 synthetic-shapes images
at batch 64 = 240 steps, kNN top-1 on 1,600 paired test images against the same network at its
random init) for each representative form (the paper's equal rows run once: SimCLR stands for
MoCo, BYOL for SimSiam) × momentum encoder off/on × each SETTING (recipe overrides) × each seed.

Per run it prints a JSON line; at the end, per (setting, method, momentum), the seeds' z and the
pooled sign test over all seeds' images, z = Σ(b − c)/√Σ(b + c) (b: images only the trained
network gets right, c: only the random one). A rho=R override goes to the form's own EMA factor
of F (method.rho for UniGrad, method.unigrad.rho for BYOL) and is dropped for forms without one.

    python benchmarks/unigrad_form_sweep.py --setting paper= --seeds 0 1 2
    python benchmarks/unigrad_form_sweep.py --setting "scaled=rho=0.9 method.base_momentum=0.9"

Each run is 20 s (SimCLR) to 2 min (BYOL: an eigendecomposition of F per step) on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the smoke tier's own helpers: the same check, not a copy

REPRESENTATIVES = ("simclr", "byol", "barlow_twins", "vicreg", "unigrad")
RHO_KEY = {"unigrad": "method.rho", "byol": "method.unigrad.rho"}


def overrides_for(name: str, setting: list[str]) -> list[str]:
    """`setting` with rho=R mapped to `name`'s field (dropped for a form without F)."""
    out = []
    for item in setting:
        if item.startswith("rho="):
            if name in RHO_KEY:
                out.append(f"{RHO_KEY[name]}={item.removeprefix('rho=')}")
        else:
            out.append(item)
    return out


def one_run(job: tuple[str, str, bool, int, list[str], str]) -> dict:
    tag, name, momentum, seed, setting, data = job
    import torch

    torch.set_num_threads(1)
    from method_checks import UNIGRAD_RECIPE, pretrain_and_score

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        knn, diagnostics = pretrain_and_score(
            name,
            Path(data) / "shapes",
            Path(data) / "knn",
            Path(out),
            f"method.momentum_encoder={str(momentum).lower()}",
            f"run.seed={seed}",
            "train.progress=false",
            "data.num_workers=0",
            *overrides_for(name, setting),
            recipe=UNIGRAD_RECIPE,
        )
    record = {
        "setting": tag,
        "method": name,
        "momentum_encoder": momentum,
        "seed": seed,
        "knn_trained": knn.trained,
        "knn_random": knn.random,
        "b": knn.b,
        "c": knn.c,
        "z": knn.z,
        "l2_std_x_sqrt_d": diagnostics["l2_std_x_sqrt_d"],
        "m_o": diagnostics["m_o"],
    }
    print(json.dumps(record), flush=True)
    return record


def summary(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["setting"], r["method"], r["momentum_encoder"]), []).append(r)
    lines = ["| setting | method | mm | z per seed | pooled z | max m_o |", "|---" * 6 + "|"]
    for (tag, name, momentum), runs in groups.items():
        b, c = sum(r["b"] for r in runs), sum(r["c"] for r in runs)
        pooled = (b - c) / math.sqrt(max(b + c, 1))
        seeds = " ".join(f"{r['z']:.2f}" for r in sorted(runs, key=lambda r: r["seed"]))
        worst = max(r["m_o"] for r in runs)
        lines.append(
            f"| {tag} | {name} | {'w/' if momentum else 'w/o'} | {seeds} | {pooled:.2f} | "
            f"{worst:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting",
        action="append",
        required=True,
        help="TAG=OVERRIDES: a name and space-separated recipe overrides (rho=R for F's EMA "
        "factor); repeat for several settings",
    )
    parser.add_argument("--methods", nargs="+", default=list(REPRESENTATIVES))
    parser.add_argument("--momentum", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    args = parser.parse_args()

    from helpers import KNN_SHAPES, TINY_SHAPES

    from sslbench.data import prepare_synthetic_shapes

    settings = {}
    for spec in args.setting:
        tag, _, rest = spec.partition("=")
        settings[tag] = rest.split()
    with tempfile.TemporaryDirectory() as data:
        prepare_synthetic_shapes(Path(data) / "shapes", seed=0, progress=False, **TINY_SHAPES)
        prepare_synthetic_shapes(Path(data) / "knn", seed=0, progress=False, **KNN_SHAPES)
        jobs = [
            (tag, name, momentum == "on", seed, setting, data)
            for tag, setting in settings.items()
            for name in args.methods
            for momentum in args.momentum
            for seed in args.seeds
        ]
        with ProcessPoolExecutor(args.workers) as pool:
            records = list(pool.map(one_run, jobs))
    print(summary(records))


if __name__ == "__main__":
    main()
