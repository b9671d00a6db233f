"""The command line every task shares: `sslbench {eval,transfer} TASK --backbone RUN_DIR --out
RESULTS_DIR [--config YAML] [key=value ...]`, one sub-command per registered task.

The stage that owns the command group (evaluators/cli.py, transfer/cli.py) supplies the epilog
and how a task runs; the arguments, the config loading and the printed summary are the same.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .tasks import Task, get_task, tasks_of

# (task, cfg, backbone_dir, out_dir) -> the written record's path, None off the main process
Execute = Callable[[Task, object, str, str], "Path | None"]


def configure(parser: argparse.ArgumentParser, command: str, epilog: str) -> None:
    parser.epilog = epilog
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task in tasks_of(command):
        p = sub.add_parser(
            task.name,
            help=task.summary.replace("%", "%%"),
            description=task.summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--backbone",
            required=True,
            metavar="RUN_DIR",
            help="run directory holding backbone.safetensors and backbone.json",
        )
        p.add_argument(
            "--out",
            required=True,
            metavar="RESULTS_DIR",
            help="directory the result record is written into",
        )
        p.add_argument(
            "--config",
            required=task.config_required,
            metavar="YAML",
            help=f"a {command} recipe from configs/{command}/"
            + ("" if task.config_required else " (default: the built-in one)"),
        )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted-key overrides applied after the recipe",
        )
        p.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )


def run(args: argparse.Namespace, execute: Execute) -> int:
    from omegaconf import OmegaConf

    from .results import read_record

    task = get_task(args.task)
    cfg = task.load_config([args.config] if args.config else [], args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    path = execute(task, cfg, args.backbone, args.out)
    if path is not None:
        record = read_record(path)
        shown = "  ".join(f"{k}={v:.2f}" for k, v in record.metrics.items())
        print(f"{task.name} [{record.protocol_id}] {shown}\nrecord: {path}")
    return 0
