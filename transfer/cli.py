"""`sslbench transfer TASK --backbone RUN_DIR --config YAML --out RESULTS_DIR [key=value ...]`.

One sub-command per transfer task in the task registry (transfer/tasks.py): a task is a package
under transfer/ with a config loader and `transfer(cfg, backbone_dir, out_dir) -> record path`.
"""

from __future__ import annotations

import argparse

from sslbench import task_cli

EPILOG = """Recipes live in configs/transfer/. Overrides use dotted keys, e.g. solver.max_iter=200
model.norm=BN backend=torchvision run.threads=1; an unknown key is an error naming the closest one.
The record goes to RESULTS_DIR/<task>-<sha256 prefix>-<protocol id>-seed<seed>.json; logs, weights
and predictions to run.work_dir (default RESULTS_DIR/.work/...).
Several processes: torchrun --nproc_per_node=N -m sslbench.cli transfer detection|segmentation ...
(detection's torchvision backend; segmentation on GPUs); the detectron2 backend starts its own
processes (detectron2.num_gpus=N)."""


def configure(parser: argparse.ArgumentParser) -> None:
    task_cli.configure(parser, "transfer", EPILOG)


def run(args: argparse.Namespace) -> int:
    return task_cli.run(
        args, lambda task, cfg, backbone, out: task.run_function()(cfg, backbone, out)
    )
