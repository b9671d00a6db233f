"""`sslbench run PIPELINE.yaml [more.yaml ...] [key=value ...]`: every recipe x every task."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

EPILOG = """Later files and key=value overrides merge over earlier ones; an unknown key is an error
naming the closest valid one. Examples:
  sslbench run configs/pipeline/quick.yaml
  sslbench run configs/pipeline/default.yaml executor.workers=2 output_dir=runs/board
  sslbench run configs/pipeline/quick.yaml tasks.linear.overrides.probe.max_iter=100
  sslbench run configs/pipeline/imagenet_r50.yaml executor.name=submitit \\
      executor.submitit.partition=gpu

Jobs: pretrain/RECIPE/seedS -> TASK/RECIPE/seedS -> leaderboard, each an `sslbench` sub-command
run as a subprocess. Under output_dir: runs/seedS/RECIPE (backbones), results/seedS/RECIPE/TASK
(result records), logs/JOB.log, leaderboard.{md,csv,html} and leaderboard_TASK.png.
Re-running skips every job whose output exists under the same key (config file contents,
overrides, seed, inputs); a changed job reruns with its dependants, an interrupted pretraining
resumes. A failed job blocks only its dependants; the exit status is 1 if any job failed or was
blocked. A task whose `requires` modules do not import (e.g. mmseg for segmentation) is reported
unavailable, with the import error, and left out without failing the run. The first job runs
alone (executor.first_job_alone): it generates the data the others share. The leaderboard covers
every record under output_dir/results. One `sslbench run` at a time holds an output_dir: another
refuses, naming the lock (output_dir/.sslbench-run.lock) and the pid that holds it."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "items",
        nargs="+",
        metavar="PIPELINE.yaml|key=value",
        help="pipeline files (configs/pipeline/), then dotted-key overrides",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved pipeline config and exit"
    )


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import load_pipeline_config
    from .lock import output_dir_lock

    paths = [item for item in args.items if "=" not in item]
    if not paths:
        raise ValueError("give at least one pipeline file, e.g. configs/pipeline/quick.yaml")
    cfg = load_pipeline_config(paths, [item for item in args.items if "=" in item])
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if args.print_config:
        print(text)
        return 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_dir_lock(out):
        return _run(cfg, out, text)


def _run(cfg: DictConfig, out: Path, text: str) -> int:
    """The pipeline's jobs, run under the output directory's lock."""
    from ..io import write_text_atomic
    from .jobs import build_jobs
    from .runner import Scheduler, make_executor, summary

    resolved = out / "pipeline.yaml"
    if not resolved.is_file() or resolved.read_text(encoding="utf-8") != text:
        write_text_atomic(resolved, text)
    jobs = build_jobs(cfg, out)
    executor = make_executor(cfg.executor, out)
    # kNN and the fast probe of one backbone share its features, unless the user set a cache.
    env = {} if "SSLBENCH_CACHE" in os.environ else {"SSLBENCH_CACHE": str(out / ".feature_cache")}
    print(
        f"pipeline {cfg.name}: {len(cfg.pretrain.recipes)} recipe(s) x {len(cfg.tasks)} "
        f"task(s) x {len(cfg.seeds)} seed(s) = {len(jobs)} jobs; {cfg.executor.workers} "
        f"worker(s), {executor.describe()}; output {out}",
        flush=True,
    )
    started = time.perf_counter()
    outcomes = Scheduler(
        jobs,
        executor,
        cfg.executor.workers,
        env,
        echo=lambda line: print(line, flush=True),
        first_job_alone=cfg.executor.first_job_alone,
    ).run()
    print("\n" + summary(outcomes, time.perf_counter() - started), flush=True)
    board = out / "leaderboard.md"
    if board.is_file():
        print(f"leaderboard: {board} (.csv, .html)")
    unavailable = [o for o in outcomes if o.status == "unavailable"]
    if unavailable:
        print(
            f"sslbench run: {len(unavailable)} job(s) left out: a module they need does not "
            f"import here ({unavailable[0].message}); install the extra that provides it "
            f"(README) and run again: finished jobs are skipped",
            file=sys.stderr,
        )
    bad = [o for o in outcomes if o.status in ("failed", "blocked")]
    if bad:
        print(f"sslbench run: {len(bad)} job(s) failed or blocked", file=sys.stderr)
    return 1 if bad else 0
