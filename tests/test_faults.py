"""Faults, each with its clear error or its intact state: a corrupt image in an ImageFolder split,
a truncated backbone, a disk that fills during a checkpoint write, two pipelines on one output
directory, and a pipeline killed mid-job then run again."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    ROOT,
    TINY_SHAPES,
    eval_overrides,
    saved_step,
    sslbench,
    subprocess_env,
    tiny_data_overrides,
)
from PIL import Image

from sslbench.artifact import ArtifactError, load_backbone, save_backbone
from sslbench.backbones import build_backbone
from sslbench.checkpoint import (
    CheckpointError,
    load_checkpoint,
    require_same_recipe,
    require_same_world_size,
    save_checkpoint,
)
from sslbench.data import DatasetError, ImageFolder
from sslbench.io import sha256_file
from sslbench.pipeline.lock import LOCK_FILE, PipelineLockedError, output_dir_lock

RECIPE = ROOT / "configs" / "pretrain" / "simsiam_synthetic_r18.yaml"


def _image_folder(root: Path) -> Path:
    """Two classes of two noise JPEGs in each split; returns the one that will be truncated."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (48, 48, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.jpg")
    return root / "train" / "b" / "1.jpg"


def test_a_truncated_jpeg_is_named_before_any_training_step(tmp_path):
    broken = _image_folder(tmp_path / "folder")
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # a cut-off download: the header still parses
    with Image.open(broken) as image:
        assert image.size == (48, 48)  # opening alone does not notice
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {broken}")):
        ImageFolder(tmp_path / "folder", "train").verify(progress=False)
    proc = sslbench(
        "pretrain",
        str(RECIPE),
        "data.name=imagefolder",
        "data.options=null",
        f"data.root={tmp_path / 'folder'}",
        "optim.batch_size=2",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=broken",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and f"cannot read image {broken}" in proc.stderr
    assert not (tmp_path / "runs").exists()  # stopped before the run directory was made


def _artifact(run_dir: Path) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", stem="small", width=16)
    save_backbone(
        run_dir,
        backbone,
        arch="resnet18",
        arch_kwargs={"stem": "small", "width": 16},
        method="simsiam",
        seed=0,
    )
    return run_dir / "backbone.safetensors"


def test_a_truncated_backbone_is_a_clear_error(tmp_path, shapes_root):
    weights = _artifact(tmp_path / "run")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=re.escape(str(weights)) + r": sha256 .* truncated"):
        load_backbone(tmp_path / "run")
    proc = sslbench(
        "eval",
        "knn",
        "--config",
        str(ROOT / "configs" / "eval" / "knn.yaml"),
        "--backbone",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "results"),
        *eval_overrides(shapes_root),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and f"{weights}: sha256" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The same cut with a manifest that vouches for it: safetensors itself refuses the file.
    manifest = json.loads((tmp_path / "run" / "backbone.json").read_text())
    manifest["weights_sha256"] = sha256_file(weights)
    (tmp_path / "run" / "backbone.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(f"{weights}: not a readable safetensors")):
        load_backbone(tmp_path / "run")


def _fill_disk_on_write(monkeypatch, nth: int) -> list:
    """torch.save that, on its `nth` call, writes part of the file and fails as a full disk does."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == nth:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_a_checkpoint_of_another_recipe_or_process_count_is_refused_by_name(tmp_path):
    """The checks every task's resume shares: both hashes, what to delete, both counts."""
    path = tmp_path / "checkpoint.pt"
    require_same_recipe(path, "a" * 40, "a" * 40, "delete it")
    require_same_world_size(path, 2, 2)
    with pytest.raises(CheckpointError) as err:
        require_same_recipe(path, "a" * 40, "b" * 40, f"delete {path}")
    assert str(err.value) == (
        f"{path} holds an unfinished run of another recipe (config hash {'a' * 12}... vs "
        f"{'b' * 12}...); delete {path}, or give this run another run.work_dir"
    )
    with pytest.raises(CheckpointError, match="config hash None... vs"):
        require_same_recipe(path, None, "b" * 40, "delete it")
    with pytest.raises(
        CheckpointError, match=f"^{path} was saved by 2 processes; continue it with as many, not 1$"
    ):
        require_same_world_size(path, 2, 1)


def test_a_full_disk_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    _fill_disk_on_write(monkeypatch, nth=1)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"could not write checkpoint {path} (No space left on device); the previous "
            "checkpoint is unchanged"
        ),
    ):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no partial file left


