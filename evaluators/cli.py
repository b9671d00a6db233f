"""`sslbench eval {knn,linear,semisup} --backbone RUN_DIR --out RESULTS_DIR [--config YAML] [key=value ...]`."""

from __future__ import annotations

import argparse

EPILOG = """Without --config the task's built-in defaults are used: the small synthetic-shapes CPU
protocol (the same as configs/eval/knn.yaml, linear_fast.yaml, semisup_10pct.yaml). Overrides use
dotted keys, e.g. knn.k=[20,200]  probe.name=standard  run.threads=1
data.name=digits data.options=null (options are the synthetic-shapes generator's).
An unknown key is an error that names the closest valid key.

The record goes to RESULTS_DIR/<task>-<sha256 prefix>-<protocol id>-seed<seed>.json (atomically;
re-running the same evaluation replaces it). Features are cached under $SSLBENCH_CACHE, else
RESULTS_DIR/.feature_cache, so kNN and the fast linear probe extract them once.
Several processes: torchrun --nproc_per_node=N -m sslbench.cli eval knn ..."""

TASKS = {"knn": "weighted kNN on frozen features (faiss)",
         "linear": "linear probe: fast (cached features) or standard (frozen backbone, augmented)",
         "semisup": "fine-tune the whole network on 1% / 10% of the labels"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, help_text in TASKS.items():
        p = sub.add_parser(task, help=help_text.replace("%", "%%"), description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--backbone", required=True, metavar="RUN_DIR",
                       help="run directory holding backbone.safetensors and backbone.json")
        p.add_argument("--out", required=True, metavar="RESULTS_DIR",
                       help="directory the result record is written into")
        p.add_argument("--config", metavar="YAML", help="an eval recipe from configs/eval/")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted-key overrides applied after the recipe")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import load_eval_config

    cfg = load_eval_config(args.task, [args.config] if args.config else [], args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from .run import evaluate

    path = evaluate(args.task, cfg, args.backbone, args.out)
    if path is not None:
        from sslbench.results import read_record

        record = read_record(path)
        shown = "  ".join(f"{k}={v:.2f}" for k, v in record.metrics.items())
        print(f"{args.task} [{record.protocol_id}] {shown}\nrecord: {path}")
    return 0
