"""`sslbench data shard IMAGEFOLDER OUT --shard-size N`: datasets in the form large runs read."""

from __future__ import annotations

import argparse

from .base import SPLITS

EPILOG = """examples:
  sslbench data shard /data/imagenet /data/imagenet-shards --shard-size 1000
  sslbench data shard /data/imagenet /data/imagenet-shards --shard-size 1000 --split train

OUT/<split>/ receives <split>-NNNNNN.tar (WebDataset: <key>.<ext> holds the image file's bytes,
unchanged; <key>.cls its label; <key>.path.txt its path in the folder; keys are the samples'
indices in the folder's sorted order) and index.json (classes, counts per class, every shard's
sample count and sha256). A shard appears under its name only once complete: running the same
command again after an interruption keeps the finished shards and writes the rest.
Read them with data.name=shards data.root=OUT (pretraining: data.options.streams and
data.options.shuffle_buffer say how they are shuffled; see README, "Data at scale")."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    shard = sub.add_parser(
        "shard",
        help="write an ImageFolder's splits as WebDataset tar shards",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shard.add_argument(
        "folder",
        metavar="IMAGEFOLDER",
        help="the dataset root: IMAGEFOLDER/<split>/<class>/<image files>",
    )
    shard.add_argument("out", metavar="OUT", help="where the shards go: OUT/<split>/")
    shard.add_argument(
        "--shard-size",
        type=int,
        required=True,
        metavar="N",
        help="samples per shard (the last one of a split may hold fewer)",
    )
    shard.add_argument(
        "--split",
        action="append",
        choices=SPLITS,
        dest="splits",
        help="a split to write (repeatable); default: every split IMAGEFOLDER has",
    )
    shard.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .shard_writer import write_shards

    for index in write_shards(
        args.folder, args.out, args.shard_size, args.splits, progress=not args.no_progress
    ):
        print(index)
    return 0