@pytest.mark.integration
def test_a_run_whose_disk_filled_resumes_to_the_uninterrupted_result(
    shapes_root, tmp_path, monkeypatch
):
    from pretrain.config import load_pretrain_config
    from pretrain.engine import pretrain

    common = [
        *tiny_data_overrides(shapes_root),
        "optim.batch_size=128",
        "train.epochs=2",
        "train.checkpoint_every=2",
        f"run.output_dir={tmp_path}",
    ]
    straight = pretrain(load_pretrain_config([RECIPE], [*common, "run.name=straight"]))
    cfg = load_pretrain_config([RECIPE], [*common, "run.name=full"])
    calls = _fill_disk_on_write(monkeypatch, nth=2)  # the checkpoint at step 4 of 8
    with pytest.raises(CheckpointError, match="the previous checkpoint is unchanged"):
        pretrain(cfg)
    monkeypatch.undo()
    run = tmp_path / "full"
    assert len(calls) == 2 and load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]
    pretrain(cfg, resume=True)
    assert (run / "backbone.safetensors").read_bytes() == (
        straight / "backbone.safetensors"
    ).read_bytes()


def test_a_second_holder_of_the_output_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE
    with output_dir_lock(out):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(PipelineLockedError, match=re.escape(f"pid {os.getpid()}, lock {lock}")):
            with output_dir_lock(out):
                pass
    assert not lock.exists()  # released and removed on exit
    lock.write_text("999999999\n")  # left behind by a process that was killed: nobody holds it
    with output_dir_lock(out):
        assert lock.read_text() == f"{os.getpid()}\n"


def _pipeline(
    path: Path, root: Path, recipes: dict | None = None, tasks: dict | None = None
) -> Path:
    """A pipeline file at `path` on the tiny shapes at `root`: by default two short pretrainings
    (a, b), each evaluated by kNN."""
    data = {"root": str(root), "options": dict(TINY_SHAPES), "image_size": 16, "num_workers": 0}
    recipes = recipes or {
        "a": {"config": "configs/pretrain/simsiam_synthetic_r18.yaml"},
        "b": {"config": "configs/pretrain/vicreg_synthetic_r18.yaml"},
    }
    tasks = tasks or {"knn": {"command": "eval knn", "config": "configs/eval/knn.yaml"}}
    for task in tasks.values():
        task.setdefault("overrides", {}).update(data=data, run={"progress": False})
    path.write_text(
        yaml.safe_dump(
            {
                "name": "faults",
                "pretrain": {
                    "overrides": {
                        "data": data,
                        "train": {"epochs": 3, "checkpoint_every": 2, "progress": False},
                        "optim": {"batch_size": 64},
                    },
                    "recipes": recipes,
                },
                "tasks": tasks,
                "executor": {"workers": 1, "threads": 1},
            }
        )
    )
    return path


