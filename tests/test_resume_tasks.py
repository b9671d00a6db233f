"""Long evaluation and transfer jobs survive SIGKILL: the same command, run again, continues from
the last checkpoint in its work directory and ends where an uninterrupted run ends (bit for bit
on CPU), says in its record where it resumed, and leaves no resume state behind."""

import csv
import json
import os
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    TINY_SHAPES,
    eval_overrides,
    random_init_artifact,
    saved_step,
    shapes_options,
    sslbench,
    sslbench_killed_when,
)
from omegaconf import OmegaConf

from sslbench.checkpoint import CheckpointError, save_checkpoint
from sslbench.data import prepare_synthetic_shapes
from sslbench.pipeline.config import SubmititConfig
from sslbench.pipeline.jobs import Job
from sslbench.pipeline.requeue import RequeueableCommand
from sslbench.pipeline.runner import SubmititExecutor
from sslbench.results import HITS_KEY, ResultRecord, read_record
from transfer.detection.detectron2_resume import LAST_CHECKPOINT, STATE_KEY, resume_point
from transfer.segmentation.model import require_mmseg
from transfer.segmentation.run import training_curves

pytestmark = pytest.mark.integration

# 128 training images at 64 px: 32 detection batches of 4 an epoch.
DETECTION_SHAPES = {
    "image_size": 64,
    "train_per_class": 16,
    "val_per_class": 2,
    "test_per_class": 1,
    "style": "silhouette",
}


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    """A random-init ResNet-18 with the ImageNet stem: cheap to run on 16 px images."""
    return random_init_artifact(tmp_path_factory.mktemp("runs") / "random", stem="imagenet")


def _resume_file(out: Path) -> Path:
    """The task's resume checkpoint, RESULTS_DIR/.work/<run>/resume.pt (a path that does not
    exist while there is none)."""
    found = sorted(out.glob(".work/*/resume.pt"))
    return found[0] if found else out / ".work" / "none" / "resume.pt"


def _killed_then_rerun(args: list[str], out: Path, min_step: int, cwd: Path, nproc: int = 1) -> int:
    """Run `sslbench ARGS` (results into `out`; nproc processes), SIGKILL it once its resume
    checkpoint holds step >= min_step, run the same command again to the end; returns the
    checkpoint's step."""
    sslbench_killed_when(
        args,
        cwd,
        lambda: saved_step(_resume_file(out)) >= min_step,
        f"resume checkpoint at step >= {min_step}",
        nproc=nproc,
    )
    assert not list(out.glob("*.json")), "the killed run wrote a record"
    killed_after = saved_step(_resume_file(out))
    sslbench(*args, cwd=cwd, nproc=nproc)
    assert not _resume_file(out).exists(), "resume state left behind once the record was written"
    return killed_after


def _record(out: Path) -> ResultRecord:
    (path,) = out.glob("*.json")
    return read_record(path)


def _assert_same_classification(straight: ResultRecord, resumed: ResultRecord) -> None:
    assert resumed.file_name == straight.file_name  # checkpointing is not part of the protocol
    assert resumed.metrics == straight.metrics
    assert resumed.details["final_train_loss"] == straight.details["final_train_loss"]
    assert resumed.details[HITS_KEY] == straight.details[HITS_KEY]


def _linear_args(backbone: Path, shapes_root: Path, out: Path, *extra: str) -> list[str]:
    """A standard linear probe of 96 steps: 512 images in batches of 32, 6 epochs."""
    return [
        "eval",
        "linear",
        "--backbone",
        str(backbone),
        "--out",
        str(out),
        *eval_overrides(shapes_root),
        "probe.name=standard",
        "probe.batch_size=32",
        "probe.epochs=6",
        *extra,
    ]


