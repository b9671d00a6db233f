"""The pipeline config schema: which recipes, which tasks, which seeds, and where jobs run.

Recipes and tasks are mappings by name, so one entry can be changed from the command line
(`tasks.linear.overrides.probe.max_iter=100`). `overrides` are nested mappings of the job's own
config keys; they are flattened to the sub-command's dotted `key=value` overrides, so a mapping
merges into the recipe's (give `null` to drop a key's value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from ..config import ConfigError, build_config
from ..tasks import tasks

EXECUTORS = ("local", "submitit")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass
class RecipeEntry:
    config: str = ""  # a pretraining recipe, e.g. configs/pretrain/simclr_synthetic_r18.yaml
    overrides: Dict[str, Any] = field(default_factory=dict)  # over pretrain.overrides


@dataclass
class PretrainStage:
    # name -> recipe; the name becomes the run name, i.e. the leaderboard row
    recipes: Dict[str, RecipeEntry] = field(default_factory=dict)
    overrides: Dict[str, Any] = field(default_factory=dict)  # every recipe, before its own
    processes: int = 1  # per node; > 1: launched with torchrun --nproc_per_node
    resources: Dict[str, Any] = field(default_factory=dict)  # submitit parameters for these jobs
    nodes: int = 1  # > 1: one job over several machines (the submitit executor, on SLURM)


@dataclass
class BackboneEntry:
    """A checkpoint another codebase wrote, imported once (`sslbench import`) and then evaluated
    by every task like a pretrained backbone; its board row is marked imported."""

    checkpoint: str = ""  # the file
    format: str = "auto"  # sslbench import's FORMAT
    arch: str = ""
    arch_args: Dict[str, Any] = field(default_factory=dict)  # e.g. {stem: small, img_size: 32}
    method: Optional[str] = None  # None: what the format implies
    prefix: Optional[str] = None
    mean: Optional[List[float]] = None  # None: ImageNet's
    std: Optional[List[float]] = None


@dataclass
class TaskEntry:
    command: str = ""  # "eval TASK" or "transfer TASK", a task of the registry (sslbench/tasks.py)
    config: Optional[str] = None  # the task's recipe (configs/eval/, configs/transfer/)
    overrides: Dict[str, Any] = field(default_factory=dict)
    # Python modules the job needs beyond the core, added to those its registered task requires
    # (segmentation: mmseg). Where one cannot be imported, the task's jobs are reported
    # "unavailable" with the import error and the pipeline goes on without them.
    requires: List[str] = field(default_factory=list)
    processes: int = 1  # per node
    resources: Dict[str, Any] = field(default_factory=dict)
    nodes: int = 1  # > 1: one job over several machines (the submitit executor, on SLURM)
    # The pipeline's seeds this task runs at (None: all); an expensive task may run at fewer.
    seeds: Optional[List[int]] = None


@dataclass
class SubmititConfig:
    """submitit.AutoExecutor's parameters (cluster "local" runs the jobs as local processes)."""

    cluster: Optional[str] = None  # slurm | local | debug; None: slurm where sbatch exists
    timeout_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[int] = None
    partition: Optional[str] = None  # slurm_partition
    parameters: Dict[str, Any] = field(default_factory=dict)  # any other, e.g. slurm_qos


@dataclass
class ExecutorConfig:
    name: str = "local"  # local | submitit
    workers: int = 1  # jobs at once
    threads: Optional[int] = None  # CPU threads per job; None: local cores / workers
    # The first job to run runs alone: datasets generated on first use (synthetic-shapes) are
    # then written by one process, not raced for by several.
    first_job_alone: bool = True
    submitit: SubmititConfig = field(default_factory=SubmititConfig)


@dataclass
class LeaderboardConfig:
    reference: Optional[str] = None  # published numbers shown apart (configs/reference/)


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    output_dir: str = "runs/pipelines/${name}"
    seeds: List[int] = field(default_factory=lambda: [0])  # each seeds a pretraining and its tasks
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    backbones: Dict[str, BackboneEntry] = field(default_factory=dict)  # name -> imported row
    tasks: Dict[str, TaskEntry] = field(default_factory=dict)  # name -> task; a board column
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    leaderboard: LeaderboardConfig = field(default_factory=LeaderboardConfig)


def load_pipeline_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    cfg = build_config(PipelineConfig, paths, overrides)
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Reject what would only fail once jobs run: empty stages, bad names, unknown commands."""
    if not cfg.pretrain.recipes and not cfg.backbones:
        raise ConfigError(
            "pretrain.recipes and backbones are empty: name at least one "
            "pretraining recipe or imported backbone"
        )
    for name, entry in cfg.backbones.items():
        if name in cfg.pretrain.recipes:
            raise ConfigError(
                f"backbones.{name}: also a pretraining recipe's name (both would be one board row)"
            )
        if not entry.checkpoint or not Path(entry.checkpoint).is_file():
            raise ConfigError(f"backbones.{name}.checkpoint: file not found: {entry.checkpoint!r}")
        if not entry.arch:
            raise ConfigError(f"backbones.{name}.arch: give the backbone architecture")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)}: expected distinct seeds, at least one")
    if cfg.executor.name not in EXECUTORS:
        raise ConfigError(
            f"executor.name={cfg.executor.name!r}: expected one of {', '.join(EXECUTORS)}"
        )
    if cfg.executor.workers < 1 or (cfg.executor.threads or 1) < 1:
        raise ConfigError("executor.workers and executor.threads must be at least 1")
    multi_node = [f"tasks.{n}" for n, t in cfg.tasks.items() if t.nodes > 1]
    multi_node += ["pretrain"] if cfg.pretrain.nodes > 1 else []
    if multi_node and cfg.executor.name != "submitit":
        raise ConfigError(
            f"{multi_node[0]}.nodes > 1: a job over several machines needs "
            "executor.name=submitit (on SLURM)"
        )
    for section, entries in (
        ("pretrain.recipes", cfg.pretrain.recipes),
        ("tasks", cfg.tasks),
        ("backbones", cfg.backbones),
    ):
        for name, entry in entries.items():
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"{section}.{name}: a name may hold letters, digits, '_', "
                    f"'.', '-' (it names directories)"
                )
            if getattr(entry, "config", None) is not None and not Path(entry.config).is_file():
                raise ConfigError(f"{section}.{name}.config: file not found: {entry.config}")
    for name, task in cfg.tasks.items():
        if task.seeds is not None and (not task.seeds or set(task.seeds) - set(cfg.seeds)):
            raise ConfigError(
                f"tasks.{name}.seeds={list(task.seeds)}: expected some of the "
                f"pipeline's seeds {list(cfg.seeds)}"
            )
        bad = [m for m in task.requires if not _MODULE.fullmatch(m)]
        if bad:
            raise ConfigError(f"tasks.{name}.requires: {bad[0]!r} is not a Python module name")
        known = [f"{t.command} {t.name}" for t in map(tasks().get, tasks().in_order())]
        if task.command not in known:
            raise ConfigError(
                f"tasks.{name}.command={task.command!r}: expected 'eval TASK' or "
                f"'transfer TASK' with a registered TASK: {', '.join(known)}"
            )
