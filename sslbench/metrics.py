"""Training-curve logging: a CSV per stream, TensorBoard scalars, and a PNG of the curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .io import atomic_path


class MetricsLog:
    """Appends rows of scalars to `<run_dir>/<stream>.csv` and TensorBoard.

    On resume, rows logged after the resumed step (by the run that was killed) are dropped, so
    the curves never hold the same step twice.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)
            if resume_step is not None:
                for path in self.run_dir.glob("*.csv"):
                    self._truncate(path, resume_step)

    @staticmethod
    def _truncate(path: Path, last_step: int) -> None:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        keep = [r for r in rows if int(r["step"]) <= last_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(keep)

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.run_dir / f"{stream}.csv"
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        new = not path.exists()
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if set(header) != set(row):
                raise ValueError(
                    f"{path}: stream {stream!r} logged keys {sorted(row)} but the file has {header}"
                )
            fields = header
        else:
            fields = list(row)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow(row)
        for key, value in values.items():
            self._writer.add_scalar(f"{stream}/{key}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_curves(
    run_dir: str | Path, streams: tuple[str, ...], out_name: str = "curves.png"
) -> Path | None:
    """One panel per logged quantity of the given CSV streams; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series: list[tuple[str, list[float], list[float]]] = []
    for stream in streams:
        path = run_dir / f"{stream}.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        for key in rows[0]:
            if key != "step":
                series.append((f"{stream}/{key}", steps, [float(r[key]) for r in rows]))
    if not series:
        return None
    cols = min(3, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, (title, xs, ys) in zip(axes.flat, series):
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.tight_layout()
    out = run_dir / out_name
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
