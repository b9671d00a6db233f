"""Running the job graph: dependencies, skipping what is done, failures contained, a summary.

The scheduler runs in one thread and hands ready jobs to `workers` threads, each of which blocks
on one job: a local subprocess, or a submitit job (SLURM, or submitit's local executor) waited
for with `job.result()`. A failed job blocks its dependants and nothing else. The leaderboard
runs on whatever tasks succeeded, so one failure does not cost the whole board.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from .jobs import (
    PRODUCTS,
    ForeignOutputError,
    Job,
    error_line,
    job_key,
    missing_modules,
    prepare,
    read_marker,
    run_command,
    tail,
    write_marker,
)

# unavailable: a module the task requires does not import here; failed: it ran and did not
# finish; blocked: an upstream job failed (or none of the leaderboard's tasks finished).
STATUSES = ("ran", "skipped (done)", "unavailable", "failed", "blocked")
FINISHED = ("ran", "skipped (done)")


@dataclass
class Outcome:
    job: Job
    status: str  # one of STATUSES
    seconds: float | None = None  # this run's; for a skipped job, the run that made its output
    message: str = ""
    key: str = ""


def thread_env(threads: int) -> dict[str, str]:
    """The environment that caps a job's CPU threads (torch reads OMP_NUM_THREADS at start-up)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class LocalExecutor:
    """Jobs as subprocesses of this machine, each with `threads` CPU threads."""

    def __init__(self, threads: int) -> None:
        self.env = thread_env(threads)

    def describe(self) -> str:
        return f"local, {self.env['OMP_NUM_THREADS']} thread(s) per job"

    def run(self, job: Job, command: list[str], env: dict[str, str]) -> tuple[int, str]:
        return run_command(command, str(job.log), {**env, **self.env}), ""


class SubmititExecutor:
    """Jobs through submitit's AutoExecutor: SLURM on a cluster, or its local executor. A job
    requeues itself on preemption or at its time limit (requeue.RequeueableCommand)."""

    def __init__(self, cfg: DictConfig, threads: int | None, folder: Path) -> None:
        import submitit

        self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cfg.cluster)
        extra = OmegaConf.to_container(cfg.parameters, resolve=True)
        self.parameters = {
            "timeout_min": cfg.timeout_min,
            "gpus_per_node": cfg.gpus_per_node,
            "cpus_per_task": cfg.cpus_per_task,
            "mem_gb": cfg.mem_gb,
            "slurm_partition": cfg.partition,
            **extra,
        }  # type: ignore[dict-item]
        self.env = thread_env(threads or cfg.cpus_per_task)
        self.lock = threading.Lock()  # update_parameters + submit must not interleave

    def describe(self) -> str:
        return f"submitit ({self.executor.cluster})"

    def run(self, job: Job, command: list[str], env: dict[str, str]) -> tuple[int, str]:
        from .requeue import RequeueableCommand  # imports submitit, as this executor alone does

        with self.lock:
            self.executor.update_parameters(
                **{
                    **self.parameters,
                    **job.resources,
                    "nodes": job.nodes,
                    "tasks_per_node": 1,
                    "name": job.id,
                }
            )
            submitted = self.executor.submit(
                RequeueableCommand.of(job, command, {**env, **self.env})
            )
        print(f"          {job.id}: submitit job {submitted.job_id}", flush=True)
        try:
            return submitted.result(), ""
        except Exception as err:  # the scheduler killed it, it timed out, it could not start
            return -1, (
                f"submitit job {submitted.job_id} did not complete: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}; "
                f"see {submitted.paths.stderr}"
            )