def test_standard_linear_probe_continues_bit_identically(random_run, shapes_root, tmp_path):
    def args(out: str, *extra: str) -> list[str]:
        return _linear_args(random_run, shapes_root, tmp_path / out, *extra)

    sslbench(*args("straight", "run.checkpoint_every=0"), cwd=tmp_path)
    assert not (tmp_path / "straight" / ".work").exists()  # 0: no checkpoint at all
    resumed_at = _killed_then_rerun(
        args("killed", "run.checkpoint_every=8"), tmp_path / "killed", 8, tmp_path
    )
    straight, resumed = _record(tmp_path / "straight"), _record(tmp_path / "killed")
    assert 8 <= resumed_at < 96 and resumed_at % 8 == 0
    assert resumed.details["resumed_from_step"] == resumed_at
    assert "resumed_from_step" not in straight.details
    _assert_same_classification(straight, resumed)


def test_semisup_fine_tuning_continues_bit_identically(random_run, shapes_root, tmp_path):
    # A quarter of the labels (128 images) in batches of 16: 8 steps an epoch, 32 in all; the
    # backbone and its BatchNorm statistics train too.
    def args(out: str, *extra: str) -> list[str]:
        return [
            "eval",
            "semisup",
            "--backbone",
            str(random_run),
            "--out",
            str(tmp_path / out),
            *eval_overrides(shapes_root),
            "semisup.fraction=0.25",
            "semisup.batch_size=16",
            "semisup.epochs=4",
            *extra,
        ]

    sslbench(*args("straight"), cwd=tmp_path)
    resumed_at = _killed_then_rerun(
        args("killed", "run.checkpoint_every=4"), tmp_path / "killed", 4, tmp_path
    )
    straight, resumed = _record(tmp_path / "straight"), _record(tmp_path / "killed")
    assert 4 <= resumed_at < 32 and resumed.details["resumed_from_step"] == resumed_at
    _assert_same_classification(straight, resumed)


def _detection_args(run_dir: Path, root: Path, out: Path) -> list[str]:
    """16 iterations of the tiny recipe (4 images a batch), a checkpoint every 4."""
    return [
        "transfer",
        "detection",
        "--backbone",
        str(run_dir),
        "--config",
        str(ROOT / "configs/transfer/detection_synthetic_r18_fpn.yaml"),
        "--out",
        str(out),
        f"data.root={root}",
        shapes_options(DETECTION_SHAPES),
        "run.progress=false",
        "run.threads=1",
        "run.log_every=2",
        "solver.max_iter=16",
        "solver.steps=[12]",
        "solver.warmup_iters=4",
        "test.precise_bn_iters=2",
        "solver.checkpoint_period=4",
    ]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_torchvision_detection_continues_bit_identically(tmp_path, nproc):
    """With 2 processes each one's RNG (its multi-scale sizes and sampled proposals) is its own,
    saved and restored per process."""
    root = prepare_synthetic_shapes(tmp_path / "shapes64", progress=False, **DETECTION_SHAPES)
    run_dir = random_init_artifact(tmp_path / "r18", stem="small", width=16)
    sslbench(*_detection_args(run_dir, root, tmp_path / "straight"), cwd=tmp_path, nproc=nproc)
    out = tmp_path / "killed"
    resumed_at = _killed_then_rerun(_detection_args(run_dir, root, out), out, 4, tmp_path, nproc)
    straight, resumed = _record(tmp_path / "straight"), _record(out)
    assert 4 <= resumed_at < 16 and resumed.details["resumed_from_iteration"] == resumed_at
    assert "resumed_from_iteration" not in straight.details
    assert resumed.details["world_size"] == straight.details["world_size"] == nproc
    assert resumed.file_name == straight.file_name and resumed.metrics == straight.metrics
    assert resumed.details["final_losses"] == straight.details["final_losses"]
    works = [Path(r.details["work_dir"]) for r in (straight, resumed)]
    for name in ("train.csv", "predictions.json"):  # the loss log continues without a gap
        assert (works[0] / name).read_text() == (works[1] / name).read_text(), name
    weights = [torch.load(w / "model_final.pth", weights_only=True) for w in works]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def _detectron2_args(run_dir: Path, root: Path, out: Path, *extra: str) -> list[str]:
    """12 detectron2 iterations of the tiny recipe (4 images a batch), a checkpoint every 4,
    metrics.json written every iteration."""
    return [
        *_detection_args(run_dir, root, out),
        "backend=detectron2",
        "run.device=cpu",
        "run.log_every=1",
        "model.norm=BN",
        "model.anchor_sizes=[16,32,64,128,256]",  # detectron2's ResNet-18: 7x7 stem, max-pool
        "solver.max_iter=12",
        "solver.steps=[9]",
        "solver.warmup_iters=2",
        *extra,
    ]


