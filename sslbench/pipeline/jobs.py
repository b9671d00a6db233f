"""The pipeline's job graph, and how a job is keyed, found done, prepared and run.

A job is one `sslbench` sub-command run as a subprocess: the orchestrator imports no stage, and a
job that crashes takes only itself down. Each job owns an output directory (the leaderboard writes
into the pipeline's) with a marker file beside its products holding the job's key: the sha256 of
its spec (sub-command, config file contents, overrides, seed, sslbench version) and of what its
inputs were (the backbone's weights sha256 for a task; the task keys for the leaderboard). A job
is done only when the marker says "done" under the same key and its products exist, so an output
written under another config is rerun, never taken as done.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .. import __version__
from ..artifact import read_manifest
from ..io import sha256_file, write_json_atomic
from ..tasks import WORK_DIR, get_task

MARKER = ".sslbench-job.json"
BACKBONE = ("backbone.json", "backbone.safetensors")
PRODUCTS = {
    "pretrain": BACKBONE,
    "import": BACKBONE,
    "task": ("*.json",),
    "leaderboard": ("leaderboard.md", "leaderboard.csv", "leaderboard.html"),
}


@dataclass
class Job:
    id: str  # e.g. pretrain/simclr/seed0, knn/simclr/seed0, leaderboard
    kind: str  # pretrain | import | task | leaderboard
    argv: list[str]  # the sub-command's arguments, after `sslbench`
    spec: dict[str, Any]  # what decides its output, without paths
    out_dir: Path
    log: Path
    deps: list[Job] = field(default_factory=list)
    processes: int = 1  # per node
    resources: dict[str, Any] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)  # modules it imports beyond the core
    nodes: int = 1  # > 1: a multi-node job (submitit on SLURM), started by pipeline/launch.py

    @property
    def marker(self) -> Path:
        return self.out_dir / MARKER

    def has_products(self) -> bool:
        return all(
            any(not p.name.startswith(".") for p in self.out_dir.glob(pattern))
            for pattern in PRODUCTS[self.kind]
        )

    def result_id(self, key: str) -> str:
        """What dependants are keyed by: a backbone by its weights, anything else by its key."""
        if self.kind in ("pretrain", "import"):
            return read_manifest(self.out_dir)["weights_sha256"]
        return key

    def command(self, resume: bool = False) -> list[str]:
        """The full command line: one process, torchrun for `processes` > 1, or on each node of
        a multi-node job the launcher that starts torchrun with a c10d rendezvous."""
        launcher = [sys.executable, "-m", "sslbench.cli"]
        if self.nodes > 1:
            launcher = [
                sys.executable,
                "-m",
                "sslbench.pipeline.launch",
                f"--nnodes={self.nodes}",
                f"--nproc-per-node={self.processes}",
                "--",
            ]
        elif self.processes > 1:
            launcher = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.processes}",
                "-m",
                "sslbench.cli",
            ]
        flag = resume and self.kind == "pretrain"  # a task resumes from its work dir by itself
        return [*launcher, *self.argv, *(["--resume"] if flag else [])]


def task_jobs(cfg: DictConfig, name: str, backbone: Job, seed: int, out: Path) -> list[Job]:
    """Every task of the pipeline on the backbone `backbone` writes, with evaluation seed `seed`."""
    jobs = []
    for task_name, task in cfg.tasks.items():
        if task.seeds is not None and seed not in task.seeds:
            continue
        overrides = [*dotted(_container(task.overrides)), f"run.seed={seed}"]
        config = ["--config", task.config] if task.config else []
        results = out / "results" / f"seed{seed}" / name / task_name
        jobs.append(
            Job(
                f"{task_name}/{name}/seed{seed}",
                "task",
                [
                    *task.command.split(),
                    "--backbone",
                    str(backbone.out_dir),
                    *config,
                    "--out",
                    str(results),
                    *overrides,
                ],
                {
                    "command": task.command,
                    "overrides": overrides,
                    "sslbench": __version__,
                    "config": _content(task.config) if task.config else None,
                },
                results,
                out / "logs" / f"{task_name}-{name}-seed{seed}.log",
                [backbone],
                task.processes,
                _container(task.resources),
                list(dict.fromkeys([*get_task(task.command.split()[1]).requires, *task.requires])),
                task.nodes,
            )
        )
    return jobs


def import_job(name: str, entry: DictConfig, out: Path) -> Job:
    """`sslbench import` of one `backbones:` entry into runs/imported/NAME, keyed by the
    checkpoint's contents and every option."""
    run_dir = out / "runs" / "imported" / name
    options = ["--arch", entry.arch, *(f"--arch-arg={k}={v}" for k, v in entry.arch_args.items())]
    options += ["--method", entry.method] if entry.method else []
    options += ["--prefix", entry.prefix] if entry.prefix else []
    for flag in ("mean", "std"):
        if entry[flag] is not None:
            options += [f"--{flag}", *(str(v) for v in entry[flag])]
    return Job(
        f"import/{name}",
        "import",
        ["import", entry.format, entry.checkpoint, *options, "--out", str(run_dir)],
        {
            "command": "import",
            "checkpoint": _content(entry.checkpoint),
            "format": entry.format,
            "options": options,
            "sslbench": __version__,
        },
        run_dir,
        out / "logs" / f"import-{name}.log",
    )


def dotted(overrides: Mapping) -> list[str]:
    """A nested mapping of config keys as the sub-commands' `a.b=value` overrides."""
    items = []

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and value:
                walk(value, f"{prefix}{key}.")
            else:  # JSON is YAML, the syntax overrides are parsed with
                items.append(f"{prefix}{key}={json.dumps(value)}")

    walk(overrides, "")
    return items


