"""The pivot view of a loss-form comparison (configs/pipeline/unigrad_table*.yaml), UniGrad's
table laid out as the paper prints it: rows = methods, columns = the loss forms the runs trained
in (leaderboard/forms.py), one table per board column (task and protocol).

Published numbers are reference cells under each method, in the positions measured under the
same form only, so a paper's unified-form number never sits beside an `original` or `exact` run.
They come from another protocol and scale (the paper's: ImageNet, ResNet-50): the pattern across
forms can be compared, the values cannot. A board whose runs share one form has no pivot.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from sslbench.results import ResultRecord

from .aggregate import Board, Cell, Column, ReferenceTable, RowKey
from .forms import DERIVED, Form, form_of
from .render import _md

INTRO = (
    "Rows: methods; columns: the loss form each run trained in (original: the method's own "
    "recipe and loss; unigrad: UniGrad's unified gradient form under one shared setting, "
    "without and with momentum encoder). Cells: mean ± sample std over n records. "
    "'published' rows: the seed papers' numbers, under the same form only, from their own "
    "protocol and scale: compare the pattern across forms, not the values."
)
DERIVED_NOTE = "†: a unigrad form derived by sslbench (docs/methods.md), not given by the paper."


@dataclass(frozen=True)
class Pivot:
    column: Column
    forms: tuple[Form, ...]
    methods: tuple[str, ...]
    cells: dict[tuple[str, Form], tuple[Cell, ...]]  # measured: one per run of that position
    published: dict[tuple[str, Form], float]
    sources: tuple[str, ...]  # the reference tables placed, as cited


def build_pivots(
    board: Board, records: list[ResultRecord], reference: list[ReferenceTable]
) -> list[Pivot]:
    """One pivot per board column, or none when the board's runs share one loss form."""
    form_of_row = {RowKey.of(r): form_of(r.backbone.config) for r in records}
    rows = [row for row in board.rows if row.key in form_of_row]
    if len({form_of_row[row.key] for row in rows}) < 2:
        return []
    pivots = []
    for column in board.columns:
        cells: dict[tuple[str, Form], tuple[Cell, ...]] = {}
        for row in rows:
            if column.key in row.cells:
                position = (row.key.method, form_of_row[row.key])
                cells[position] = (*cells.get(position, ()), row.cells[column.key])
        if not cells:
            continue
        forms = tuple(sorted({form for _, form in cells}, key=lambda f: f.order))
        methods = tuple(sorted({method for method, _ in cells}))
        published, sources = _placed(column, cells, reference)
        pivots.append(Pivot(column, forms, methods, cells, published, sources))
    return pivots


def _placed(
    column: Column,
    measured: dict[tuple[str, Form], tuple[Cell, ...]],
    reference: list[ReferenceTable],
) -> tuple[dict[tuple[str, Form], float], tuple]:
    """The published numbers of `column`'s task at the positions (method, form) that hold a
    measured cell (the first table with a number there wins), and the tables they come from."""
    published, sources = {}, []
    for table in reference:
        if table.task != column.task or not table.forms:
            continue
        names = dict(table.methods)
        for label, values in table.rows:
            for form, value in zip(table.forms, values):
                position = (names.get(label), form)
                if position in measured and value is not None:
                    if position not in published and table.source not in sources:
                        sources.append(table.source)
                    published.setdefault(position, value)
    return published, tuple(sources)


def _measured(pivot: Pivot, method: str, form: Form) -> str:
    cells = pivot.cells.get((method, form), ())
    text = " / ".join(
        f"{c.mean:.2f}" + ("" if c.std is None else f" ± {c.std:.2f}") + f" (n={c.n})"
        for c in cells
    )
    mark = "†" if cells and form.loss_form == "unigrad" and method in DERIVED else ""
    return (text or "–") + mark


def _rows(pivot: Pivot) -> list[list[str]]:
    """[method, cell per form] lines, each method followed by its published line if any."""
    lines = []
    for method in pivot.methods:
        lines.append([method] + [_measured(pivot, method, f) for f in pivot.forms])
        if any((method, f) in pivot.published for f in pivot.forms):
            lines.append(
                [f"{method}, published"]
                + [
                    str(pivot.published[(method, f)]) if (method, f) in pivot.published else "–"
                    for f in pivot.forms
                ]
            )
    return lines


def pivot_markdown(pivots: list[Pivot]) -> str:
    """The pivots as a Markdown section ("" without pivots)."""
    if not pivots:
        return ""
    lines = ["", "## Loss forms", "", INTRO]
    for p in pivots:
        header = ["method"] + [f.label for f in p.forms]
        lines += [
            "",
            f"### {_md(p.column.label)} {_md(p.column.metric)}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in _rows(p)]
        if p.sources:
            lines += ["", "Published: " + "; ".join(_md(s) for s in p.sources) + "."]
    if any(m in DERIVED for p in pivots for m in p.methods):
        lines += ["", DERIVED_NOTE]
    return "\n".join(lines) + "\n"


def pivot_html(pivots: list[Pivot]) -> str:
    """The pivots as an HTML section ("" without pivots); every string escaped."""
    if not pivots:
        return ""
    e = html.escape
    parts = ["<h2>Loss forms</h2>", f"<p>{e(INTRO)}</p>"]
    for p in pivots:
        head = "".join(f"<th>{e(h)}</th>" for h in ["method"] + [f.label for f in p.forms])
        body = "\n".join(
            "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _rows(p)
        )
        parts.append(
            f"<h3>{e(p.column.label)} <span class=meta>{e(p.column.metric)}</span></h3>"
            f"\n<table class=pivot>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}"
            "\n</tbody>\n</table>"
        )
        if p.sources:
            parts.append("<p class=meta>Published: " + "; ".join(e(s) for s in p.sources) + ".</p>")
    if any(m in DERIVED for p in pivots for m in p.methods):
        parts.append(f"<p class=meta>{e(DERIVED_NOTE)}</p>")
    return "\n".join(parts)