def _detectron2_checkpoint(out: Path) -> Path | None:
    """The checkpoint a detectron2 work directory's last_checkpoint names, None while none."""
    found = sorted(out.glob(f".work/*/{LAST_CHECKPOINT}"))
    return found[0].parent / found[0].read_text().strip() if found else None


def _metrics_iterations(work_dir: Path) -> list[int]:
    """The iterations of detectron2's metrics.json lines, in the order written."""
    lines = (work_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if line.strip()]


def test_detectron2_detection_continues_bit_identically(tmp_path):
    """SIGKILLed after its first checkpoint, the same command continues from it (another recipe
    is refused) and ends with the uninterrupted run's weights and metrics, bit for bit on CPU;
    detectron2's metrics.json shows no iteration before the checkpoint ran twice."""
    pytest.importorskip("detectron2")
    root = prepare_synthetic_shapes(tmp_path / "shapes64", progress=False, **DETECTION_SHAPES)
    run_dir = random_init_artifact(tmp_path / "r18")
    sslbench(*_detectron2_args(run_dir, root, tmp_path / "straight"), cwd=tmp_path)
    out = tmp_path / "killed"
    args = _detectron2_args(run_dir, root, out)
    sslbench_killed_when(
        args, tmp_path, lambda: _detectron2_checkpoint(out) is not None, "a detectron2 checkpoint"
    )
    assert not list(out.glob("*.json")), "the killed run wrote a record"
    checkpoint = _detectron2_checkpoint(out)
    resumed_at = torch.load(checkpoint, weights_only=True, mmap=True)["iteration"] + 1
    before = _metrics_iterations(checkpoint.parent)
    other = sslbench(
        *_detectron2_args(run_dir, root, out, "solver.base_lr=0.02"), cwd=tmp_path, check=False
    )
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert f"{checkpoint} holds an unfinished run of another recipe" in other.stderr
    sslbench(*args, cwd=tmp_path)

    straight, resumed = _record(tmp_path / "straight"), _record(out)
    assert 4 <= resumed_at < 12 and resumed_at % 4 == 0
    assert resumed.details["resumed_from_iteration"] == resumed_at
    assert "resumed_from_iteration" not in straight.details
    assert resumed.file_name == straight.file_name and resumed.metrics == straight.metrics
    assert resumed.details["detections"] == straight.details["detections"]
    assert resumed.details["per_category"] == straight.details["per_category"]
    works = [Path(r.details["work_dir"]) for r in (straight, resumed)]
    for work in works:  # the fine-tuned model stays, no longer as a run to continue
        assert (work / "model_final.pth").is_file() and not (work / LAST_CHECKPOINT).exists()
    weights = [torch.load(w / "model_final.pth", weights_only=True)["model"] for w in works]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    # The resumed run logs from the checkpoint on: no iteration up to it runs twice (the killed
    # run may have logged a few after it, which ran again; a kill between the checkpoint and
    # its writer may have left the checkpoint's own iteration unlogged). 12: the evaluation.
    assert _metrics_iterations(works[0]) == [*range(12), 12]
    assert before == sorted(set(before)) and set(before) <= set(range(12))
    assert _metrics_iterations(works[1]) == [*before, *range(resumed_at, 12), 12]


