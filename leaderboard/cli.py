"""`sslbench leaderboard RESULTS_DIR`: every result record under a directory, as a leaderboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sslbench.io import atomic_path, write_text_atomic

from .aggregate import build_board, collect, load_reference, ranked_metrics

EPILOG = """Writes leaderboard.md, leaderboard.csv, leaderboard.html (self-contained, sortable; a
#sort=KEY or #sort=-KEY fragment sorts it on load) and leaderboard_TASK.png into --out.
Records are searched recursively; a malformed one is skipped with a warning naming it.
Rows are pretraining runs (method, arch, run name); columns are (task, protocol): records of
different protocols are never averaged. Each task is ranked by its registered metric: {metrics}.

examples:
  sslbench leaderboard results
  sslbench leaderboard results --reference configs/reference/seed_papers.yaml --out board
  sslbench leaderboard results --metric knn=top5"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG.format(
        metrics=", ".join(f"{task}={metric}" for task, metric in ranked_metrics().items())
    )
    parser.add_argument(
        "directory",
        metavar="RESULTS_DIR",
        help="directory of result records (searched recursively)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="where to write the board (default: RESULTS_DIR)"
    )
    parser.add_argument(
        "--reference",
        metavar="YAML",
        help="published numbers to show apart, unranked (configs/reference/)",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="TASK=NAME",
        help="rank TASK by metric NAME instead of its default (repeatable)",
    )


def _metrics(overrides: list[str]) -> dict[str, str]:
    metrics = ranked_metrics()
    for item in overrides:
        task, sep, name = item.partition("=")
        if not sep or task not in metrics or not name:
            raise ValueError(
                f"--metric {item!r}: expected TASK=NAME with TASK one of {', '.join(metrics)}"
            )
        metrics[task] = name
    return metrics


def run(args: argparse.Namespace) -> int:
    from .pivot import build_pivots, pivot_html, pivot_markdown
    from .plots import bar_chart
    from .render import csv_text, html_page, markdown

    metrics = _metrics(args.metric)
    records, warnings = collect(args.directory, metrics)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not records:
        raise ValueError(f"no usable result records under {args.directory}")
    reference = load_reference(args.reference) if args.reference else []
    board = build_board(records, metrics)
    out = Path(args.out or args.directory)
    charts = {task: bar_chart(board, task) for task in board.tasks()}
    written = []
    for task, png in charts.items():
        written.append(out / f"leaderboard_{task}.png")
        with atomic_path(written[-1]) as tmp:
            tmp.write_bytes(png)
    pivots = build_pivots(board, records, reference)  # [] unless the runs differ in loss form
    texts = {
        "leaderboard.md": markdown(board, reference, args.directory) + pivot_markdown(pivots),
        "leaderboard.csv": csv_text(board),
        "leaderboard.html": html_page(board, reference, args.directory, charts, pivot_html(pivots)),
    }
    for name, text in texts.items():
        written.append(out / name)
        write_text_atomic(written[-1], text)
    print(
        f"{board.records} records, {len(board.rows)} runs x {len(board.columns)} columns"
        + (f", {len(warnings)} warnings" if warnings else "")
    )
    print("\n".join(str(p) for p in written))
    return 0
