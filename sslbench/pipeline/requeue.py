"""A pipeline job as submitit's callable, so that SLURM preemption or a time limit requeues it.

SLURM warns a job with USR2 before its time limit (submitit asks for it `signal_delay_s`, 90 s,
ahead) and, where the cluster is set up to, before preempting it. submitit then calls the
callable's `checkpoint`, requeues the job with the callable that returns, and exits, which kills
the running command. Nothing has to be saved at that moment: pretraining and the long tasks
write atomic checkpoints as they go, so the requeued job only has to run the command that
continues from them (pretraining's with --resume; a task's own command, which resumes from its
work directory by itself), appending to the job's log. Each time limit counts against
submitit's max_num_timeout (3); preemptions do not.
"""

from __future__ import annotations

from submitit.helpers import Checkpointable, DelayedSubmission

from .jobs import Job, run_command


class RequeueableCommand(Checkpointable):
    """Runs `command`; after a requeue (`attempt` > 0) runs `continuation` instead."""

    def __init__(
        self,
        command: list[str],
        continuation: list[str],
        log: str,
        env: dict[str, str],
        attempt: int = 0,
    ) -> None:
        self.command, self.continuation, self.log, self.env = command, continuation, log, env
        self.attempt = attempt

    @classmethod
    def of(cls, job: Job, command: list[str], env: dict[str, str]) -> RequeueableCommand:
        return cls(command, job.command(resume=True), str(job.log), env)

    def __call__(self) -> int:
        if self.attempt == 0:
            return run_command(self.command, self.log, self.env)
        return run_command(self.continuation, self.log, self.env, append=True)

    def checkpoint(self) -> DelayedSubmission:
        """The job to requeue: this one again, continuing from what the run saved."""
        return DelayedSubmission(
            RequeueableCommand(
                self.command, self.continuation, self.log, self.env, self.attempt + 1
            )
        )