def test_detectron2_refuses_another_recipes_checkpoint(tmp_path):
    """The work directory's last detectron2 checkpoint decides where a run continues; one
    written under another recipe key is refused by name, with both hashes."""
    assert resume_point(tmp_path, "a" * 64) is None
    path = tmp_path / "model_0000003.pth"
    save_checkpoint(path, {"iteration": 3, "trainer": {STATE_KEY: {"key": "a" * 64, "rng": []}}})
    (tmp_path / LAST_CHECKPOINT).write_text(path.name)
    assert resume_point(tmp_path, "a" * 64) == 4
    with pytest.raises(CheckpointError) as err:
        resume_point(tmp_path, "b" * 64)
    assert str(err.value).startswith(f"{path} holds an unfinished run of another recipe")
    assert f"(config hash {'a' * 12}... vs {'b' * 12}...)" in str(err.value)
    save_checkpoint(path, {"iteration": 3, "trainer": {}})  # detectron2's own, without a key
    with pytest.raises(CheckpointError, match="config hash None... vs"):
        resume_point(tmp_path, "a" * 64)


def _mmseg_missing() -> str:
    """Why the segmentation command cannot run here; '' when it can."""
    try:
        require_mmseg()
    except RuntimeError as err:
        return str(err)
    return ""


def _complete_checkpoints(work_dir: Path) -> list[int]:
    """Iterations of the whole mmengine checkpoints (a zip's directory is written last)."""
    return sorted(
        int(p.stem.split("_")[1]) for p in work_dir.glob("iter_*.pth") if zipfile.is_zipfile(p)
    )