def _content(path: str) -> str:
    """A config file by its contents, not its path: moving the project reruns nothing."""
    return sha256_file(path)


def _container(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def build_jobs(cfg: DictConfig, out: Path) -> list[Job]:
    """Every (recipe, seed) pretraining and every imported backbone, their tasks, and the
    leaderboard over all tasks, in an order where each job comes after its dependencies."""
    jobs, tasks = [], []
    common = _container(cfg.pretrain.overrides)
    for name, entry in cfg.backbones.items():
        imported = import_job(name, entry, out)
        jobs.append(imported)
        for seed in cfg.seeds:
            tasks += task_jobs(cfg, name, imported, seed, out)
    for seed in cfg.seeds:
        for name, recipe in cfg.pretrain.recipes.items():
            overrides = [
                *dotted(_container(OmegaConf.merge(common, recipe.overrides))),
                f"run.seed={seed}",
                f"run.name={name}",
            ]
            runs = out / "runs" / f"seed{seed}"
            pre = Job(
                f"pretrain/{name}/seed{seed}",
                "pretrain",
                ["pretrain", recipe.config, *overrides, f"run.output_dir={runs}"],
                {
                    "command": "pretrain",
                    "config": _content(recipe.config),
                    "overrides": overrides,
                    "sslbench": __version__,
                },
                runs / name,
                out / "logs" / f"pretrain-{name}-seed{seed}.log",
                processes=cfg.pretrain.processes,
                resources=_container(cfg.pretrain.resources),
                nodes=cfg.pretrain.nodes,
            )
            jobs.append(pre)
            tasks += task_jobs(cfg, name, pre, seed, out)
    jobs += tasks
    if tasks:
        reference = cfg.leaderboard.reference
        jobs.append(
            Job(
                "leaderboard",
                "leaderboard",
                [
                    "leaderboard",
                    str(out / "results"),
                    "--out",
                    str(out),
                    *(["--reference", reference] if reference else []),
                ],
                {
                    "command": "leaderboard",
                    "sslbench": __version__,
                    "reference": _content(reference) if reference else None,
                },
                out,
                out / "logs" / "leaderboard.log",
                tasks,
            )
        )
    return jobs


def job_key(job: Job, inputs: list[str]) -> str:
    blob = json.dumps({"spec": job.spec, "inputs": sorted(inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_marker(job: Job) -> dict | None:
    try:
        return json.loads(job.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(job: Job, key: str, status: str, seconds: float | None = None) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(
        job.marker,
        {
            "job": job.id,
            "key": key,
            "status": status,
            "time": now,
            "seconds": seconds,
            "spec": job.spec,
        },
    )


class ForeignOutputError(RuntimeError):
    """A job's output directory holds files this pipeline did not write."""


def prepare(job: Job, key: str) -> bool:
    """Make the job's directory ready for a run under `key`; returns whether it resumes.

    A job interrupted under the same key keeps what it saved: a pretraining its checkpoint (the
    command then gets --resume), a task its hidden work directory (the task's own command finds
    its checkpoint there and continues, refusing one saved under another recipe). Any other
    earlier output of this job (another key, a failed task with nothing saved) is removed so
    nothing stale survives. The pipeline's own directory (the leaderboard's) is never removed.
    """
    marker = read_marker(job)
    resume = False
    if job.kind != "leaderboard" and job.out_dir.is_dir() and any(job.out_dir.iterdir()):
        if marker is None:
            raise ForeignOutputError(
                f"{job.out_dir} holds files this pipeline did not write; "
                f"move them or choose another output_dir"
            )
        saved = job.out_dir / ("checkpoint.pt" if job.kind == "pretrain" else WORK_DIR)
        resume = (
            job.kind in ("pretrain", "task")
            and marker.get("key") == key
            and (saved.is_file() or (saved.is_dir() and any(saved.iterdir())))
        )
        if not resume:
            shutil.rmtree(job.out_dir)
    write_marker(job, key, "started")
    return resume


def run_command(command: list[str], log: str, env: dict[str, str], append: bool = False) -> int:
    """Run one job's command with its output in `log`; module-level so submitit can pickle it.
    On the nodes after the first of a multi-node job, the log is LOG.nodeN."""
    node = int(os.environ.get("SLURM_NODEID", "0"))
    log = log if node == 0 else f"{log}.node{node}"
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if append else "w", encoding="utf-8") as f:  # append: a requeued job
        f.write(f"$ {subprocess.list2cmdline(command)}\n")
        f.flush()
        return subprocess.run(
            command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}
        ).returncode


def missing_modules(modules: list[str]) -> str | None:
    """None when every module imports (in a fresh interpreter, as the jobs will); otherwise the
    import error, e.g. "mmseg: No module named 'mmcv'"."""
    probe = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        sys.exit(f'{name}: {type(err).__name__}: {err}'.splitlines()[0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *modules], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"importing {', '.join(modules)} exited {proc.returncode}"


def error_line(log: Path) -> str:
    """The line of a failed job's log that says what went wrong: the last `...: error: ...` line
    of an sslbench command, else a traceback's last line, else ''."""
    lines = [line.strip() for line in tail(log, 40) if line.strip()]
    for line in reversed(lines):
        if ": error: " in line:
            return line
    last = lines[-1] if lines else ""
    return last if "Error" in last or "Exception" in last else ""


def tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []
