"""`sslbench transfer TASK --backbone RUN_DIR --config YAML --out RESULTS_DIR [key=value ...]`.

Each task is a package under transfer/ that provides `load_config(paths, overrides)` and
`transfer(cfg, backbone_dir, out_dir) -> record path | None`; adding a task is one entry in TASKS.
"""

from __future__ import annotations

import argparse
import importlib

TASKS = {
    "detection": ("transfer.detection", "object detection / instance segmentation (COCO, VOC, "
                  "synthetic-shapes): detectron2 (MoCo protocol) or torchvision backend"),
    "segmentation": ("transfer.segmentation", "semantic segmentation (VOC12aug, Cityscapes, "
                     "ADE20K, synthetic-shapes) with mmsegmentation: FCN / UPerNet heads"),
}

EPILOG = """Recipes live in configs/transfer/. Overrides use dotted keys, e.g. solver.max_iter=200
model.norm=BN backend=torchvision run.threads=1; an unknown key is an error naming the closest one.
The record goes to RESULTS_DIR/<task>-<sha256 prefix>-<protocol id>-seed<seed>.json; logs, weights
and predictions to run.work_dir (default RESULTS_DIR/.work/...).
Several processes: torchrun --nproc_per_node=N -m sslbench.cli transfer detection|segmentation ...
(detection's torchvision backend; segmentation on GPUs); the detectron2 backend starts its own
processes (detectron2.num_gpus=N)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, (_, help_text) in TASKS.items():
        p = sub.add_parser(task, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--backbone", required=True, metavar="RUN_DIR",
                       help="run directory holding backbone.safetensors and backbone.json")
        p.add_argument("--config", required=True, metavar="YAML",
                       help="a transfer recipe from configs/transfer/")
        p.add_argument("--out", required=True, metavar="RESULTS_DIR",
                       help="directory the result record is written into")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted-key overrides applied after the recipe")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    task = importlib.import_module(TASKS[args.task][0])
    cfg = task.load_config([args.config], args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    path = task.transfer(cfg, args.backbone, args.out)
    if path is not None:
        from sslbench.results import read_record

        record = read_record(path)
        shown = "  ".join(f"{k}={v:.2f}" for k, v in record.metrics.items())
        print(f"{args.task} [{record.protocol_id}] {shown}\nrecord: {path}")
    return 0