def _steps_and_losses(train_csv: Path) -> list[tuple[str, str]]:
    with open(train_csv, newline="") as f:
        return [(row["step"], row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.skipif(bool(_mmseg_missing()), reason=_mmseg_missing())
def test_mmseg_segmentation_continues_bit_identically(shapes_root, tmp_path):
    run_dir = random_init_artifact(tmp_path / "r18", stem="small", width=16)

    def args(out: str) -> list[str]:
        return [
            "transfer",
            "segmentation",
            "--backbone",
            str(run_dir),
            "--config",
            str(ROOT / "configs/transfer/segmentation_synthetic_r18_fcn.yaml"),
            "--out",
            str(tmp_path / out),
            f"data.root={shapes_root}",
            shapes_options(TINY_SHAPES),
            "run.progress=false",
            "run.threads=1",
            "run.log_every=1",
            "solver.max_iters=40",
            "run.checkpoint_every=10",
        ]

    sslbench(*args("straight"), cwd=tmp_path)
    works = tmp_path / "killed" / ".work"  # holds the run's work dir once it starts
    sslbench_killed_when(
        args("killed"),
        tmp_path,
        lambda: any(_complete_checkpoints(w) for w in works.glob("*")),
        "a complete mmengine checkpoint",
    )
    (work,) = works.glob("*")
    resumed_at = _complete_checkpoints(work)[-1]
    sslbench(*args("killed"), cwd=tmp_path)
    straight, resumed = _record(tmp_path / "straight"), _record(tmp_path / "killed")
    assert 10 <= resumed_at < 40 and resumed.details["resumed_from_iteration"] == resumed_at
    assert "resumed_from_iteration" not in straight.details
    assert resumed.file_name == straight.file_name and resumed.metrics == straight.metrics
    assert resumed.details["per_class_IoU"] == straight.details["per_class_IoU"]
    weights = [
        torch.load(Path(r.details["work_dir"]) / "model_final.pth", weights_only=True)
        for r in (straight, resumed)
    ]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():  # dropout draws continued too
        assert torch.equal(value, weights[1][key]), key
    # mmengine's own log of the run that resumed: every later iteration, once, none before
    logs = sorted(work.glob("*/vis_data/scalars.json"))
    assert len(logs) == 2
    ran = [
        row["step"] for row in map(json.loads, logs[-1].read_text().splitlines()) if "loss" in row
    ]
    assert ran == list(range(resumed_at + 1, 41))
    assert _steps_and_losses(work / "train.csv") == _steps_and_losses(
        Path(straight.details["work_dir"]) / "train.csv"
    )
    assert not _complete_checkpoints(work) and not (work / "last_checkpoint").exists()


def test_training_curves_of_a_resumed_run_take_each_step_from_the_run_that_kept_it(tmp_path):
    def log(name: str, steps: range) -> Path:
        path = tmp_path / name / "scalars.json"
        path.parent.mkdir()
        path.write_text(
            "".join(
                json.dumps({"loss": step + 0.5 if name == "killed" else step, "step": step}) + "\n"
                for step in steps
            )
        )
        return path

    # killed after iteration 7 with a checkpoint at 4; a run killed before it logged anything;
    # then the run that resumed at 4 (logging every 2: its first row is step 6)
    files = log("killed", range(2, 8, 2)), log("empty", range(0)), log("resumed", range(6, 11, 2))
    rows = training_curves(*files).splitlines()
    assert rows == ["step,loss", "2,2.5", "4,4.5", "6,6", "8,8", "10,10"]


def test_a_requeued_job_runs_the_command_that_continues_it(tmp_path):
    """Pretraining continues only with --resume; a task's own command resumes by itself."""
    for kind, argv, continuation in (
        ("pretrain", ["pretrain", "r.yaml"], ["--resume"]),
        ("task", ["eval", "linear", "--backbone", "run"], []),
    ):
        job = Job("job", kind, argv, {}, tmp_path, tmp_path / "job.log")
        first = RequeueableCommand.of(job, job.command(), {"OMP_NUM_THREADS": "1"})
        again = first.checkpoint().function
        assert (first.attempt, again.attempt) == (0, 1)
        assert again.continuation == [*job.command(), *continuation] == first.continuation
        assert (again.command, again.log, again.env) == (first.command, first.log, first.env)


def _submitit_job_pid(folder: Path) -> int | None:
    """The pid of submitit's job process (`python -m submitit.core._submit FOLDER/%j`)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if b"submitit.core._submit" in argv and any(str(folder).encode() in a for a in argv):
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds processes in /proc")
def test_submitit_job_signalled_before_its_time_limit_requeues_and_continues(
    random_run, shapes_root, tmp_path
):
    """SLURM's warning (USR2) to a job of the submitit executor, on submitit's local cluster
    (which requeues as SLURM does; with 10 minutes asked for, submitit takes any signal for the
    time limit, which requeues only a checkpointable job): the job requeues itself, and its
    command, run again, continues from the evaluator's checkpoint to an uninterrupted run's
    result."""
    cfg = OmegaConf.structured(SubmititConfig(cluster="local", timeout_min=10))
    executor = SubmititExecutor(cfg, threads=1, folder=tmp_path / "submitit")
    out = tmp_path / "requeued"
    job = Job(
        "linear/random/seed0",
        "task",
        _linear_args(random_run, shapes_root, out, "run.checkpoint_every=8"),
        {},
        out,
        tmp_path / "logs" / "linear.log",
    )
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(executor.run, job, job.command(), {})
        deadline = time.monotonic() + 600
        while saved_step(_resume_file(out)) < 8:
            assert not running.done(), f"the job ended before a checkpoint: {running.result()}"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        pid = _submitit_job_pid(tmp_path / "submitit")
        assert pid is not None, "submitit's job process not found"
        preempted_at = saved_step(_resume_file(out))
        os.kill(pid, signal.SIGUSR2)
        rc, problem = running.result(timeout=600)
    assert rc == 0, problem
    assert job.log.read_text().count("$ ") == 2  # killed, then run again (the log appended)
    sslbench(*_linear_args(random_run, shapes_root, tmp_path / "straight"), cwd=tmp_path)
    straight, requeued = _record(tmp_path / "straight"), _record(out)
    assert requeued.details["resumed_from_step"] >= preempted_at >= 8
    _assert_same_classification(straight, requeued)
