"""The leaderboard: result records grouped into rows and columns, seeds aggregated, rows ranked.

A row is one pretraining recipe, (method, architecture, run name), so re-running a recipe with
another seed adds to its row instead of making a new one; a backbone without a run name is its
own row, named by its weights' sha256. A column is one (task, protocol_id): numbers measured
under different protocols are never averaged, however alike they look. A cell aggregates the
column's ranked metric over every record of its row (evaluation seeds and pretrained backbones of
the run) as mean, sample standard deviation and n. Ranks are fractional (ties share the mean of
their positions) and a row's average rank is over the columns it has (Demšar, JMLR 2006).

Published numbers (configs/reference/) are kept apart as `ReferenceTable`s: they come from other
protocols and hardware, so they are shown beside the board and never ranked.
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from sslbench.results import ResultRecord, load_records
from sslbench.tasks import get_task, tasks


def ranked_metrics() -> dict[str, str]:
    """The metric each registered task is ranked by (its `Task.metric`), in registration order:
    test-set top-1 for classification, COCO box AP for detection, mIoU for segmentation."""
    registry = tasks()
    return {name: registry.get(name).metric for name in registry.in_order()}


@dataclass(frozen=True, order=True)
class RowKey:
    method: str
    arch: str
    run: str  # the run name, else the weights' sha256 prefix

    @classmethod
    def of(cls, record: ResultRecord) -> "RowKey":
        b = record.backbone
        return cls(b.method, b.arch, b.run_name or b.weights_sha256[:12])


@dataclass(frozen=True)
class Column:
    task: str
    protocol_id: str
    metric: str
    dataset: str
    protocol: dict[str, Any] = field(compare=False)
    label: str = field(compare=False, default="")  # short and unique on its board

    @property
    def key(self) -> str:
        """Stable across boards, safe in URLs and file names (task and protocol id only)."""
        return f"{self.task}-{self.protocol_id}"


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]
    rank: float

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation; None for a single value."""
        return statistics.stdev(self.values) if self.n > 1 else None


@dataclass(frozen=True)
class Row:
    key: RowKey
    cells: dict[str, Cell]  # by Column.key

    @property
    def average_rank(self) -> float:
        return statistics.fmean(c.rank for c in self.cells.values())


@dataclass(frozen=True)
class Board:
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]  # most columns first, then best average rank
    records: int

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(c.task for c in self.columns))

    def settings_that_differ(self, column: Column) -> dict[str, str]:
        """The protocol settings (dotted keys) in which `column` differs from its task's other
        columns: what a reader needs to tell two protocols of one task apart."""
        siblings = [_flatten(c.protocol) for c in self.columns if c.task == column.task]
        mine = _flatten(column.protocol)
        keys = sorted(set().union(*siblings))
        return {k: mine.get(k, "(unset)") for k in keys
                if len({s.get(k, "(unset)") for s in siblings}) > 1}


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, value in obj.items()
                for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(obj, sort_keys=True)}


def collect(directory: str | Path, metrics: dict[str, str] | None = None
            ) -> tuple[list[ResultRecord], list[str]]:
    """The usable records under `directory` and a warning for each file left out.

    Left out: a malformed record (the warning names the file and field), one without its task's
    ranked metric, and all but the newest copy of a record found several times (same weights,
    task, protocol and seed), which would otherwise be counted as several seeds.
    """
    metrics = metrics or ranked_metrics()
    records, errors = load_records(directory)
    warnings = [f"skipped malformed record {error}" for _, error in errors]
    usable = []
    for record in records:
        metric = metrics[record.task]
        if metric in record.metrics:
            usable.append(record)
        else:
            warnings.append(f"skipped {record.file_name}: no metric {metric!r} to rank "
                            f"{record.task} by (it has {', '.join(sorted(record.metrics))})")
    copies: dict[str, list[ResultRecord]] = {}
    for record in usable:
        copies.setdefault(record.file_name, []).append(record)
    kept = []
    for name, found in copies.items():
        kept.append(max(found, key=lambda r: _utc(r.created)))  # the first of equals
        if len(found) > 1:
            warnings.append(f"{len(found)} copies of {name} (same weights, task, protocol and "
                            "seed): counted once, the newest")
    return kept, warnings