def _statuses(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(\S+/seed0|leaderboard)\s+(ran|skipped \(done\))", stdout, re.M))


@pytest.mark.integration
def test_a_killed_pipeline_resumes_its_job_and_builds_the_same_board(shapes_root, tmp_path):
    pipeline = _pipeline(tmp_path / "p.yaml", shapes_root)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    sslbench("run", str(pipeline), f"output_dir={whole}", cwd=ROOT)

    command = [sys.executable, "-m", "sslbench.cli", "run", str(pipeline), f"output_dir={cut}"]
    first = subprocess.Popen(
        command,
        cwd=ROOT,
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = cut / "runs" / "seed0" / "b" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 600
        while saved_step(checkpoint) < 4:
            assert first.poll() is None and time.monotonic() < deadline, "b never checkpointed"
            time.sleep(0.05)
        second = sslbench("run", str(pipeline), f"output_dir={cut}", cwd=ROOT, check=False)
        assert second.returncode == 1
        assert f"(pid {first.pid}, lock {cut / LOCK_FILE})" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the pipeline and the job it runs, mid-step
        first.wait()
    assert not (cut / "runs" / "seed0" / "b" / "backbone.json").exists()
    assert (cut / LOCK_FILE).read_text() == f"{first.pid}\n"  # stale: its holder is gone

    again = sslbench("run", str(pipeline), f"output_dir={cut}", cwd=ROOT)
    assert _statuses(again.stdout) == {
        "pretrain/a/seed0": "skipped (done)",
        "pretrain/b/seed0": "ran",
        "knn/a/seed0": "ran",
        "knn/b/seed0": "ran",
        "leaderboard": "ran",
    }
    assert re.search(r"start +pretrain/b/seed0  \(resuming\)", again.stdout)
    steps = [
        int(line.split(",")[0])
        for line in (cut / "runs" / "seed0" / "b" / "train.csv").read_text().splitlines()[1:]
    ]
    assert steps == sorted(set(steps)), "the resumed run repeated steps"
    assert (cut / "runs" / "seed0" / "b" / "backbone.safetensors").read_bytes() == (
        whole / "runs" / "seed0" / "b" / "backbone.safetensors"
    ).read_bytes()
    # leaderboard.csv holds no timing field: the boards are equal byte for byte
    assert (cut / "leaderboard.csv").read_text() == (whole / "leaderboard.csv").read_text()


@pytest.mark.integration
def test_a_pipeline_killed_inside_a_task_continues_the_task_from_its_checkpoint(
    shapes_root, tmp_path
):
    """The task's hidden work directory survives the rerun: the standard probe (96 steps,
    a checkpoint every 8) resumes where the killed one saved, and the board equals an
    uninterrupted pipeline's."""
    probe = {
        "probe": {"name": "standard", "batch_size": 32, "epochs": 6},
        "run": {"checkpoint_every": 8},
    }
    pipeline = _pipeline(
        tmp_path / "p.yaml",
        shapes_root,
        recipes={"a": {"config": "configs/pretrain/simsiam_synthetic_r18.yaml"}},
        tasks={"linear": {"command": "eval linear", "config": "configs/eval/linear_standard.yaml"}},
    )
    settings = yaml.safe_load(pipeline.read_text())
    for key, value in probe.items():
        settings["tasks"]["linear"]["overrides"].setdefault(key, {}).update(value)
    pipeline.write_text(yaml.safe_dump(settings))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    sslbench("run", str(pipeline), f"output_dir={whole}", cwd=ROOT)

    results = cut / "results" / "seed0" / "a" / "linear"

    def resume_step() -> int:
        found = sorted(results.glob(".work/*/resume.pt"))
        return saved_step(found[0]) if found else -1

    first = subprocess.Popen(
        [sys.executable, "-m", "sslbench.cli", "run", str(pipeline), f"output_dir={cut}"],
        cwd=ROOT,
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while resume_step() < 8:
            assert first.poll() is None and time.monotonic() < deadline, "never checkpointed"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = resume_step()
    assert 8 <= killed_at < 96 and not list(results.glob("[!.]*.json")), "a record was written"

    again = sslbench("run", str(pipeline), f"output_dir={cut}", cwd=ROOT)
    assert re.search(r"start +linear/a/seed0  \(resuming\)", again.stdout)
    assert _statuses(again.stdout) == {
        "pretrain/a/seed0": "skipped (done)",
        "linear/a/seed0": "ran",
        "leaderboard": "ran",
    }
    (record,) = results.glob("[!.]*.json")
    assert json.loads(record.read_text())["details"]["resumed_from_step"] == killed_at
    assert (cut / "leaderboard.csv").read_text() == (whole / "leaderboard.csv").read_text()