def make_executor(cfg: DictConfig, out: Path) -> LocalExecutor | SubmititExecutor:
    if cfg.name == "submitit":
        return SubmititExecutor(cfg.submitit, cfg.threads, out / "submitit")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return LocalExecutor(cfg.threads or max(1, (cores or 1) // cfg.workers))


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(seconds, 60)
    return f"{int(minutes)}m{sec:04.1f}s" if minutes else f"{sec:.1f}s"


class Scheduler:
    def __init__(
        self,
        jobs: list[Job],
        executor: LocalExecutor | SubmititExecutor,
        workers: int,
        env: dict[str, str],
        echo: Callable[[str], None] = print,
        first_job_alone: bool = True,
    ) -> None:
        self.jobs, self.executor, self.workers, self.env = jobs, executor, workers, env
        self.echo = echo
        self.outcomes: dict[str, Outcome] = {}
        self.inputs: dict[str, str] = {}  # job id -> what dependants are keyed by
        self.missing: dict[tuple[str, ...], str | None] = {}  # requires -> import error
        # Until the first job that runs has finished, nothing else starts (it may generate the
        # data every other job reads).
        self.alone = first_job_alone

    def _report(self, outcome: Outcome) -> None:
        self.outcomes[outcome.job.id] = outcome
        shown = _fmt_seconds(outcome.seconds)
        if outcome.status == "skipped (done)":
            shown = f"done earlier in {shown}"
        self.echo(
            f"[{len(self.outcomes):>{len(str(len(self.jobs)))}}/{len(self.jobs)}] "
            f"{outcome.status:<8} {outcome.job.id}  {shown}"
            + (f"  ({outcome.message})" if outcome.message else "")
            + (f"  log: {outcome.job.log}" if outcome.status == "failed" else "")
        )

    def _upstream(self, job: Job) -> tuple[str, list[Outcome]] | None:
        """(state, finished deps): "wait" until every dep finished, then "run" or "blocked"."""
        deps = [self.outcomes.get(dep.id) for dep in job.deps]
        if any(d is None for d in deps):
            return None
        ok = [d for d in deps if d.status in FINISHED]  # type: ignore[union-attr]
        # The leaderboard needs one finished task; anything else needs all of its inputs.
        needed = bool(ok) if job.kind == "leaderboard" else len(ok) == len(deps)
        return ("run" if needed else "blocked"), ok

    def _start(self, job: Job, ok: list[Outcome]) -> Outcome | tuple[str, bool]:
        """Skip a done job; otherwise prepare its directory and return (key, resume)."""
        key = job_key(job, [self.inputs[d.job.id] for d in ok])
        marker = read_marker(job)
        if (
            marker
            and marker.get("key") == key
            and marker.get("status") == "done"
            and job.has_products()
        ):
            return Outcome(job, "skipped (done)", marker.get("seconds"), key=key)
        if job.requires:
            requires = tuple(job.requires)
            if requires not in self.missing:
                self.missing[requires] = missing_modules(job.requires)
            if self.missing[requires]:
                return Outcome(
                    job, "unavailable", message=f"cannot import {self.missing[requires]}", key=key
                )
        try:
            return key, prepare(job, key)
        except (ForeignOutputError, OSError) as err:
            return Outcome(job, "failed", message=str(err), key=key)

    def _run(self, job: Job, key: str, resume: bool) -> Outcome:
        started = time.perf_counter()
        rc, problem = self.executor.run(job, job.command(resume), self.env)
        seconds = time.perf_counter() - started
        if rc == 0 and not job.has_products():
            rc, problem = -1, f"exited 0 without writing {', '.join(PRODUCTS[job.kind])}"
        if rc != 0:
            if not problem:
                line = error_line(job.log)
                problem = f"exit {rc}" + (f": {line[:300]}" if line else "")
            return Outcome(job, "failed", seconds, problem, key)
        write_marker(job, key, "done", round(seconds, 1))
        return Outcome(job, "ran", seconds, key=key)

    def run(self) -> list[Outcome]:
        waiting = list(self.jobs)
        running: dict[Future, Job] = {}
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            while waiting or running:
                progressed = True
                while progressed:
                    progressed = False
                    for job in list(waiting):
                        upstream = self._upstream(job)
                        busy = len(running) >= (1 if self.alone and running else self.workers)
                        if upstream is None or (upstream[0] == "run" and busy):
                            continue
                        waiting.remove(job)
                        progressed = True
                        state, ok = upstream
                        if state == "blocked":
                            failed = [
                                d.id
                                for d in job.deps
                                if self.outcomes[d.id].status in ("failed", "blocked")
                            ]
                            self._report(
                                Outcome(
                                    job,
                                    "blocked",
                                    message=(
                                        f"upstream failed: {', '.join(failed)}"
                                        if failed
                                        else "no upstream job finished"
                                    ),
                                )
                            )
                            continue
                        started = self._start(job, ok)
                        if isinstance(started, Outcome):
                            self._finish(started)
                            continue
                        key, resume = started
                        self.echo(
                            f"{'':>{2 * len(str(len(self.jobs))) + 3}} start    {job.id}"
                            + ("  (resuming)" if resume else "")
                        )
                        running[pool.submit(self._run, job, key, resume)] = job
                if running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        running.pop(future)
                        self._finish(future.result())
                        self.alone = False
        return [self.outcomes[job.id] for job in self.jobs]

    def _finish(self, outcome: Outcome) -> None:
        if outcome.status in FINISHED:
            self.inputs[outcome.job.id] = outcome.job.result_id(outcome.key)
        self._report(outcome)


def summary(outcomes: list[Outcome], wall: float) -> str:
    """The end-of-run table, then each failure with its log's last lines."""
    width = max(len(o.job.id) for o in outcomes)
    lines = [f"{'job':<{width}}  {'status':<14}  time", f"{'-' * width}  {'-' * 14}  ----"]
    for o in outcomes:
        shown = _fmt_seconds(o.seconds) + (
            " (earlier run)" if o.status == "skipped (done)" and o.seconds is not None else ""
        )
        lines.append(
            f"{o.job.id:<{width}}  {o.status:<14}  {shown}"
            + (f"  {o.message}" if o.status in ("blocked", "unavailable") else "")
        )
    counts = {status: sum(o.status == status for o in outcomes) for status in STATUSES}
    lines.append(
        f"{len(outcomes)} jobs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; {_fmt_seconds(wall)} wall time"
    )
    for o in outcomes:
        if o.status == "failed":
            lines += [
                "",
                f"FAILED {o.job.id}: {o.message}",
                f"  log: {o.job.log}",
                *(f"  | {line}" for line in tail(o.job.log)),
            ]
    return "\n".join(lines)
