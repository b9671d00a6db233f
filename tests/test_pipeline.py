"""`sslbench run`: overrides as the sub-commands read them, job keys, every shipped pipeline
resolving to valid job configs, and (integration) the quick pipeline end to end from the CLI:
the board, a re-run that skips everything, one changed task rerun alone, a failing job
contained, and submitit's local executor."""

import csv
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY_SHAPES, sslbench
from omegaconf import OmegaConf

from sslbench.backbones import build_backbone
from sslbench.config import ConfigError
from sslbench.pipeline.config import load_pipeline_config
from sslbench.pipeline.jobs import (
    ForeignOutputError,
    Job,
    build_jobs,
    dotted,
    error_line,
    job_key,
    missing_modules,
    prepare,
)
from sslbench.pipeline.runner import Scheduler
from sslbench.tasks import get_task

PIPELINES = sorted((ROOT / "configs" / "pipeline").glob("*.yaml"))
UNIGRAD_TABLE = ROOT / "configs" / "pipeline" / "unigrad_table.yaml"
# Overlays (configs/pipeline/overlay/) are given after the pipeline they change.
OVERLAID = {
    "unigrad_table_mnist": [
        UNIGRAD_TABLE,
        ROOT / "configs/pipeline/overlay/unigrad_table_mnist.yaml",
    ]
}
SHIPPED = {**{p.stem: [p] for p in PIPELINES}, **OVERLAID}
QUICK = ROOT / "configs" / "pipeline" / "quick.yaml"
SYNTHETIC_RECIPES = sorted((ROOT / "configs" / "pretrain").glob("*_synthetic_r18.yaml"))


@pytest.fixture
def in_root(monkeypatch):
    """Pipelines name their configs relative to the project root, where they are run from."""
    monkeypatch.chdir(ROOT)


def test_overrides_reach_the_sub_commands_as_written():
    nested = {
        "train": {"epochs": 2},
        "data.options": {"style": "a b", "n": None},
        "knn": {"k": [10, 20]},
        "s": "1e-4",
        "t": "true",
        "empty": {},
        "e": "",
    }
    items = dotted(nested)
    assert "train.epochs=2" in items and 'data.options.style="a b"' in items
    # What the sub-commands' override parser makes of them: strings stay strings.
    assert OmegaConf.to_container(OmegaConf.from_dotlist(items)) == {
        "train": {"epochs": 2},
        "data": {"options": {"style": "a b", "n": None}},
        "knn": {"k": [10, 20]},
        "s": "1e-4",
        "t": "true",
        "empty": {},
        "e": "",
    }


