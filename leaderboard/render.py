"""The leaderboard as text: Markdown, CSV, and one self-contained HTML page.

Every string that comes from a record or a reference file (method, run, arch, dataset, protocol,
source) is user input: it is escaped for the format it lands in, so a run named `<script>` shows
as text. The HTML page needs nothing outside itself: styles, the sorting script and the charts
(as data: URLs) are inline, and the script reads the table from the DOM, so it holds no data.
Sorting state lives in the URL fragment (`#sort=KEY`, `#sort=-KEY` for descending), so a sorted
view can be linked to and is applied on load.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json

from .aggregate import Board, Cell, Column, ReferenceTable, Row

INTRO = (
    "Each cell: mean ± sample std of the column's metric over n records (evaluation seeds "
    "and pretraining runs of the row's recipe) and the row's rank in the column. Rows are "
    "ordered by the number of columns they have, then by average rank over those columns. "
    "Numbers measured under different protocols are different columns, never averaged."
)
LEGEND = (
    "[lo, hi]: 95% interval: Student's t over the seeds where n ≥ 2; for a single run of a "
    "classification task, a percentile bootstrap over the test images (2,000 resamples); "
    "none where n=1 and the task keeps no per-image scores (detection, segmentation). "
    "≈best: statistically indistinguishable from the column's best row: a paired "
    "bootstrap over the same test images of the difference in per-image top-1, drawing each "
    "row's seeds too where it has several (its 95% interval holds 0) for classification, "
    "Welch's t-test over seeds (p ≥ 0.05) otherwise; "
    "no mark where neither test is possible. ≈floor: indistinguishable, by the same test, from "
    "the random-init row of its architecture. pos: where the cell falls between the "
    "baselines of its architecture, random-init (0) and supervised (1)."
)
BASELINE_INTRO = (
    "Baselines, not ranked: random-init (the same architecture, untrained: the "
    "floor) and supervised (the same backbone trained with labels under the SSL "
    "recipes' data, augmentation and step budget: the ceiling)."
)
REFERENCE_INTRO = (
    "Published numbers, as printed in the seed papers. They were measured under "
    "the papers' own protocols, so they are not ranked with the rows above."
)


def _mean_std(cell: Cell) -> str:
    return f"{cell.mean:.2f}" + ("" if cell.std is None else f" ± {cell.std:.2f}")


def _count_rank(cell: Cell) -> str:
    return f"n={cell.n}" + ("" if cell.rank is None else f", rank {cell.rank:g}")


def _uncertainty(cell: Cell) -> str:
    """The interval, the mark against the best and the position between the baselines."""
    parts = []
    if cell.interval is not None:
        parts.append(f"[{cell.interval[0]:.2f}, {cell.interval[1]:.2f}]")
    if cell.tied_with_best and cell.rank != 1:
        parts.append("≈best")
    if cell.tied_with_floor:
        parts.append("≈floor")
    if cell.position is not None:
        parts.append(f"pos {cell.position:.2f}")
    return " ".join(parts)


def _md_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    extra = _uncertainty(cell)
    return f"{_mean_std(cell)} ({_count_rank(cell)})" + (f" {extra}" if extra else "")


def _run(row: Row) -> str:
    """The row's name as shown (plain text, to be escaped by the caller): an imported backbone
    says so, with its source format and file."""
    if row.imported is None:
        return row.label
    return f"{row.label} (imported: {row.imported['format']}, {row.imported['file']})"


def _avg_rank(row: Row, board: Board) -> str:
    shown = "–" if row.average_rank is None else f"{row.average_rank:.2f}"
    return f"{shown} ({len(row.cells)}/{len(board.columns)})"


def _number(value: float | None) -> str:
    return "–" if value is None else str(value)


def _md(text: str) -> str:
    """Markdown text for a table cell: no HTML tag, no column break, one line. ('&' stays: an
    entity it may start shows a character, never a tag.)"""
    text = text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return " ".join(text.split())


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _settings(board: Board, column: Column) -> str:
    return ", ".join(f"{k}={v}" for k, v in board.settings_that_differ(column).items())


def _uniform_tag(table: ReferenceTable) -> str:
    """'Measured as: FORM; SETTING.' when every column shares them, else ''."""
    tags = set(zip(table.forms, table.settings))
    if len(tags) != 1:
        return ""
    ((form, setting),) = tags
    return f"Measured as: {form.label}; {setting}."


def _tagged_columns(table: ReferenceTable) -> list[str]:
    """Column names with the loss form and setting each was measured under, where they differ
    between columns (`_uniform_tag` states them once otherwise)."""
    if not table.forms or _uniform_tag(table):
        return list(table.columns)
    return [f"{c} [{f.label}; {s}]" for c, f, s in zip(table.columns, table.forms, table.settings)]


def markdown(board: Board, reference: list[ReferenceTable], source: str) -> str:
    lines = [
        "# Leaderboard",
        "",
        f"{board.records} result records from `{_md(source)}`, {len(board.rows)} pretraining "
        f"runs × {len(board.columns)} task protocols. {INTRO}",
        "",
        LEGEND,
        "",
    ]
    header = ["run", "method", "arch", "avg rank"] + [
        f"{_md(c.label)} {_md(c.metric)}" for c in board.columns
    ]

    def table(rows: tuple[Row, ...]) -> list[str]:
        return _md_table(
            header,
            [
                [_md(_run(r)), _md(r.key.method), _md(r.key.arch), _avg_rank(r, board)]
                + [_md_cell(r.cells.get(c.key)) for c in board.columns]
                for r in rows
            ],
        )

    lines += table(board.rows)
    if board.baselines:
        lines += ["", "## Baselines", "", BASELINE_INTRO, ""] + table(board.baselines)
    lines += ["", "## Columns", ""]
    lines += _md_table(
        ["column", "task", "dataset", "metric", "protocol id", "differs in"],
        [
            [
                _md(c.label),
                c.task,
                _md(c.dataset),
                _md(c.metric),
                c.protocol_id,
                _md(_settings(board, c)) or "–",
            ]
            for c in board.columns
        ],
    )
    if reference:
        lines += ["", "## Published numbers (not ranked)", "", REFERENCE_INTRO]
        for t in reference:
            caption = f"**{_md(t.source)}**. {_md(t.task)}, {_md(t.arch)}: {_md(t.protocol)}."
            lines += ["", " ".join([caption, _md(_uniform_tag(t))]).strip(), ""]
            lines += _md_table(
                ["method"] + [_md(c) for c in _tagged_columns(t)],
                [[_md(name)] + [_number(v) for v in values] for name, values in t.rows],
            )
    return "\n".join(lines) + "\n"


def csv_text(board: Board) -> str:
    """One line per row; four fields (mean, std, n, rank) per column, named TASK:PROTOCOL:METRIC.
    Empty fields: no record in that column (or no std for a single record)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [f"{c.task}:{c.protocol_id}:{c.metric}" for c in board.columns]
    stats = (
        "mean",
        "std",
        "n",
        "rank",
        "lo",
        "hi",
        "interval",
        "tied_with_best",
        "tied_with_floor",
        "position",
    )
    writer.writerow(
        [
            "run",
            "method",
            "arch",
            "recipe",
            "baseline",
            "imported_format",
            "imported_file",
            "avg_rank",
            "columns",
        ]
        + [f"{n}:{stat}" for n in names for stat in stats]
    )

    def blank(value) -> str:
        return "" if value is None else value

    for row in (*board.rows, *board.baselines):
        source = row.imported or {}
        fields = [
            row.label,
            row.key.method,
            row.key.arch,
            row.key.recipe,
            blank(row.baseline),
            source.get("format", ""),
            source.get("file", ""),
            blank(row.average_rank and repr(row.average_rank)),
            len(row.cells),
        ]
        for column in board.columns:
            cell = row.cells.get(column.key)
            if cell is None:
                fields += [""] * len(stats)
                continue
            lo, hi = cell.interval or (None, None)
            fields += [
                repr(cell.mean),
                blank(cell.std and repr(cell.std)),
                cell.n,
                "" if cell.rank is None else f"{cell.rank:g}",
                blank(lo and repr(lo)),
                blank(hi and repr(hi)),
                cell.interval_kind,
                blank(cell.tied_with_best),
                blank(cell.tied_with_floor),
                blank(cell.position and repr(cell.position)),
            ]
        writer.writerow(fields)
    return out.getvalue()


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 90em; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
th button { all: inherit; cursor: pointer; padding: 0; border: 0; }
th[aria-sort=ascending] button::after { content: " \\25B2"; }
th[aria-sort=descending] button::after { content: " \\25BC"; }
.meta { color: #666; font-size: 85%; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; }
img { max-width: 100%; }
"""

# Sorts every table.sortable by a clicked header, and #board by the #sort= fragment on load.
# Cells are compared by their data-value; a cell without one (no number) always sorts last.
SCRIPT = """
(function () {
  "use strict";
  function sortTable(table, key, descending) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var index = headers.findIndex(function (th) { return th.dataset.key === key; });
    if (index < 0) { return false; }
    var numeric = headers[index].dataset.type === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[index].dataset.value, y = b.cells[index].dataset.value;
      if (x === undefined || y === undefined) { return (x === undefined) - (y === undefined); }
      var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (th, i) {
      th.setAttribute("aria-sort", i !== index ? "none" : descending ? "descending" : "ascending");
    });
    return true;
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    table.tHead.addEventListener("click", function (event) {
      var th = event.target.closest("th");
      if (!th) { return; }
      var now = th.getAttribute("aria-sort");
      var descending = now === "none" ? th.dataset.first === "descending" : now === "ascending";
      sortTable(table, th.dataset.key, descending);
      if (table.id === "board") {
        history.replaceState(null, "", "#sort=" + (descending ? "-" : "") + th.dataset.key);
      }
    });
  });
  function fromFragment() {
    var match = /^#sort=(-?)(.+)$/.exec(location.hash);
    if (match) {
      sortTable(document.getElementById("board"), decodeURIComponent(match[2]), match[1] === "-");
    }
  }
  window.addEventListener("hashchange", fromFragment);
  fromFragment();
})();
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _th(key: str, label: str, kind: str, first: str, sort: str = "none") -> str:
    """A sortable header: `first` is the direction of its first click (best first)."""
    return (
        f'<th data-key="{_e(key)}" data-type="{kind}" data-first="{first}" '
        f'aria-sort="{sort}"><button type="button">{label}</button></th>'
    )


