"""The leaderboard: grouping, seed aggregation and ranks; never averaging across protocols; the
Markdown / CSV / HTML / PNG outputs; escaping of user strings; malformed records skipped; the
HTML page sorted by real headless Chromium."""

import csv
import html.parser
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, sslbench

from leaderboard.aggregate import build_board, collect, fractional_ranks, load_reference
from sslbench.cli import main
from sslbench.results import BackboneIdentity, DatasetInfo, ResultRecord, write_record

DATA = {"dataset": {"name": "synthetic-shapes"}, "image_size": 32}
LINEAR_A = {"data": DATA, "probe": {"name": "fast", "epochs": 100}}
LINEAR_B = {"data": DATA, "probe": {"name": "standard", "epochs": 90}}
KNN = {"data": DATA, "knn": {"k": [20]}}
# Breaks out of text, of an attribute, and (with '$') matplotlib's math mode if left unescaped.
EVIL = "<script>document.title='pwned'</script>\"'><u>$\\bad$"


def record(
    method: str,
    run: str | None,
    task: str,
    protocol: dict,
    seed: int,
    top1: float,
    weights: str = "ab",
    **metrics: float,
) -> ResultRecord:
    return ResultRecord(
        task=task,
        metrics={"top1": top1, **metrics},
        backbone=BackboneIdentity(weights * 32, method, run, "resnet18"),
        protocol=protocol,
        dataset=DatasetInfo("synthetic-shapes", 8, {"train": 512, "val": 64, "test": 192}, {}),
        seed=seed,
        wall_time_s=1.0,
        peak_memory_mb={"cpu_rss": 100.0},
        device="cpu",
        versions={
            "python": "3.11",
            "torch": "2",
            "torchvision": "0",
            "faiss": None,
            "sslbench": "0.1.0",
        },
    )


def measured() -> list[ResultRecord]:
    """simsiam: linear A 60/62/64 over three seeds, linear B 50, knn 55; byol: linear A 63/65
    (seed 1 from a second pretraining run), linear B 52, knn 50; EVIL: linear A 10."""
    return [
        *(
            record("simsiam", "simsiam_r18", "linear", LINEAR_A, s, v)
            for s, v in enumerate([60.0, 62.0, 64.0])
        ),
        record("simsiam", "simsiam_r18", "linear", LINEAR_B, 0, 50.0),
        record("simsiam", "simsiam_r18", "knn", KNN, 0, 55.0),
        record("byol", "byol_r18", "linear", LINEAR_A, 0, 63.0, weights="cd"),
        record("byol", "byol_r18", "linear", LINEAR_A, 1, 65.0, weights="ce"),
        record("byol", "byol_r18", "linear", LINEAR_B, 0, 52.0, weights="cd"),
        record("byol", "byol_r18", "knn", KNN, 0, 50.0, weights="cd"),
        record(EVIL, "evil", "linear", LINEAR_A, 0, 10.0, weights="ef"),
    ]


@pytest.fixture
def results(tmp_path) -> Path:
    directory = tmp_path / "results"
    for r in measured():
        write_record(directory / r.backbone.run_name, r)  # nested: found recursively
    return directory


def key(task: str, protocol: dict) -> str:
    return f"{task}-{record('m', 'r', task, protocol, 0, 0.0).protocol_id}"


def test_fractional_ranks_share_ties():
    assert fractional_ranks({"a": 1.0, "b": 2.0, "c": 2.0, "d": 0.0}) == {
        "b": 1.5,
        "c": 1.5,
        "a": 3.0,
        "d": 4.0,
    }


def test_board_groups_aggregates_and_ranks():
    board = build_board(measured())
    assert [c.key for c in board.columns] == [
        key("knn", KNN),
        key("linear", LINEAR_A),
        key("linear", LINEAR_B),
    ]
    assert [r.key.run for r in board.rows] == ["byol_r18", "simsiam_r18", "evil"]
    byol, simsiam, evil = board.rows
    a, b, k = key("linear", LINEAR_A), key("linear", LINEAR_B), key("knn", KNN)
    cell = simsiam.cells[a]
    assert (cell.mean, cell.std, cell.n, cell.rank) == (62.0, 2.0, 3, 2.0)
    # Two pretraining runs of one recipe are one row; protocols A and B are never averaged.
    assert (byol.cells[a].mean, byol.cells[a].n, byol.cells[b].mean) == (64.0, 2, 52.0)
    assert simsiam.cells[b].n == 1 and simsiam.cells[b].std is None
    assert [byol.cells[c].rank for c in (k, a, b)] == [2.0, 1.0, 1.0]
    assert byol.average_rank == pytest.approx(4 / 3)
    assert simsiam.average_rank == pytest.approx(5 / 3)
    assert set(evil.cells) == {a} and evil.cells[a].rank == 3.0  # one column: listed last
    assert board.settings_that_differ(board.columns[1]) == {
        "probe.epochs": "100",
        "probe.name": '"fast"',
    }


