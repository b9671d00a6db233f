"""Start one node's share of a multi-node job: torchrun with a c10d rendezvous.

    python -m sslbench.pipeline.launch --nnodes 2 --nproc-per-node 8 -- pretrain RECIPE.yaml ...

runs on every node of the job (the pipeline's submitit executor asks SLURM for `nodes` tasks, one
per node). Every node meets at the rendezvous endpoint, the job's first host unless --endpoint
says otherwise, under the job's id, and torchrun numbers the processes; the job's sub-command then
runs as on one node: rank 0 alone writes checkpoints, artifacts and records, into the run
directory every node reads on the shared filesystem.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 29400


def torchrun_command(
    argv: list[str], nnodes: int, nproc_per_node: int, endpoint: str, rdzv_id: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        "-m",
        "sslbench.cli",
        *argv,
    ]


def _from_scheduler(port: int) -> tuple[str, str]:
    """(endpoint, rendezvous id) of the submitit/SLURM job this process runs in."""
    import submitit

    env = submitit.JobEnvironment()
    return f"{env.hostnames[0]}:{port}", str(env.job_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sslbench.pipeline.launch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument(
        "--endpoint",
        help=f"HOST:PORT of the rendezvous (default: the job's first host, port {DEFAULT_PORT})",
    )
    parser.add_argument("--rdzv-id", help="the rendezvous id (default: the job's id)")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- then the sslbench sub-command and its arguments",
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.nnodes < 1 or args.nproc_per_node < 1:
        parser.error("expected --nnodes N >= 1, --nproc-per-node P >= 1 and -- COMMAND ...")
    endpoint, rdzv_id = args.endpoint, args.rdzv_id
    if endpoint is None or rdzv_id is None:
        scheduled = _from_scheduler(DEFAULT_PORT)
        endpoint, rdzv_id = endpoint or scheduled[0], rdzv_id or scheduled[1]
    full = torchrun_command(command, args.nnodes, args.nproc_per_node, endpoint, rdzv_id)
    os.execv(full[0], full)  # this node's processes replace the launcher; its exit code is theirs


if __name__ == "__main__":
    sys.exit(main())