def _td(text: str, value: str | float | None = None, numeric: bool = False) -> str:
    data = "" if value is None else f' data-value="{_e(str(value))}"'
    return f"<td{data}{' class=num' if numeric else ''}>{text}</td>"


def _board_table(board: Board, rows: tuple[Row, ...], table_id: str) -> str:
    head = [
        _th("run", "run", "text", "ascending"),
        _th("method", "method", "text", "ascending"),
        _th("arch", "arch", "text", "ascending"),
        _th("avg_rank", "avg rank", "number", "ascending", sort="ascending"),
    ]
    head += [
        _th(
            c.key,
            f"{_e(c.label)}<br><span class=meta>{_e(c.metric)}</span>",
            "number",
            "descending",
        )
        for c in board.columns
    ]
    body = []
    for r in rows:
        rank = "–" if r.average_rank is None else f"{r.average_rank:.2f}"
        cells = [
            _td(_e(_run(r)), r.label),
            _td(_e(r.key.method), r.key.method),
            _td(_e(r.key.arch), r.key.arch),
            _td(
                f"{rank} <span class=meta>({len(r.cells)}/{len(board.columns)})</span>",
                None if r.average_rank is None else repr(r.average_rank),
                numeric=True,
            ),
        ]
        for c in board.columns:
            cell = r.cells.get(c.key)
            if cell is None:
                cells.append(_td("–"))
                continue
            extra = _uncertainty(cell)
            cells.append(
                _td(
                    f"{_mean_std(cell)}<br><span class=meta>{_count_rank(cell)}"
                    + (f"<br>{_e(extra)}" if extra else "")
                    + "</span>",
                    repr(cell.mean),
                    numeric=True,
                )
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="{table_id}" class="sortable">\n<thead><tr>'
        + "".join(head)
        + "</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>"
    )