def test_cli_writes_markdown_csv_html_and_charts(results, tmp_path):
    proc = sslbench("leaderboard", str(results), "--out", str(tmp_path / "board"), cwd=ROOT)
    out = tmp_path / "board"
    assert "10 records, 3 runs x 3 columns" in proc.stdout and "warning" not in proc.stderr
    md = (out / "leaderboard.md").read_text()
    # the n=3 cell's t interval is 62 ± t(0.975, 2) * 2 / sqrt(3) = 62 ± 4.97; Welch's test
    # against the best row (byol: 63, 65) cannot tell them apart
    assert (
        "| simsiam_r18 | simsiam | resnet18 | 1.67 (3/3) | 55.00 (n=1, rank 1) | "
        "62.00 ± 2.00 (n=3, rank 2) [57.03, 66.97] ≈best | 50.00 (n=1, rank 2) |" in md
    )
    assert "| byol_r18 | byol | resnet18 | 1.33 (3/3) |" in md
    assert md.index("byol_r18") < md.index("simsiam_r18") < md.index("| evil |")
    rows = {r["run"]: r for r in csv.DictReader((out / "leaderboard.csv").read_text().splitlines())}
    a = f"linear:{key('linear', LINEAR_A).split('-')[1]}:top1"
    b = f"linear:{key('linear', LINEAR_B).split('-')[1]}:top1"
    s = rows["simsiam_r18"]
    assert (float(s[f"{a}:mean"]), float(s[f"{a}:std"]), s[f"{a}:n"], s[f"{a}:rank"]) == (
        62.0,
        2.0,
        "3",
        "2",
    )
    assert (float(s[f"{b}:mean"]), s[f"{b}:std"], s[f"{b}:n"]) == (50.0, "", "1")
    assert rows["evil"][f"{b}:mean"] == "" and rows["evil"]["columns"] == "1"
    assert float(rows["byol_r18"]["avg_rank"]) == pytest.approx(4 / 3)
    page = (out / "leaderboard.html").read_text()
    assert 'id="board"' in page and "62.00 ± 2.00" in page and "n=3, rank 2" in page
    assert page.count('src="data:image/png;base64,') == 2  # knn and linear, embedded
    for task in ("knn", "linear"):
        assert (out / f"leaderboard_{task}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_charts_draw_baselines_after_the_ranked_rows_even_when_only_baselines_exist():
    from leaderboard.plots import bar_figure

    floor = record("random-init", "random", "knn", KNN, 0, 12.0, weights="aa")
    ceiling = record("supervised", "sup", "knn", KNN, 0, 90.0, weights="bb")
    ssl = record("simsiam", "simsiam_r18", "knn", KNN, 0, 55.0)

    def ticks(records):
        axes = bar_figure(build_board(records, {"knn": "top1"}), "knn").axes[0]
        return [t.get_text() for t in axes.get_yticklabels()]

    assert ticks([floor]) == ["random (floor baseline)"]
    assert ticks([ceiling, ssl, floor]) == [
        "simsiam_r18 (simsiam)",
        "random (floor baseline)",
        "sup (ceiling baseline)",
    ]


def test_user_strings_are_escaped(results, tmp_path):
    assert main(["leaderboard", str(results)]) == 0
    page = (results / "leaderboard.html").read_text()
    assert page.count("<script>") == 1  # ours
    assert "document.title=&#x27;pwned&#x27;" in page
    assert "<u>" not in page and "'pwned'" not in page
    assert (
        'data-value="&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;'
        '&quot;&#x27;&gt;&lt;u&gt;$\\bad$"'
    ) in page
    md = (results / "leaderboard.md").read_text()
    assert "&lt;script&gt;" in md and "<script>" not in md


def test_malformed_and_duplicate_records_are_skipped_with_a_warning(results, capsys):
    (results / "truncated.json").write_text('{"task": "knn", ')
    bad = results / "bad" / "no-metrics.json"
    bad.parent.mkdir()
    bad.write_text(next(results.rglob("knn-*.json")).read_text().replace('"metrics"', '"metricz"'))
    copy = next(results.rglob("linear-*seed2.json"))
    (results / "backup").mkdir()
    shutil.copy(copy, results / "backup" / copy.name)
    assert main(["leaderboard", str(results)]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped malformed record {results / 'truncated.json'}: not valid JSON" in err
    assert f"{bad}: field 'metrics': missing" in err
    assert f"2 copies of {copy.name}" in err
    md = (results / "leaderboard.md").read_text()
    assert "62.00 ± 2.00 (n=3, rank 2)" in md  # the copy is not a fourth seed


def test_records_without_the_ranked_metric_are_skipped(tmp_path, capsys):
    write_record(tmp_path, record("simsiam", "a", "knn", KNN, 0, 50.0, top5=80.0))
    write_record(tmp_path, record("byol", "b", "knn", KNN, 0, 60.0, weights="cd"))
    records, warnings = collect(tmp_path, {"knn": "top5"})
    assert [r.backbone.method for r in records] == ["simsiam"]
    assert len(warnings) == 1 and "no metric 'top5' to rank knn by (it has top1)" in warnings[0]
    assert main(["leaderboard", str(tmp_path), "--metric", "knn=top5"]) == 0
    assert "80.00 (n=1, rank 1)" in (tmp_path / "leaderboard.md").read_text()
    assert main(["leaderboard", str(tmp_path), "--metric", "kmeans=top1"]) == 1
    assert "--metric 'kmeans=top1': expected TASK=NAME" in capsys.readouterr().err


def test_no_usable_record_is_an_error(tmp_path, capsys):
    (tmp_path / "only.json").write_text("[]")
    assert main(["leaderboard", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "only.json" in err and "no usable result records" in err
    assert not (tmp_path / "leaderboard.md").exists()


def test_reference_rows_are_shown_apart_and_never_ranked(results):
    reference = ROOT / "configs" / "reference" / "seed_papers.yaml"
    assert main(["leaderboard", str(results), "--reference", str(reference)]) == 0
    md = (results / "leaderboard.md").read_text()
    board, published = md.split("## Published numbers (not ranked)")
    assert "MoCo" not in board and "| MoCo | 67.4 | 67.6 | 70.0 |" in published
    assert "| UniGrad | – | – | 70.3 |" in published and "Table 5" in published
    assert "| simsiam_r18 | simsiam | resnet18 | 1.67 (3/3) |" in board  # ranks unchanged
    lines = (results / "leaderboard.csv").read_text().splitlines()
    runs = [r["run"] for r in csv.DictReader(lines)]
    assert runs == ["byol_r18", "simsiam_r18", "evil"]
    page = (results / "leaderboard.html").read_text()
    assert page.index('id="board"') < page.index("Published numbers") < page.index("SwAV")


def test_reference_file_errors_name_the_file_and_entry(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text(
        "tables:\n- {source: s, task: linear, protocol: p, arch: r50, "
        "columns: [a, b], rows: {MoCo: [1.0]}}\n"
    )
    with pytest.raises(ValueError, match=rf"{path}: tables\[0\]\.rows\.MoCo: expected 2 numbers"):
        load_reference(path)
    tables = load_reference(ROOT / "configs" / "reference" / "seed_papers.yaml")
    assert all(len(v) == len(t.columns) for t in tables for _, v in t.rows)


class _BoardRows(html.parser.HTMLParser):
    """The first cell's text of each #board body row, the title, and the header sort states."""

    def __init__(self):
        super().__init__()
        self.runs, self.sorts, self.title, self.scripts = [], {}, "", 0
        self._in = None
        self._board = self._body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.scripts += tag == "script"
        if tag == "table":
            self._board = attrs.get("id") == "board"
        elif tag == "tbody":
            self._body = self._board
        elif tag == "th" and self._board:
            self.sorts[attrs["data-key"]] = attrs["aria-sort"]
        elif tag == "tr" and self._body:
            self._in = "first-cell"
        elif tag == "title":
            self._in = "title"

    def handle_endtag(self, tag):
        if tag in ("td", "title"):
            self._in = None
        elif tag == "table":
            self._board = self._body = False

    def handle_data(self, data):
        if self._in == "first-cell":
            self.runs.append(data)
            self._in = None
        elif self._in == "title":
            self.title += data


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="headless Chromium not installed (Debian: apt-get install chromium)"
)
def test_html_page_is_sortable_in_headless_chromium(results, tmp_path):
    assert main(["leaderboard", str(results)]) == 0
    page = (results / "leaderboard.html").as_uri()

    def dom(fragment: str = "") -> _BoardRows:
        proc = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                page + fragment,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        parsed = _BoardRows()
        parsed.feed(proc.stdout)
        return parsed

    knn, linear_a = key("knn", KNN), key("linear", LINEAR_A)
    loaded = dom()
    assert loaded.runs == ["byol_r18", "simsiam_r18", "evil"]  # best average rank first
    assert loaded.title == "sslbench leaderboard" and loaded.scripts == 1  # EVIL stayed text
    assert loaded.sorts["avg_rank"] == "ascending"
    by_knn = dom(f"#sort=-{knn}")
    assert by_knn.runs == ["simsiam_r18", "byol_r18", "evil"]  # no knn number: last
    assert by_knn.sorts[knn] == "descending" and by_knn.sorts["avg_rank"] == "none"
    assert dom(f"#sort={linear_a}").runs == ["evil", "simsiam_r18", "byol_r18"]
    assert dom("#sort=run").runs == ["byol_r18", "evil", "simsiam_r18"]
