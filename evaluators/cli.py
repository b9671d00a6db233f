"""`sslbench eval TASK --backbone RUN_DIR --out RESULTS_DIR [--config YAML] [key=value ...]`:
one sub-command per evaluation task in the task registry (evaluators/tasks.py)."""

from __future__ import annotations

import argparse

from sslbench import task_cli

EPILOG = """Without --config the task's built-in defaults are used: the small synthetic-shapes CPU
protocol (the same as configs/eval/knn.yaml, linear_fast.yaml, semisup_10pct.yaml). Overrides use
dotted keys, e.g. knn.k=[20,200]  probe.name=standard  run.threads=1
data.name=digits data.options=null (options are the synthetic-shapes generator's).
An unknown key is an error that names the closest valid key.

The record goes to RESULTS_DIR/<task>-<sha256 prefix>-<protocol id>-seed<seed>.json (atomically;
re-running the same evaluation replaces it). Features are cached under $SSLBENCH_CACHE, else
RESULTS_DIR/.feature_cache, so kNN and the fast linear probe extract them once.
Several processes: torchrun --nproc_per_node=N -m sslbench.cli eval knn ..."""


def configure(parser: argparse.ArgumentParser) -> None:
    task_cli.configure(parser, "eval", EPILOG)


def run(args: argparse.Namespace) -> int:
    from .run import evaluate

    return task_cli.run(
        args, lambda task, cfg, backbone, out: evaluate(task.name, cfg, backbone, out)
    )
