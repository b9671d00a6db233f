"""`sslbench pretrain` end to end on tiny synthetic-shapes: the real CLI, as a user runs it."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    paired_knn,
    pretrain_killed_at,
    sslbench,
    subprocess_env,
    tiny_data_overrides,
)
from PIL import Image

from sslbench.artifact import load_backbone
from sslbench.backbones import build_backbone

pytestmark = pytest.mark.integration
RECIPE = str(ROOT / "configs" / "pretrain" / "simsiam_synthetic_r18.yaml")


def _args(shapes_root, tmp_path, name, *extra):
    return [
        RECIPE,
        *tiny_data_overrides(shapes_root),
        f"run.output_dir={tmp_path}",
        f"run.name={name}",
        "optim.batch_size=64",
        *extra,
    ]


def _diagnostics(run_dir: Path) -> list[dict]:
    with open(run_dir / "diagnostics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_pretrain_writes_artifact_that_beats_random_init(shapes_root, knn_shapes_root, tmp_path):
    proc = sslbench(
        "pretrain", *_args(shapes_root, tmp_path, "ss", "train.epochs=30"), cwd=tmp_path
    )
    run_dir = tmp_path / "ss"
    assert str(run_dir / "backbone.safetensors") in proc.stdout
    for name in (
        "config.yaml",
        "train.csv",
        "diagnostics.csv",
        "curves.png",
        "spectrum.png",
        "checkpoint.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    backbone, manifest = load_backbone(run_dir)
    assert manifest["method"] == "simsiam" and manifest["steps"] == 30 * (512 // 64)
    assert len(manifest["config_hash"]) == 64 and manifest["dataset"]["size"] == 512
    torch.manual_seed(0)
    random_init = build_backbone(manifest["arch"], **manifest["arch_kwargs"])
    knn = paired_knn(backbone, random_init, knn_shapes_root)
    print(knn)
    assert knn.trained > knn.random and knn.z > 2, knn


def test_sigkill_then_resume_is_bit_identical(shapes_root, tmp_path):
    common = ["train.epochs=3", "train.checkpoint_every=3", "optim.batch_size=128"]
    sslbench("pretrain", *_args(shapes_root, tmp_path, "straight", *common), cwd=tmp_path)
    args = _args(shapes_root, tmp_path, "killed", *common)
    pretrain_killed_at(args, tmp_path, tmp_path / "killed" / "checkpoint.pt", min_step=3)
    assert not (tmp_path / "killed" / "backbone.json").exists()
    refused = sslbench("pretrain", *args, cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    config = (tmp_path / "killed" / "config.yaml").read_bytes()
    other = sslbench("pretrain", *args, "optim.base_lr=0.1", "--resume", cwd=tmp_path, check=False)
    assert other.returncode == 1 and "optim.base_lr: 0.5 -> 0.1" in other.stderr
    assert (tmp_path / "killed" / "config.yaml").read_bytes() == config  # left as it was
    sslbench("pretrain", *args, "--resume", cwd=tmp_path)
    straight = (tmp_path / "straight" / "backbone.safetensors").read_bytes()
    resumed = (tmp_path / "killed" / "backbone.safetensors").read_bytes()
    assert straight == resumed
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "killed" / "train.csv"))]
    assert steps == sorted(set(steps)), "resumed curves repeat steps"


def test_simsiam_without_stop_gradient_collapses(shapes_root, tmp_path):
    # Without BN on the projector output, so nothing but the stop-gradient stands in the way of
    # a constant output (train-mode BN would keep every dimension at unit batch variance).
    common = ["train.epochs=30", "optim.base_lr=0.1", "method.proj_last_bn=false"]
    sslbench("pretrain", *_args(shapes_root, tmp_path, "sg", *common), cwd=tmp_path)
    sslbench(
        "pretrain",
        *_args(shapes_root, tmp_path, "nosg", *common, "method.stop_gradient=false"),
        cwd=tmp_path,
    )
    with_sg, without_sg = _diagnostics(tmp_path / "sg")[-1], _diagnostics(tmp_path / "nosg")[-1]
    print(
        f"l2_std*sqrt(d): with stop-grad {with_sg['l2_std_x_sqrt_d']:.3f}, "
        f"without {without_sg['l2_std_x_sqrt_d']:.3f}"
    )
    assert with_sg["l2_std_x_sqrt_d"] > 0.5
    assert without_sg["l2_std_x_sqrt_d"] < 0.1
    assert without_sg["m_o"] > 0.9  # all embeddings point the same way (Zhang et al.)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes_root, tmp_path):
    # At lr 1e20 from the first step the loss is no longer finite before a checkpoint was due.
    proc = sslbench(
        "pretrain",
        *_args(
            shapes_root,
            tmp_path,
            "nan",
            "train.epochs=4",
            "train.checkpoint_every=2",
            "optim.base_lr=1e20",
        ),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "loss is" in proc.stderr
    assert "last good checkpoint" in proc.stderr and "none was written" in proc.stderr
    assert not (tmp_path / "nan" / "backbone.json").exists()
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()
    # Warm-up from lr 0: step 0 changes no weight, so the checkpoint after it exists and is
    # good; the next steps blow the weights up, and their checkpoint is refused, not written.
    proc = sslbench(
        "pretrain",
        *_args(
            shapes_root,
            tmp_path,
            "warm",
            "train.epochs=4",
            "train.checkpoint_every=1",
            "optim.base_lr=1e20",
            "optim.warmup_epochs=1",
        ),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "is no longer finite at step" in proc.stderr
    assert not (tmp_path / "warm" / "backbone.json").exists()
    state = torch.load(tmp_path / "warm" / "checkpoint.pt", weights_only=True)
    assert (
        state["step"] >= 1
        and f"last good checkpoint is {tmp_path / 'warm' / 'checkpoint.pt'} (step {state['step']})"
        in proc.stderr
    )
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_resume_of_a_finished_run_needs_its_config(shapes_root, tmp_path):
    args = _args(shapes_root, tmp_path, "done", "train.epochs=1")
    sslbench("pretrain", *args, cwd=tmp_path)
    weights = (tmp_path / "done" / "backbone.safetensors").read_bytes()
    same = sslbench("pretrain", *args, "train.progress=true", "--resume", cwd=tmp_path)
    assert "already finished under this config, nothing to do" in same.stdout
    other = sslbench(
        "pretrain",
        *args,
        "optim.base_lr=0.1",
        "method.out_dim=256",
        "--resume",
        cwd=tmp_path,
        check=False,
    )
    assert other.returncode == 1 and "holds a finished backbone of another config" in other.stderr
    assert "method.out_dim: 512 -> 256; optim.base_lr: 0.5 -> 0.1." in other.stderr
    assert (tmp_path / "done" / "backbone.safetensors").read_bytes() == weights


def test_torchrun_resume_of_a_finished_run_returns_on_every_process(shapes_root, tmp_path):
    args = _args(shapes_root, tmp_path, "done", "train.epochs=1")
    sslbench("pretrain", *args, cwd=tmp_path)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sslbench.cli",
        "pretrain",
        "--resume",
        *args,
    ]
    started = time.monotonic()
    # A process left waiting in a collective would hold torchrun until the timeout.
    proc = subprocess.run(
        torchrun, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    print(f"2-process --resume of a finished run: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, proc.stderr  # torchrun exits 0 only when every process did
    assert proc.stdout.count("already finished") == 1  # said once, by the main process
    refused = subprocess.run(
        [*torchrun, "optim.base_lr=0.1"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert refused.stderr.count("optim.base_lr: 0.5 -> 0.1") == 2  # each process says why


def test_resume_restores_the_random_state_drop_path_draws_from(shapes_root, tmp_path):
    # Stochastic depth draws its masks from torch's global generator at every step: a resumed
    # run matches only if the checkpoint restores it (and the data loader does not draw from it).
    vit = [
        str(ROOT / "configs" / "pretrain" / "mocov3_synthetic_vit_tiny.yaml"),
        *tiny_data_overrides(shapes_root),
        f"run.output_dir={tmp_path}",
        "backbone.kwargs.drop_path_rate=0.2",
        "train.epochs=3",
        "train.checkpoint_every=3",
    ]
    sslbench("pretrain", *vit, "run.name=straight", cwd=tmp_path)
    killed = [*vit, "run.name=killed"]
    pretrain_killed_at(killed, tmp_path, tmp_path / "killed" / "checkpoint.pt", min_step=3)
    assert not (tmp_path / "killed" / "backbone.json").exists()
    sslbench("pretrain", *killed, "--resume", cwd=tmp_path)
    assert (tmp_path / "straight" / "backbone.safetensors").read_bytes() == (
        tmp_path / "killed" / "backbone.safetensors"
    ).read_bytes()


def test_bad_inputs_are_clear_errors_and_nothing_runs(shapes_root, tmp_path):
    unknown = sslbench("pretrain", RECIPE, "optim.base_lrr=1", cwd=tmp_path, check=False)
    assert unknown.returncode == 1 and "'optim.base_lr'" in unknown.stderr

    missing = sslbench(
        "pretrain",
        RECIPE,
        "data.name=imagefolder",
        "data.options=null",
        f"data.root={tmp_path / 'nope'}",
        f"run.output_dir={tmp_path}",
        "run.name=missing",
        cwd=tmp_path,
        check=False,
    )
    assert missing.returncode == 1 and str(tmp_path / "nope") in missing.stderr

    folder = tmp_path / "folder"
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(folder / split / cls / f"{i}.png")
    corrupt = folder / "train" / "b" / "1.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad_image = sslbench(
        "pretrain",
        RECIPE,
        "data.name=imagefolder",
        "data.options=null",
        f"data.root={folder}",
        f"run.output_dir={tmp_path}",
        "run.name=corrupt",
        "optim.batch_size=2",
        cwd=tmp_path,
        check=False,
    )
    assert bad_image.returncode == 1 and str(corrupt) in bad_image.stderr
    assert not (tmp_path / "corrupt" / "checkpoint.pt").exists()
