"""The leaderboard's bar charts: one PNG per task, a bar per (run, protocol) with its std as error
bar and n beside it.

Drawn on a bare `Figure` with the Agg canvas, not pyplot: no global state, no display needed.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from .aggregate import Board, Row


def _text(label: str, limit: int = 48) -> str:
    """Plain text for matplotlib, at most `limit` characters: a '$' would otherwise start math
    mode (and can fail to parse)."""
    if len(label) > limit:
        label = label[: limit - 1] + "…"
    return label.replace("$", r"\$")


def _row_label(row: Row) -> str:
    kind = f"{row.baseline} baseline" if row.baseline else row.key.method
    return f"{row.label} ({kind})"


def bar_chart(board: Board, task: str) -> bytes:
    """PNG bytes of `bar_figure`."""
    buffer = io.BytesIO()
    bar_figure(board, task).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def bar_figure(board: Board, task: str) -> Figure:
    """The task's columns as groups of horizontal bars, ranked rows in board order and
    then the baselines (a board may hold baselines only, e.g. a random-init smoke run)."""
    columns = [c for c in board.columns if c.task == task]
    rows = [r for r in board.rows + board.baselines if any(c.key in r.cells for c in columns)]
    height = 0.8 / len(columns)
    fig = Figure(
        figsize=(8, 1.4 + 0.35 * len(rows) * len(columns) + 0.2 * (len(columns) > 1)),
        layout="constrained",
    )
    ax = fig.subplots()
    for j, column in enumerate(columns):
        placed = [
            (i + (j - (len(columns) - 1) / 2) * height, row.cells[column.key])
            for i, row in enumerate(rows)
            if column.key in row.cells
        ]
        ys, cells = zip(*placed)
        ax.barh(
            ys,
            [c.mean for c in cells],
            height=height,
            capsize=3,
            xerr=[float("nan") if c.std is None else c.std for c in cells],  # none for n=1
            label=_text(f"{column.label} ({column.dataset})"),
        )
        for y, c in placed:
            ax.annotate(
                f"n={c.n}",
                (c.mean + (c.std or 0.0), y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    ax.set_yticks(range(len(rows)), [_text(_row_label(r)) for r in rows])
    ax.invert_yaxis()  # best first, as in the table
    ax.set_xlabel(_text(f"{columns[0].metric} (mean ± std over n records)"))
    ax.set_title(_text(task))
    ax.margins(x=0.15)
    if len(columns) > 1:
        fig.legend(fontsize=8, loc="outside lower center")
    return fig