def test_unknown_key_in_an_entry_names_the_closest(in_root):
    with pytest.raises(
        ConfigError, match=r"'tasks\.knn\.confg' \(did you mean 'tasks\.knn\.config'"
    ):
        load_pipeline_config([QUICK], ["tasks.knn.confg=configs/eval/knn.yaml"])
    with pytest.raises(ConfigError, match=r"did you mean 'executor\.workers'"):
        load_pipeline_config([QUICK], ["executor.worker=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("tasks.knn.command=evaluate knn", "expected 'eval TASK' or 'transfer TASK'"),
        ("tasks.knn.config=configs/eval/nope.yaml", "file not found"),
        ("pretrain.recipes.simclr.config=nope.yaml", "file not found"),
        ("tasks={'a b': {command: eval knn}}", "a name may hold"),
        ("executor.name=ray", "expected one of local, submitit"),
        ("seeds=[0,0]", "distinct seeds"),
        ("tasks.knn.seeds=[1]", "tasks.knn.seeds=[1]: expected some of the pipeline's seeds [0]"),
    ],
)
def test_pipeline_config_checks(in_root, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_pipeline_config([QUICK], [override])


def _job_config(argv: list[str]):
    """Load a job's config in process, with the loader its sub-command uses."""
    options = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    overrides = [a for a in argv if "=" in a and not a.startswith("--")]
    if argv[0] == "pretrain":
        from pretrain.config import load_pretrain_config

        return load_pretrain_config([argv[1]], overrides)
    paths = [options["--config"]] if "--config" in options else []
    return get_task(argv[1]).load_config(paths, overrides)


@pytest.mark.parametrize("files", SHIPPED.values(), ids=SHIPPED.keys())
def test_every_job_of_a_shipped_pipeline_has_a_valid_config(in_root, tmp_path, files):
    cfg = load_pipeline_config(files)
    jobs = build_jobs(cfg, tmp_path)
    runs = len(cfg.pretrain.recipes) * len(cfg.seeds)
    runs_of_tasks = sum(len(task.seeds or cfg.seeds) for task in cfg.tasks.values())
    assert len(jobs) == runs + len(cfg.pretrain.recipes) * runs_of_tasks + 1
    assert jobs[-1].id == "leaderboard"
    assert len({job.id for job in jobs}) == len(jobs)
    for job in jobs[:-1]:
        _job_config(job.argv)  # raises on an unknown key or a bad value


def test_the_mnist_overlay_moves_every_job_of_the_unigrad_table_to_mnist(in_root, tmp_path):
    """Each pretraining and task job reads mnist-subset; the recipes, forms and seeds are the
    table's."""
    table = build_jobs(load_pipeline_config([UNIGRAD_TABLE]), tmp_path / "a")
    mnist = build_jobs(load_pipeline_config(OVERLAID["unigrad_table_mnist"]), tmp_path / "b")
    assert [job.id for job in mnist] == [job.id for job in table]
    for job in mnist[:-1]:
        cfg = _job_config(job.argv)
        assert cfg.data.name == "mnist-subset", job.id
        assert not cfg.data.get("options"), job.id


def test_default_pipeline_runs_every_method_on_every_task(in_root):
    cfg = load_pipeline_config([ROOT / "configs" / "pipeline" / "default.yaml"])
    assert sorted(Path(r.config).name for r in cfg.pretrain.recipes.values()) == [
        p.name for p in SYNTHETIC_RECIPES
    ]
    assert {t.command for t in cfg.tasks.values()} == {
        "eval knn",
        "eval linear",
        "eval semisup",
        "transfer detection",
        "transfer segmentation",
    }


def test_a_job_is_keyed_by_config_contents_overrides_and_inputs(in_root, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(ROOT / "configs" / "pretrain" / "simclr_synthetic_r18.yaml", recipe)
    one = {
        "pretrain": {"recipes": {"r": {"config": str(recipe)}}},
        "tasks": {"knn": {"command": "eval knn"}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(one))

    def keys(*overrides: str, weights: str = "w1") -> tuple[str, str]:
        pre, knn, _ = build_jobs(
            load_pipeline_config([tmp_path / "p.yaml"], overrides), tmp_path / "out"
        )
        return job_key(pre, []), job_key(knn, [weights])

    pre, knn = keys()
    assert keys() == (pre, knn)
    assert keys(weights="w2")[1] != knn  # the same task on another backbone
    assert keys("tasks.knn.overrides.knn.k=[5]")[0] == pre
    assert keys("tasks.knn.overrides.knn.k=[5]")[1] != knn
    assert keys("seeds=[1]")[0] != pre
    assert keys("output_dir=elsewhere") == (pre, knn)  # where it is written is not what it is
    recipe.write_text(recipe.read_text() + "\n# an edit\n")
    assert keys()[0] != pre


def test_stale_output_is_removed_and_foreign_output_left_alone(in_root, tmp_path):
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump({"pretrain": {"recipes": {"r": {"config": str(SYNTHETIC_RECIPES[0])}}}})
    )
    (pre,) = build_jobs(load_pipeline_config([tmp_path / "p.yaml"]), tmp_path / "out")
    pre.out_dir.mkdir(parents=True)
    (pre.out_dir / "checkpoint.pt").write_bytes(b"someone else's")
    with pytest.raises(ForeignOutputError, match="did not write"):
        prepare(pre, "k1")
    (pre.out_dir / "checkpoint.pt").unlink()
    assert prepare(pre, "k1") is False  # empty: ours now
    (pre.out_dir / "checkpoint.pt").write_bytes(b"interrupted")
    assert prepare(pre, "k1") is True  # same key: resume
    assert prepare(pre, "k2") is False and not (pre.out_dir / "checkpoint.pt").exists()


def test_an_interrupted_task_keeps_its_work_directory_under_the_same_key(in_root, tmp_path):
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "pretrain": {"recipes": {"r": {"config": str(SYNTHETIC_RECIPES[0])}}},
                "tasks": {"knn": {"command": "eval knn", "config": "configs/eval/knn.yaml"}},
            }
        )
    )
    jobs = build_jobs(load_pipeline_config([tmp_path / "p.yaml"]), tmp_path / "out")
    (task,) = [j for j in jobs if j.kind == "task"]
    assert prepare(task, "k1") is False
    saved = task.out_dir / ".work" / "knn-abc-seed0" / "resume.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"interrupted")
    assert prepare(task, "k1") is True and saved.exists()  # same key: the task continues
    assert "--resume" not in task.command(True)  # ...by itself, from its work directory
    assert prepare(task, "k2") is False and not saved.exists()  # another key: removed


