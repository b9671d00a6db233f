"""The leaderboard: result records grouped into rows and columns, seeds aggregated, rows ranked.

A row is one pretraining recipe: (method, architecture, run name, recipe hash), so re-running a
recipe with another seed adds to its row, while two configs that share a run name (say, another
`method.loss_form`) are two rows, labelled by the config values in which they differ. An
imported backbone is keyed by its source file's sha256; a backbone with neither by its weights'.
A column is one (task, protocol_id): numbers measured under different protocols are never
averaged, however alike they look. A cell aggregates the column's ranked metric over every record
of its row (evaluation seeds and pretrained backbones of the run) as mean, sample standard
deviation, n and a 95% interval (leaderboard/stats.py). Ranks are fractional (ties share the mean
of their positions), a row's average rank is over the columns it has (Demšar, JMLR 2006), and
each cell says whether its row is statistically indistinguishable from the column's best.

Baseline rows (BASELINES: random-init, the floor; supervised, the ceiling) are not ranked: they
are shown apart, and every ranked cell says where it falls between its architecture's floor and
ceiling in that column (0 = floor, 1 = ceiling).

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

import numpy as np
import yaml

from sslbench.config import RECIPE_IGNORED_KEYS
from sslbench.results import HITS_KEY, ResultRecord, load_records, unpack_hits
from sslbench.tasks import get_task, tasks

from . import stats
from .forms import FORM_TAG_KEYS, Form, form_tags

# Baseline methods, not ranked: what a cell's position between floor (0) and ceiling (1) means.
BASELINES = {"random-init": "floor", "supervised": "ceiling"}


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
    recipe: str  # the recipe hash, else an imported source's sha256 (prefixes), else ""

    @classmethod
    def of(cls, record: ResultRecord) -> RowKey:
        b = record.backbone
        source = (b.source or {}).get("sha256")
        identity = b.config_hash or source or ""  # "": a record from before schema 2
        return cls(b.method, b.arch, b.run_name or b.weights_sha256[:12], identity[:12])


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
    rank: float | None  # None in a baseline row
    interval: tuple[float, float] | None = None  # 95%; None: one run and no per-image scores
    interval_kind: str = ""  # "seeds" (t over n >= 2) | "bootstrap" (test images, n = 1) | ""
    tied_with_best: bool | None = None  # indistinguishable from the column's best; None: untested
    tied_with_floor: bool | None = None  # indistinguishable from random-init; None: untested
    position: float | None = None  # (mean - floor) / (ceiling - floor) in this column

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
    label: str = ""  # the run name, with the config values that tell it from a namesake row
    imported: dict[str, str] | None = None  # an imported backbone's source: format, file, sha256

    @property
    def baseline(self) -> str | None:
        """ "floor" or "ceiling" for a baseline row, else None."""
        return BASELINES.get(self.key.method)

    @property
    def average_rank(self) -> float | None:
        ranks = [c.rank for c in self.cells.values() if c.rank is not None]
        return statistics.fmean(ranks) if ranks else None


@dataclass(frozen=True)
class Board:
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]  # ranked rows: most columns first, then best average rank
    records: int
    baselines: tuple[Row, ...] = ()  # floor and ceiling rows, not ranked

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(c.task for c in self.columns))

    def settings_that_differ(self, column: Column) -> dict[str, str]:
        """The protocol settings (dotted keys) in which `column` differs from its task's other
        columns: what a reader needs to tell two protocols of one task apart."""
        siblings = [_flatten(c.protocol) for c in self.columns if c.task == column.task]
        mine = _flatten(column.protocol)
        keys = sorted(set().union(*siblings))
        return {
            k: mine.get(k, "(unset)")
            for k in keys
            if len({s.get(k, "(unset)") for s in siblings}) > 1
        }


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict) and obj:
        return {
            k: v
            for key, value in obj.items()
            for k, v in _flatten(value, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: json.dumps(obj, sort_keys=True)}


def collect(
    directory: str | Path, metrics: dict[str, str] | None = None
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
            warnings.append(
                f"skipped {record.file_name}: no metric {metric!r} to rank "
                f"{record.task} by (it has {', '.join(sorted(record.metrics))})"
            )
    copies: dict[str, list[ResultRecord]] = {}
    for record in usable:
        copies.setdefault(record.file_name, []).append(record)
    kept = []
    for name, found in copies.items():
        kept.append(max(found, key=lambda r: _utc(r.created)))  # the first of equals
        if len(found) > 1:
            warnings.append(
                f"{len(found)} copies of {name} (same weights, task, protocol and "
                "seed): counted once, the newest"
            )
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
    groups: dict[tuple[RowKey, str], list[ResultRecord]] = {}
    for r in sorted(records, key=lambda r: (RowKey.of(r), r.task, r.protocol_id, r.seed)):
        column = Column(r.task, r.protocol_id, metrics[r.task], r.dataset.name, r.protocol)
        columns.setdefault(column.key, column)
        groups.setdefault((RowKey.of(r), column.key), []).append(r)
    ordered = _labelled(
        sorted(columns.values(), key=lambda c: (order.index(c.task), c.dataset, c.protocol_id))
    )
    cells: dict[RowKey, dict[str, Cell]] = {}
    for column in ordered:
        found = {row: recs for (row, key), recs in groups.items() if key == column.key}
        for row, cell in _column_cells(column, found).items():
            cells.setdefault(row, {})[column.key] = cell
    first = {key: groups[next(k for k in groups if k[0] == key)][0] for key in cells}
    labels = _row_labels(first)
    rows = [Row(key, c, labels[key], first[key].backbone.source) for key, c in cells.items()]
    ranked = sorted(
        (r for r in rows if r.baseline is None),
        key=lambda row: (-len(row.cells), row.average_rank, row.key),
    )
    baselines = sorted(
        (r for r in rows if r.baseline is not None),
        key=lambda row: (list(BASELINES.values()).index(row.baseline), row.key),
    )
    return Board(tuple(ordered), tuple(ranked), len(records), tuple(baselines))


def _per_image(records: list[ResultRecord]) -> np.ndarray | None:
    """The row's per-image top-1 hits, (records, images), when every record kept its hits on
    one test set; else None."""
    hits = [unpack_hits(r.details[HITS_KEY]) for r in records if HITS_KEY in r.details]
    if not hits or len(hits) != len(records) or len({len(h) for h in hits}) != 1:
        return None
    return np.stack(hits).astype(np.float64)


def _column_cells(column: Column, found: dict[RowKey, list[ResultRecord]]) -> dict[RowKey, Cell]:
    """Every row's cell in `column`: values, interval, rank, the test against the best, and the
    position between the baselines."""
    values = {row: [r.metrics[column.metric] for r in recs] for row, recs in found.items()}
    per_image = {row: _per_image(recs) for row, recs in found.items()}
    means = {row: statistics.fmean(v) for row, v in values.items()}
    ranks = fractional_ranks(
        {row: m for row, m in means.items() if row.method not in BASELINES},
        get_task(column.task).higher_is_better,
    )
    best = min(ranks, key=lambda row: (ranks[row], row), default=None)
    baselines = {(row.arch, BASELINES[row.method]): row for row in means if row.method in BASELINES}
    cells = {}
    for row, vals in values.items():
        if len(vals) >= 2:
            interval, kind = stats.seed_interval(vals), "seeds"
        elif per_image[row] is not None:
            interval, kind = stats.bootstrap_interval(per_image[row][0]), "bootstrap"
        else:
            interval, kind = None, ""
        tied = at_floor = position = None
        floor, ceiling = baselines.get((row.arch, "floor")), baselines.get((row.arch, "ceiling"))
        if row in ranks:
            tied = (
                True
                if ranks[row] == ranks[best]
                else _indistinguishable(values[best], vals, per_image[best], per_image[row])
            )
            if floor is not None:
                at_floor = _indistinguishable(values[floor], vals, per_image[floor], per_image[row])
            if floor is not None and ceiling is not None and means[ceiling] != means[floor]:
                position = (means[row] - means[floor]) / (means[ceiling] - means[floor])
        cells[row] = Cell(tuple(vals), ranks.get(row), interval, kind, tied, at_floor, position)
    return cells


def _indistinguishable(
    best: list[float],
    other: list[float],
    best_images: np.ndarray | None,
    other_images: np.ndarray | None,
) -> bool | None:
    """Paired over test images where both rows kept them, else Welch over seeds (n >= 2 each),
    else None: no test is possible."""
    if (
        best_images is not None
        and other_images is not None
        and best_images.shape[1] == other_images.shape[1]
    ):
        return stats.indistinguishable_paired(best_images, other_images)
    if len(best) >= 2 and len(other) >= 2:
        return stats.indistinguishable_seeds(best, other)
    return None


def _row_labels(first: dict[RowKey, ResultRecord]) -> dict[RowKey, str]:
    """Each row's run name; where several rows share one, each gets the pretraining config values
    (dotted keys) in which they differ, e.g. `simclr [method.loss_form=exact]`."""
    labels = {}
    for key, record in first.items():
        namesakes = [
            k for k in first if (k.method, k.arch, k.run) == (key.method, key.arch, key.run)
        ]
        if len(namesakes) == 1:
            labels[key] = key.run
            continue
        configs = [_flatten(first[k].backbone.config) for k in namesakes]
        mine = _flatten(record.backbone.config)
        differ = [
            k
            for k in sorted(set().union(*configs))
            if k not in RECIPE_IGNORED_KEYS and len({c.get(k, "(unset)") for c in configs}) > 1
        ]
        shown = ", ".join(f"{k}={mine.get(k, '(unset)')}" for k in differ) or key.recipe or "?"
        labels[key] = f"{key.run} [{shown}]"
    return labels


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


def fractional_ranks(scores: dict[Any, float], higher_is_better: bool = True) -> dict[Any, float]:
    """1 for the best score; tied scores share the mean of the positions they span."""
    sign = -1 if higher_is_better else 1
    order = sorted(scores, key=lambda k: sign * scores[k])
    ranks, start = {}, 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in order[start : end + 1]:
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
    # leaderboard/forms.py's tags; empty for an untagged table, which is placed beside no run
    forms: tuple[Form, ...] = ()  # the loss form each column was measured under
    settings: tuple[str, ...] = ()  # and the setting (recipe) each column was measured under
    methods: tuple[tuple[str, str], ...] = ()  # row name -> method.name


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

    check(
        isinstance(doc, dict) and isinstance(doc.get("tables"), list),
        "tables",
        "expected a top-level list 'tables'",
    )
    tables = []
    for i, t in enumerate(doc["tables"]):
        where = f"tables[{i}]"
        keys = ("source", "task", "protocol", "arch", "columns", "rows")
        check(
            isinstance(t, dict) and set(keys) <= set(t) <= {*keys, *FORM_TAG_KEYS},
            where,
            f"expected the keys {keys} and optionally {FORM_TAG_KEYS}",
        )
        for key in keys[:4]:
            check(isinstance(t[key], str) and bool(t[key]), f"{where}.{key}", "expected a string")
        check(
            t["task"] in tasks(),
            f"{where}.task",
            f"expected a registered task ({', '.join(tasks().names())})",
        )
        check(
            isinstance(t["columns"], list)
            and bool(t["columns"])
            and all(isinstance(c, str) for c in t["columns"]),
            f"{where}.columns",
            "expected a list of strings",
        )
        check(
            isinstance(t["rows"], dict) and bool(t["rows"]),
            f"{where}.rows",
            "expected a mapping of method to values",
        )
        for name, row in t["rows"].items():
            check(
                isinstance(row, list)
                and len(row) == len(t["columns"])
                and all(
                    v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                    for v in row
                ),
                f"{where}.rows.{name}",
                f"expected {len(t['columns'])} numbers (null where the source has none)",
            )
        tags = form_tags(
            t,
            len(t["columns"]),
            lambda ok, key, problem, where=where: check(ok, f"{where}.{key}", problem),
        )
        tables.append(
            ReferenceTable(
                t["source"],
                t["task"],
                t["protocol"],
                t["arch"],
                tuple(t["columns"]),
                tuple(
                    (str(name), tuple(None if v is None else float(v) for v in row))
                    for name, row in t["rows"].items()
                ),
                *tags,
            )
        )
    return tables