def _utc(timestamp: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(timestamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def build_board(records: Iterable[ResultRecord], metrics: dict[str, str] | None = None) -> Board:
    """Group, aggregate and rank `records`, which must all have their task's metric (`collect`)."""
    metrics = metrics or ranked_metrics()
    order = list(metrics)
    records = list(records)
    columns: dict[str, Column] = {}
    values: dict[tuple[RowKey, str], list[float]] = {}
    for r in sorted(records, key=lambda r: (RowKey.of(r), r.task, r.protocol_id, r.seed)):
        column = Column(r.task, r.protocol_id, metrics[r.task], r.dataset.name, r.protocol)
        columns.setdefault(column.key, column)
        values.setdefault((RowKey.of(r), column.key), []).append(r.metrics[column.metric])
    ordered = _labelled(sorted(columns.values(),
                               key=lambda c: (order.index(c.task), c.dataset, c.protocol_id)))
    cells: dict[RowKey, dict[str, Cell]] = {}
    for column in ordered:
        means = {row: statistics.fmean(v) for (row, key), v in values.items() if key == column.key}
        higher_is_better = get_task(column.task).higher_is_better
        for row, rank in fractional_ranks(means, higher_is_better).items():
            cells.setdefault(row, {})[column.key] = Cell(tuple(values[row, column.key]), rank)
    rows = sorted((Row(key, c) for key, c in cells.items()),
                  key=lambda row: (-len(row.cells), row.average_rank, row.key))
    return Board(tuple(ordered), tuple(rows), len(records))


def _labelled(columns: list[Column]) -> list[Column]:
    """Label each column by its task, adding the dataset and the protocol id only where they are
    needed to tell the task's columns apart."""
    labelled = []
    for c in columns:
        same_task = [o for o in columns if o.task == c.task]
        parts = [c.task]
        if len({o.dataset for o in same_task}) > 1:
            parts.append(c.dataset)
        if sum(o.dataset == c.dataset for o in same_task) > 1:
            parts.append(f"[{c.protocol_id}]")
        labelled.append(replace(c, label=" ".join(parts)))
    return labelled


def fractional_ranks(scores: dict[Any, float], higher_is_better: bool = True
                     ) -> dict[Any, float]:
    """1 for the best score; tied scores share the mean of the positions they span."""
    sign = -1 if higher_is_better else 1
    order = sorted(scores, key=lambda k: sign * scores[k])
    ranks, start = {}, 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in order[start:end + 1]:
            ranks[k] = (start + end) / 2 + 1
        start = end + 1
    return ranks


@dataclass(frozen=True)
class ReferenceTable:
    """One published table, as published: rows of methods, columns of settings or metrics."""
    source: str  # the citation, down to the table
    task: str
    protocol: str
    arch: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[float | None, ...]], ...]


def load_reference(path: str | Path) -> list[ReferenceTable]:
    """Read a configs/reference/ YAML; a ValueError names the file and the bad entry."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read reference numbers ({err})") from None

    def check(ok: bool, where: str, problem: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {where}: {problem}")

    check(isinstance(doc, dict) and isinstance(doc.get("tables"), list), "tables",
          "expected a top-level list 'tables'")
    tables = []
    for i, t in enumerate(doc["tables"]):
        where = f"tables[{i}]"
        keys = ("source", "task", "protocol", "arch", "columns", "rows")
        check(isinstance(t, dict) and set(t) == set(keys), where,
              f"expected exactly the keys {keys}")
        for key in keys[:4]:
            check(isinstance(t[key], str) and bool(t[key]), f"{where}.{key}", "expected a string")
        check(t["task"] in tasks(), f"{where}.task",
              f"expected a registered task ({', '.join(tasks().names())})")
        check(isinstance(t["columns"], list) and bool(t["columns"])
              and all(isinstance(c, str) for c in t["columns"]), f"{where}.columns",
              "expected a list of strings")
        check(isinstance(t["rows"], dict) and bool(t["rows"]), f"{where}.rows",
              "expected a mapping of method to values")
        for name, row in t["rows"].items():
            check(isinstance(row, list) and len(row) == len(t["columns"])
                  and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                          for v in row), f"{where}.rows.{name}",
                  f"expected {len(t['columns'])} numbers (null where the source has none)")
        tables.append(ReferenceTable(
            t["source"], t["task"], t["protocol"], t["arch"], tuple(t["columns"]),
            tuple((str(name), tuple(None if v is None else float(v) for v in row))
                  for name, row in t["rows"].items())))
    return tables