class _FakeExecutor:
    """Runs a job by writing its record after `seconds`; fails jobs named in `fail`; records when
    each ran."""

    def __init__(self, seconds: float = 0.3, fail: tuple[str, ...] = ()) -> None:
        self.seconds, self.fail, self.spans = seconds, fail, {}

    def overlapping(self, job_id: str) -> int:
        """How many jobs ran at some time during `job_id`, itself included."""
        start, end = self.spans[job_id]
        return sum(s < end and start < e for s, e in self.spans.values())

    def most_at_once(self) -> int:
        return max(
            sum(s <= start < e for s, e in self.spans.values()) for start, _ in self.spans.values()
        )

    def run(self, job, command, env):
        start = time.monotonic()
        time.sleep(self.seconds)
        self.spans[job.id] = (start, time.monotonic())
        job.log.parent.mkdir(parents=True, exist_ok=True)
        if job.id in self.fail:
            job.log.write_text(
                "Traceback (most recent call last):\n  ...\n"
                "sslbench eval: error: something specific went wrong\n"
            )
            return 1, ""
        (job.out_dir / "record.json").write_text("{}")
        return 0, ""


def _task(tmp_path: Path, name: str, deps=(), requires=()) -> Job:
    return Job(
        name,
        "task",
        ["eval", "knn"],
        {"name": name},
        tmp_path / name,
        tmp_path / "logs" / f"{name}.log",
        list(deps),
        requires=list(requires),
    )


def test_the_first_job_runs_alone_then_workers_share_the_rest(tmp_path):
    jobs = [_task(tmp_path, f"t{i}") for i in range(5)]
    executor = _FakeExecutor()
    outcomes = Scheduler(jobs, executor, workers=2, env={}, echo=lambda _: None).run()
    assert [o.status for o in outcomes] == ["ran"] * 5
    assert executor.overlapping("t0") == 1  # nothing else ran while the first job did
    assert executor.most_at_once() == 2  # then two at a time, never more
    executor = _FakeExecutor()
    Scheduler(
        [_task(tmp_path / "b", f"t{i}") for i in range(2)],
        executor,
        workers=2,
        env={},
        echo=lambda _: None,
        first_job_alone=False,
    ).run()
    assert executor.overlapping("t0") == 2


def test_failed_and_unavailable_jobs_are_reported_and_the_rest_goes_on(tmp_path):
    ok, bad = _task(tmp_path, "ok"), _task(tmp_path, "bad")
    gone = _task(tmp_path, "gone", requires=["json", "sslbench_no_such_module"])
    after_bad, after_gone = (
        _task(tmp_path, "after_bad", [bad]),
        _task(tmp_path, "after_gone", [gone]),
    )
    board = Job(
        "leaderboard",
        "leaderboard",
        ["leaderboard"],
        {},
        tmp_path,
        tmp_path / "logs" / "leaderboard.log",
        [ok, bad, gone],
    )
    lines = []
    outcomes = Scheduler(
        [ok, bad, gone, after_bad, after_gone, board],
        _FakeExecutor(0.01, fail=("bad", "leaderboard")),
        workers=2,
        env={},
        echo=lines.append,
    ).run()
    got = {o.job.id: (o.status, o.message) for o in outcomes}
    assert got["ok"] == ("ran", "")
    assert got["bad"] == ("failed", "exit 1: sslbench eval: error: something specific went wrong")
    assert got["gone"] == (
        "unavailable",
        "cannot import sslbench_no_such_module: "
        "ModuleNotFoundError: No module named 'sslbench_no_such_module'",
    )
    assert got["after_bad"] == ("blocked", "upstream failed: bad")
    assert got["after_gone"] == ("blocked", "no upstream job finished")
    assert got["leaderboard"][0] == "failed"  # it ran on the one task that finished
    assert not (gone.out_dir.exists() or gone.marker.exists())  # nothing written for it
    assert error_line(tmp_path / "logs" / "nothing.log") == ""


# --- end to end, from the CLI ------------------------------------------------------------------


