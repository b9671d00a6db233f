"""The task registry: every evaluation and transfer task, registered once.

A task is what turns a backbone artifact into a result record (docs/design.md). It registers one
`Task`: its name (the record's `task`, the board's column), the CLI command group that runs it,
its config loader and run function, and the metric the leaderboard ranks it by. The CLI, the
record validator, the pipeline and the leaderboard all read this table, so adding a task is its
module plus its recipes (docs/extending.md).

The core never imports a stage: built-in tasks register from modules found through the
`sslbench.tasks` entry-point group (pyproject.toml names `evaluators.tasks` and
`transfer.tasks`), and more modules can be named in $SSLBENCH_TASK_MODULES (comma-separated).
`config` and `run` are "module:attribute" strings resolved on use, so reading the table (to
validate a record, say) imports neither torch nor faiss.

    register_task(Task(name="knn", command="eval", summary="weighted kNN on frozen features",
                       config="evaluators.config:knn_config", run="evaluators.knn:run",
                       metric="top1"))
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any

from .registry import Registry

ENTRY_POINT_GROUP = "sslbench.tasks"
MODULES_ENV = "SSLBENCH_TASK_MODULES"
# Under a task's results directory, where it keeps resumable state until its record is written:
# hidden, so the record scan skips it; the pipeline keeps it when it reruns an interrupted job.
WORK_DIR = ".work"
# The stage that owns each command group calls a task's `run` with that group's arguments:
#   eval:     run(ctx: evaluators.context.EvalContext) -> TaskOutput
#   transfer: run(cfg, backbone_dir, out_dir) -> the written record's path (None off the main rank)
COMMANDS = ("eval", "transfer")


@dataclass(frozen=True)
class Task:
    name: str
    command: str  # one of COMMANDS: `sslbench eval NAME` or `sslbench transfer NAME`
    summary: str  # one line, shown by --help
    config: str  # "module:function" with (paths, overrides) -> DictConfig
    run: str  # "module:function", called as COMMANDS' comment says
    metric: str  # the metric the leaderboard ranks by
    higher_is_better: bool = True
    requires: tuple[str, ...] = ()  # modules beyond the core's dependencies (e.g. "mmseg")
    config_required: bool = False  # the task has no built-in default recipe

    def __post_init__(self):
        if self.command not in COMMANDS:
            raise ValueError(
                f"task {self.name!r}: command {self.command!r}, expected one of {COMMANDS}"
            )
        for field in ("config", "run"):
            value = getattr(self, field)
            if value.count(":") != 1:
                raise ValueError(
                    f"task {self.name!r}: {field}={value!r}, expected 'module:attribute'"
                )

    def load_config(self, paths=(), overrides=()):
        return resolve(self.config)(paths, overrides)

    def run_function(self):
        return resolve(self.run)


TASKS: Registry[Task] = Registry("task")
_loaded = False


def register_task(task: Task) -> Task:
    TASKS.register(task.name)(task)
    return task


def resolve(reference: str) -> Any:
    """The object a "module:attribute" string names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def task_modules() -> list[str]:
    """The modules that register tasks: the entry points', then $SSLBENCH_TASK_MODULES'."""
    found = [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    extra = [m.strip() for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]
    return list(dict.fromkeys([*sorted(found), *extra]))


def tasks() -> Registry[Task]:
    """The registry, with every task module imported once."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in task_modules():
            importlib.import_module(module)
        if not TASKS.names():
            raise RuntimeError(
                f"no task is registered: sslbench's entry points "
                f"({ENTRY_POINT_GROUP}) are missing; reinstall the package "
                "(pip install -e .)"
            )
    return TASKS


def get_task(name: str) -> Task:
    return tasks().get(name)


def tasks_of(command: str) -> list[Task]:
    """The tasks `sslbench COMMAND` runs, by name."""
    registry = tasks()
    return [registry.get(n) for n in registry.names() if registry.get(n).command == command]
