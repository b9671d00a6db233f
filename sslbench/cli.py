"""The `sslbench` command line.

Each sub-command lives in the stage package that owns it and is imported only when used, so the
core never imports a stage and `sslbench --help` starts fast. A stage's CLI module provides
`configure(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = {
    "pretrain": ("pretrain.cli", "pretrain a backbone with an SSL method from a recipe YAML"),
    "eval": (
        "evaluators.cli",
        "evaluate a backbone: knn | linear | semisup; writes a result record",
    ),
    "results": ("leaderboard.listing", "list the result records in a directory as a table"),
    "leaderboard": (
        "leaderboard.cli",
        "aggregate result records into leaderboard.md / .csv / .html and bar charts",
    ),
    "transfer": (
        "transfer.cli",
        "transfer a backbone to a dense task (detection, segmentation); writes a result record",
    ),
    "export": ("transfer.export", "export a backbone to detectron2 (.pkl) or torchvision (.pth)"),
    "import": (
        "sslbench.importers.cli",
        "import another codebase's checkpoint (torchvision, "
        "timm, MoCo, DINO, solo-learn, ...) as a backbone artifact",
    ),
    "run": (
        "sslbench.pipeline.cli",
        "run a pipeline: pretraining recipes x evaluation/transfer "
        "tasks x seeds, then the leaderboard",
    ),
    "data": (
        "sslbench.data.cli",
        "prepare data for large runs: shard an ImageFolder into WebDataset tar files",
    ),
}

EPILOG = """examples:
  sslbench run configs/pipeline/default.yaml
  sslbench pretrain configs/pretrain/simsiam_synthetic_r18.yaml
  sslbench pretrain configs/pretrain/simsiam_synthetic_r18.yaml optim.base_lr=0.1 train.epochs=5
  torchrun --nproc_per_node=2 -m sslbench.cli pretrain configs/pretrain/simsiam_synthetic_r18.yaml
  sslbench eval knn --backbone runs/simsiam_synthetic_r18 --out results
  sslbench eval linear --config configs/eval/linear_standard.yaml \
      --backbone runs/simsiam_synthetic_r18 --out results
  sslbench results results
  sslbench leaderboard results --reference configs/reference/seed_papers.yaml
  sslbench transfer detection --backbone runs/simsiam_synthetic_r18 \
      --config configs/transfer/detection_synthetic_r18_fpn.yaml --out results
  sslbench export --to detectron2 --backbone runs/mocov2_imagenet_r50
  sslbench data shard /data/imagenet /data/imagenet-shards --shard-size 1000

Run `sslbench COMMAND --help` for a command's options."""

# Errors whose message is the whole story: print it, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    RuntimeError,
)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslbench",
        description="Pretrain and evaluate Siamese self-supervised methods under one protocol.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sslbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])  # prints help / version / the unknown-command error
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"sslbench {name}",
        description=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.configure(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sslbench {name}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
