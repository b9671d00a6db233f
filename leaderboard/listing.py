"""`sslbench results RESULTS_DIR`: the records in a directory as a table."""

from __future__ import annotations

import argparse
import sys

from sslbench.results import ResultRecord, load_records

COLUMNS = ("task", "protocol", "dataset", "backbone", "method", "seed", "metrics")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory",
        metavar="RESULTS_DIR",
        help="directory of result records (searched recursively)",
    )
    parser.add_argument("--task", help="show only this task's records")


def row(record: ResultRecord) -> tuple[str, ...]:
    b = record.backbone
    metrics = "  ".join(f"{k}={v:.2f}" for k, v in sorted(record.metrics.items()))
    return (
        record.task,
        record.protocol_id,
        record.dataset.name,
        b.run_name or b.weights_sha256[:12],
        b.method,
        str(record.seed),
        metrics,
    )


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [COLUMNS, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    records, errors = load_records(args.directory)
    for _path, error in errors:
        print(f"skipped malformed record: {error}", file=sys.stderr)
    records = [r for r in records if args.task in (None, r.task)]
    if not records:
        which = f" for task {args.task}" if args.task else ""
        print(f"no result records in {args.directory}{which}")
        return 0
    print(format_table(sorted(row(r) for r in records)))
    return 0
