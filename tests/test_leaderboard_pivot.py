"""The loss-form pivot of the leaderboard (leaderboard/pivot.py, leaderboard/forms.py): every
published column is tagged with the form and setting it was measured under, and a published
number sits only beside runs trained in the same form, never beside an `exact` run."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from helpers import ROOT, sslbench
from test_pipeline import _tiny_overlay

from leaderboard.aggregate import load_reference
from leaderboard.forms import DERIVED, LOSS_FORMS, Form
from pretrain.unified import LOSS_FORMS as METHOD_LOSS_FORMS
from pretrain.unified import UNIFIED_FORMS
from sslbench.cli import main
from sslbench.results import BackboneIdentity, DatasetInfo, ResultRecord, write_record

SEED_PAPERS = ROOT / "configs" / "reference" / "seed_papers.yaml"
PROTOCOL = {
    "data": {"dataset": {"name": "synthetic-shapes"}, "image_size": 16},
    "probe": {"name": "fast"},
}
UNIGRAD_ROW = {"original": 62.7, "w/o": 67.6, "w/": 70.0}  # SimCLR's row of UniGrad's table


def test_the_stages_agree_on_the_forms():
    assert LOSS_FORMS == METHOD_LOSS_FORMS
    assert {name for name, form in UNIFIED_FORMS.items() if form.derived} == DERIVED


def test_every_published_column_names_its_form_and_setting():
    tables = load_reference(SEED_PAPERS)
    for t in tables:
        assert len(t.forms) == len(t.settings) == len(t.columns), t.source
        assert all(f.loss_form != "exact" for f in t.forms)
    (unigrad,) = [t for t in tables if t.source.startswith("UniGrad")]
    assert unigrad.forms == (Form("original"), Form("unigrad", False), Form("unigrad", True))
    assert dict(unigrad.rows)["SimCLR"] == tuple(UNIGRAD_ROW.values())
    assert dict(unigrad.methods)["SimCLR"] == "simclr"


@pytest.mark.parametrize(
    "tags, message",
    [
        ({"loss_form": "exact", "setting": "s"}, r"tables\[0\]\.loss_form: 'exact'"),
        ({"loss_form": ["original", "unigrad"], "setting": "s"}, r"tables\[0\]\.momentum_encoder"),
        ({"loss_form": "original"}, r"tables\[0\]\.setting: expected a str"),
        (
            {"loss_form": "original", "setting": "s", "methods": {"Nope": "simclr"}},
            r"tables\[0\]\.methods",
        ),
    ],
)
def test_bad_form_tags_name_the_file_and_entry(tmp_path, tags, message):
    path = tmp_path / "ref.yaml"
    table = {
        "source": "s",
        "task": "linear",
        "protocol": "p",
        "arch": "r50",
        "columns": ["a", "b"],
        "rows": {"MoCo": [1.0, 2.0]},
        **tags,
    }
    path.write_text(yaml.safe_dump({"tables": [table]}))
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        load_reference(path)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record(method: str, loss_form: str, momentum: bool, seed: int, top1: float) -> ResultRecord:
    run = f"{method}.{loss_form}{'_mm' if momentum else ''}"
    config = {"method": {"name": method, "loss_form": loss_form, "momentum_encoder": momentum}}
    return ResultRecord(
        task="linear",
        metrics={"top1": top1},
        backbone=BackboneIdentity(
            sha256(f"{run}{seed}"), method, run, "resnet18", sha256(run), config
        ),
        protocol=PROTOCOL,
        dataset=DatasetInfo("synthetic-shapes", 8, {"test": 192}, {}),
        seed=seed,
        wall_time_s=1.0,
        peak_memory_mb={"cpu_rss": 1.0},
        device="cpu",
        versions={"python": "3", "torch": "2", "torchvision": "0", "faiss": None, "sslbench": "0"},
    )


def pivot_rows(markdown: str) -> dict[str, list[str]]:
    """The first pivot table of leaderboard.md: row name -> cells, and its header."""
    section = markdown.split("## Loss forms", 1)[1]
    lines = [line for line in section.split("### ", 1)[1].splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {"header": cells[0][1:], **{row[0]: row[1:] for row in cells[2:]}}


def test_published_numbers_sit_under_the_same_form_only(tmp_path):
    """simclr in all four forms (two seeds each), vicreg in two: UniGrad's SimCLR row lands
    under original and the two unigrad columns, nothing under exact; vicreg's unigrad cell is
    marked as a derived form."""
    runs = [
        ("simclr", "original", False),
        ("simclr", "exact", False),
        ("simclr", "unigrad", False),
        ("simclr", "unigrad", True),
        ("vicreg", "original", False),
        ("vicreg", "unigrad", True),
    ]
    for i, (method, form, momentum) in enumerate(runs):
        for seed in (0, 1):
            r = record(method, form, momentum, seed, 40.0 + i + seed)
            write_record(tmp_path / "results" / r.backbone.run_name, r)
    assert main(["leaderboard", str(tmp_path / "results"), "--reference", str(SEED_PAPERS)]) == 0
    rows = pivot_rows((tmp_path / "results" / "leaderboard.md").read_text())
    assert rows["header"] == [
        "original loss",
        "exact gradient",
        "unigrad, w/o momentum encoder",
        "unigrad, w/ momentum encoder",
    ]
    assert rows["simclr"] == [
        "40.50 ± 0.71 (n=2)",
        "41.50 ± 0.71 (n=2)",
        "42.50 ± 0.71 (n=2)",
        "43.50 ± 0.71 (n=2)",
    ]
    assert rows["simclr, published"] == [
        str(UNIGRAD_ROW["original"]),
        "–",
        str(UNIGRAD_ROW["w/o"]),
        str(UNIGRAD_ROW["w/"]),
    ]
    assert rows["vicreg"] == ["44.50 ± 0.71 (n=2)", "–", "–", "45.50 ± 0.71 (n=2)†"]
    assert rows["vicreg, published"] == ["68.6", "–", "–", "69.8"]
    page = (tmp_path / "results" / "leaderboard.html").read_text()
    assert page.index("Published numbers") < page.index("<h2>Loss forms</h2>")


def test_a_board_of_one_form_has_no_pivot(tmp_path):
    for seed in (0, 1):
        r = record("simclr", "original", False, seed, 50.0)
        write_record(tmp_path / r.backbone.run_name, r)
    assert main(["leaderboard", str(tmp_path), "--reference", str(SEED_PAPERS)]) == 0
    assert "## Loss forms" not in (tmp_path / "leaderboard.md").read_text()


@pytest.mark.integration
def test_quick_unigrad_table_builds_the_pivot_board(tmp_path, shapes_root):
    """The quick variant of configs/pipeline/unigrad_table.yaml (one seed, one epoch) on the
    tiny data: every method in its original form, the distinct unified forms with and without
    momentum encoder, the pivot with UniGrad's numbers under the same forms only."""
    pipeline = ROOT / "configs" / "pipeline" / "unigrad_table.yaml"
    overlay = _tiny_overlay(tmp_path / "tiny.yaml", shapes_root, pipeline)
    out = tmp_path / "out"
    sslbench(
        "run",
        str(pipeline),
        str(overlay),
        f"output_dir={out}",
        "seeds=[0]",
        "executor.workers=2",
        cwd=ROOT,
        timeout=3600,
    )
    board = (out / "leaderboard.md").read_text()
    section = board.split("## Loss forms", 1)[1]
    linear = pivot_rows("## Loss forms" + section[section.index("### linear") :])
    methods = ["barlow_twins", "byol", "mocov2", "mocov3", "simclr", "simsiam", "unigrad", "vicreg"]
    assert linear["header"] == [
        "original loss",
        "unigrad, w/o momentum encoder",
        "unigrad, w/ momentum encoder",
    ]
    shared = {"mocov2", "mocov3", "simsiam"}  # their unified forms run as simclr's and byol's
    assert [name for name in linear if name in methods] == methods
    for name in methods:
        measured = linear[name] if name not in shared else linear[name][:1]
        assert all(cell.startswith(tuple("0123456789")) and "(n=1)" in cell for cell in measured)
    assert all(linear[name][1:] == ["–", "–"] for name in shared)
    assert linear["simclr, published"] == ["62.7", "67.6", "70.0"]
    assert linear["mocov2, published"] == ["67.4", "–", "–"]  # the paper's MoCo row
    assert linear["unigrad, published"] == ["–", "–", "70.3"]
    assert "mocov3, published" not in linear