def _tiny_overlay(path: Path, root: Path, pipeline: Path) -> Path:
    """A pipeline file that points every job of `pipeline` at the tiny cached data, 1 epoch."""
    data = {"root": str(root), "options": dict(TINY_SHAPES)}
    eval_data = {**data, "image_size": 16, "num_workers": 0}
    tasks = yaml.safe_load(pipeline.read_text()).get("tasks", {})
    overlay = {
        "pretrain": {"overrides": {"data": eval_data, "train": {"epochs": 1}}},
        "tasks": {
            name: {"overrides": {"data": eval_data if t["command"].startswith("eval") else data}}
            for name, t in tasks.items()
        },
        "executor": {"workers": 1, "threads": 1},
    }
    path.write_text(yaml.safe_dump(overlay))
    return path


def _statuses(stdout: str) -> dict[str, str]:
    """job id -> status, from the summary table."""
    table = stdout.split("\njob ", 1)[1].split(" jobs: ", 1)[0].splitlines()[2:-1]
    return dict(
        re.match(r"(\S+)\s+(ran|skipped \(done\)|unavailable|failed|blocked)", row).groups()
        for row in table
    )


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.mark.integration
def test_quick_pipeline_builds_the_board_then_skips_and_reruns_only_what_changed(
    tmp_path, shapes_root
):
    out = tmp_path / "quick"
    overlay = _tiny_overlay(tmp_path / "tiny.yaml", shapes_root, QUICK)
    cfg = load_pipeline_config([QUICK])
    methods = set(cfg.pretrain.recipes)
    # Segmentation needs the `segmentation` extra: without it, its column is left out, reported.
    # (the registered task requires mmseg, so its jobs do, with no `requires:` in the pipeline)
    assert {
        tuple(job.requires) for job in build_jobs(cfg, out) if job.id.startswith("segmentation/")
    } == {("mmseg",)}
    seg_missing = missing_modules(["mmseg"])
    tasks = set(cfg.tasks) - ({"segmentation"} if seg_missing else set())
    first = sslbench("run", str(QUICK), str(overlay), f"output_dir={out}", cwd=ROOT)
    statuses = _statuses(first.stdout)
    assert {job for job, status in statuses.items() if status != "ran"} == (
        {f"segmentation/{m}/seed0" for m in methods} if seg_missing else set()
    )
    if seg_missing:
        assert f"cannot import {seg_missing}" in first.stdout
        assert "job(s) left out: a module they need does not import here" in first.stderr

    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["run"] for row in rows} == methods
    assert {column.split(":")[0] for column in rows[0] if ":" in column} == tasks
    html = (out / "leaderboard.html").read_text()
    assert all(f">{m}<" in html for m in methods) and "<table" in html
    assert all(f"| {m} |" in (out / "leaderboard.md").read_text() for m in methods)

    before = _mtimes(out)
    again = sslbench("run", str(QUICK), str(overlay), f"output_dir={out}", cwd=ROOT)
    n, left_out = len(methods) * (len(tasks) + 1) + 1, len(methods) * (len(cfg.tasks) - len(tasks))
    assert (
        f"{n + left_out} jobs: 0 ran, {n} skipped (done), {left_out} unavailable, 0 failed, "
        f"0 blocked"
    ) in again.stdout
    assert _mtimes(out) == before

    changed = sslbench(
        "run",
        str(QUICK),
        str(overlay),
        f"output_dir={out}",
        "tasks.linear.overrides.probe.max_iter=50",
        cwd=ROOT,
    )
    ran = {job for job, status in _statuses(changed.stdout).items() if status == "ran"}
    assert ran == {f"linear/{m}/seed0" for m in methods} | {"leaderboard"}
    after = _mtimes(out)
    untouched = [
        p
        for p in before
        if "/linear/" not in p
        and "leaderboard" not in p
        and "logs/linear-" not in p
        and not p.endswith(("pipeline.yaml", ".sslbench-job.json"))
    ]
    assert all(after[p] == before[p] for p in untouched)