def _columns_section(board: Board) -> str:
    items = []
    for c in board.columns:
        differs = _settings(board, c)
        items.append(
            f"<li><b>{_e(c.label)}</b>: task {_e(c.task)}, dataset {_e(c.dataset)}, metric "
            f"{_e(c.metric)}, protocol <code>{_e(c.protocol_id)}</code>"
            + (f"; differs in {_e(differs)}" if differs else "")
            + "<details><summary>protocol</summary><pre>"
            f"{_e(json.dumps(c.protocol, indent=2, sort_keys=True))}</pre></details></li>"
        )
    return "<h2>Columns</h2>\n<ul>\n" + "\n".join(items) + "\n</ul>"


def _reference_section(reference: list[ReferenceTable]) -> str:
    parts = ["<h2>Published numbers (not ranked)</h2>", f"<p>{_e(REFERENCE_INTRO)}</p>"]
    for t in reference:
        head = [_th("method", "method", "text", "ascending")] + [
            _th(f"c{i}", _e(c), "number", "descending") for i, c in enumerate(_tagged_columns(t))
        ]
        rows = [
            "<tr>"
            + _td(_e(name), name)
            + "".join(_td(_number(v), v, numeric=True) for v in values)
            + "</tr>"
            for name, values in t.rows
        ]
        parts.append(
            f"<p><b>{_e(t.source)}</b>. {_e(t.task)}, {_e(t.arch)}: {_e(t.protocol)}. "
            f"{_e(_uniform_tag(t))}</p>"
            '\n<table class="sortable">\n<thead><tr>'
            + "".join(head)
            + "</tr></thead>\n<tbody>\n"
            + "\n".join(rows)
            + "\n</tbody>\n</table>"
        )
    return "\n".join(parts)


def html_page(
    board: Board,
    reference: list[ReferenceTable],
    source: str,
    charts: dict[str, bytes],
    extra: str = "",
) -> str:
    """`charts`: PNG bytes by task, embedded as data: URLs; `extra`: a section (HTML) to end
    the page with, e.g. leaderboard/pivot.py's."""
    figures = "\n".join(
        f'<figure><img alt="{_e(task)} bar chart" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"></figure>'
        for task, png in charts.items()
    )
    body = [
        "<h1>Leaderboard</h1>",
        f"<p>{board.records} result records from <code>{_e(source)}</code>, "
        f"{len(board.rows)} pretraining runs × {len(board.columns)} task protocols. "
        f"{_e(INTRO)} Click a header to sort.</p>",
        f"<p class=meta>{_e(LEGEND)}</p>",
        _board_table(board, board.rows, "board"),
    ]
    if board.baselines:
        body += [
            "<h2>Baselines</h2>",
            f"<p>{_e(BASELINE_INTRO)}</p>",
            _board_table(board, board.baselines, "baselines"),
        ]
    body += [_columns_section(board), figures]
    if reference:
        body.append(_reference_section(reference))
    if extra:
        body.append(extra)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>sslbench leaderboard</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
