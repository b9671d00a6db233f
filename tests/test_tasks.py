"""The task registry: a task registered once reaches the CLI, the records and the leaderboard.

The toy evaluator below lives in a temporary module that no file of the repository names: it is
found through $SSLBENCH_TASK_MODULES only, so passing here means adding an evaluator needs its
module and nothing else.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ROOT, TINY_SHAPES, random_init_artifact, subprocess_env

from sslbench.data import build_dataset
from sslbench.tasks import COMMANDS, MODULES_ENV, Task, get_task, tasks

TOY_MODULE = '''
"""A nearest-class-mean classifier on frozen features: a task no repository file names."""
from dataclasses import dataclass, field

import torch.nn.functional as F

from evaluators.config import DataConfig, FeaturesConfig, RunConfig
from sslbench.config import build_config
from sslbench.results import TaskOutput
from sslbench.tasks import Task, register_task


@dataclass
class ToyOptions:
    normalize: bool = True


@dataclass
class ToyConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    toy: ToyOptions = field(default_factory=ToyOptions)


def load(paths=(), overrides=()):
    return build_config(ToyConfig, paths, overrides)


def run(ctx):
    train, test = ctx.features("train"), ctx.features("test")
    prep = (lambda x: F.normalize(x, dim=1)) if ctx.cfg.toy.normalize else (lambda x: x)
    means = F.one_hot(train.labels).T.float() @ prep(train.features)
    predicted = (prep(test.features) @ prep(means).T).argmax(1)
    top1 = 100 * (predicted == test.labels).float().mean().item()
    return TaskOutput({"top1": top1}, {"toy": {"normalize": ctx.cfg.toy.normalize}},
                      {"predictions": predicted.tolist()})


register_task(Task(name="toy", command="eval", summary="nearest class mean (a plugin)",
                   config="toy_task:load", run="toy_task:run", metric="top1"))
'''


def test_built_in_tasks_are_registered_with_their_ranked_metric():
    registry = tasks()
    assert registry.in_order() == ["knn", "linear", "semisup", "detection", "segmentation"]
    assert {name: registry.get(name).metric for name in registry.in_order()} == {
        "knn": "top1",
        "linear": "top1",
        "semisup": "top1",
        "detection": "bbox_AP",
        "segmentation": "mIoU",
    }
    assert get_task("segmentation").requires == ("mmseg",)
    assert all(registry.get(name).command in COMMANDS for name in registry.in_order())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"command": "evaluate"}, "command 'evaluate'"),
        ({"run": "evaluators.knn.run"}, "expected 'module:attribute'"),
    ],
)
def test_a_malformed_task_is_refused(kwargs, message):
    fields = {
        "name": "bad",
        "command": "eval",
        "summary": "s",
        "config": "m:f",
        "run": "m:g",
        "metric": "top1",
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        Task(**fields)


def _run(args, cwd, env):
    proc = subprocess.run(
        [sys.executable, "-m", "sslbench.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.integration
def test_a_task_registered_in_a_temporary_module_runs_through_the_cli_and_the_board(
    tmp_path, shapes_root
):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "toy_task.py").write_text(textwrap.dedent(TOY_MODULE))
    env = subprocess_env()
    env.update({"PYTHONPATH": f"{ROOT}:{plugin}", MODULES_ENV: "toy_task"})
    run_dir = random_init_artifact(tmp_path / "runs" / "random", stem="imagenet")
    out = tmp_path / "results"
    options = ", ".join(f"{k}: {v}" for k, v in TINY_SHAPES.items())
    data = [
        f"data.root={shapes_root}",
        f"data.options={{{options}}}",
        "data.image_size=16",
        "run.progress=false",
        "run.threads=1",
    ]

    assert "nearest class mean" in _run(["eval", "--help"], tmp_path, env).stdout
    shown = _run(
        [
            "eval",
            "toy",
            "--backbone",
            str(run_dir),
            "--out",
            str(out),
            *data,
            "toy.normalize=false",
        ],
        tmp_path,
        env,
    )
    (record_path,) = [p for p in out.glob("toy-*.json")]
    assert str(record_path) in shown.stdout

    # The record is complete (identity, data protocol, wall time, device), and its number is the
    # nearest-class-mean accuracy of the predictions it lists.
    record = json.loads(record_path.read_text())
    assert record["task"] == "toy" and record["protocol"]["toy"] == {"normalize": False}
    assert record["protocol"]["data"]["image_size"] == 16 and record["device"] == "cpu"
    assert record["backbone"]["run_name"] == "random" and record["wall_time_s"] > 0
    assert record["details"]["world_size"] == 1 and record["dataset"]["splits"]["test"] == 192
    predictions = torch.tensor(record["details"]["predictions"])
    labels = torch.tensor(
        build_dataset("synthetic-shapes", shapes_root, "test", **TINY_SHAPES).targets
    )
    assert record["metrics"]["top1"] == pytest.approx(
        100 * (predictions == labels).float().mean().item()
    )

    _run(["leaderboard", str(out)], tmp_path, env)
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["random"]
    (column,) = [c for c in rows[0] if c.startswith("toy:") and c.endswith(":top1:mean")]
    assert float(rows[0][column]) == pytest.approx(record["metrics"]["top1"])

    # Without the plugin the record is refused by name, never silently read as another task.
    env.pop(MODULES_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "sslbench.cli", "results", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "field 'task'" in proc.stderr and MODULES_ENV in proc.stderr