@pytest.mark.integration
def test_a_failing_job_is_reported_and_blocks_only_its_dependants(tmp_path, shapes_root):
    pipeline = tmp_path / "two.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "two",
                "output_dir": str(tmp_path / "two"),
                "pretrain": {
                    "recipes": {
                        "good": {"config": "configs/pretrain/simsiam_synthetic_r18.yaml"},
                        "bad": {
                            "config": "configs/pretrain/byol_synthetic_r18.yaml",
                            "overrides": {"method": {"bad_key": 1}},
                        },
                    }
                },
                "tasks": {"knn": {"command": "eval knn", "config": "configs/eval/knn.yaml"}},
            }
        )
    )
    overlay = _tiny_overlay(tmp_path / "tiny.yaml", shapes_root, pipeline)
    proc = sslbench("run", str(pipeline), str(overlay), cwd=ROOT, check=False)
    assert proc.returncode == 1
    assert _statuses(proc.stdout) == {
        "pretrain/good/seed0": "ran",
        "pretrain/bad/seed0": "failed",
        "knn/good/seed0": "ran",
        "knn/bad/seed0": "blocked",
        "leaderboard": "ran",
    }
    log = tmp_path / "two" / "logs" / "pretrain-bad-seed0.log"
    # The error line of the job's log in the summary, then the log's last lines.
    assert re.search(
        r"FAILED pretrain/bad/seed0: exit 1: sslbench pretrain: error: .*"
        r"unknown config key 'method\.bad_key'.*\n  log: " + re.escape(str(log)),
        proc.stdout,
    )
    assert "upstream failed: pretrain/bad/seed0" in proc.stdout
    with open(tmp_path / "two" / "leaderboard.csv", newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["good"]


@pytest.mark.integration
def test_jobs_run_through_submitits_local_executor(tmp_path, shapes_root):
    pytest.importorskip("submitit")
    pipeline = tmp_path / "one.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "one",
                "output_dir": str(tmp_path / "one"),
                "pretrain": {
                    "recipes": {
                        "simsiam": {"config": "configs/pretrain/simsiam_synthetic_r18.yaml"}
                    }
                },
                "executor": {
                    "name": "submitit",
                    "submitit": {"cluster": "local", "timeout_min": 10},
                },
            }
        )
    )
    overlay = _tiny_overlay(tmp_path / "tiny.yaml", shapes_root, pipeline)
    proc = sslbench("run", str(pipeline), str(overlay), cwd=ROOT)
    assert _statuses(proc.stdout) == {"pretrain/simsiam/seed0": "ran"}
    assert re.search(r"pretrain/simsiam/seed0: submitit job \d+", proc.stdout)
    assert (tmp_path / "one" / "runs" / "seed0" / "simsiam" / "backbone.safetensors").is_file()
    assert list((tmp_path / "one" / "submitit").glob("*/*_result.pkl"))


@pytest.mark.integration
def test_an_imported_checkpoint_is_a_marked_row_with_every_column(tmp_path, shapes_root):
    """One pretraining recipe and one checkpoint in torchvision's layout (a state dict with the
    classifier), imported by the pipeline and evaluated by every task of the quick pipeline."""
    torch.manual_seed(0)
    model = build_backbone("resnet18", stem="small", width=16)
    checkpoint = tmp_path / "resnet18-small.pth"
    torch.save(
        {**model.state_dict(), "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)},
        checkpoint,
    )
    spec = yaml.safe_load(QUICK.read_text())
    spec["pretrain"]["recipes"] = {"simclr": spec["pretrain"]["recipes"]["simclr"]}
    spec["backbones"] = {
        "tv_r18": {
            "checkpoint": str(checkpoint),
            "format": "torchvision",
            "arch": "resnet18",
            "method": "supervised-elsewhere",
            "arch_args": {"stem": "small", "width": 16},
        }
    }
    pipeline = tmp_path / "imported.yaml"
    pipeline.write_text(yaml.safe_dump(spec))
    overlay = _tiny_overlay(tmp_path / "tiny.yaml", shapes_root, QUICK)
    out = tmp_path / "board"
    done = sslbench("run", str(pipeline), str(overlay), f"output_dir={out}", cwd=ROOT)
    statuses = _statuses(done.stdout)
    assert statuses["import/tv_r18"] == "ran"
    ran = {
        job.split("/")[0]
        for job, status in statuses.items()
        if job.endswith("/tv_r18/seed0") and status == "ran"
    }
    assert ran == set(spec["tasks"]) - ({"segmentation"} if missing_modules(["mmseg"]) else set())
    with open(out / "leaderboard.csv", newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"simclr", "tv_r18"}
    imported = rows["tv_r18"]
    assert (imported["imported_format"], imported["imported_file"]) == (
        "torchvision",
        checkpoint.name,
    )
    assert (
        rows["simclr"]["imported_format"] == "" and imported["columns"] == rows["simclr"]["columns"]
    )
    assert (
        "tv_r18 (imported: torchvision, resnet18-small.pth)" in (out / "leaderboard.md").read_text()
    )
    assert (
        "tv_r18 (imported: torchvision, resnet18-small.pth)"
        in (out / "leaderboard.html").read_text()
    )
