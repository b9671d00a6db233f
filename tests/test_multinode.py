"""Several machines: a job with `nodes: N` runs pipeline/launch.py on each node, which starts
torchrun with a c10d rendezvous. Two "nodes" here are two launches on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, sslbench, subprocess_env, tiny_data_overrides
from safetensors.torch import load_file

from sslbench.config import ConfigError
from sslbench.pipeline.config import load_pipeline_config
from sslbench.pipeline.jobs import build_jobs

QUICK = ROOT / "configs" / "pipeline" / "quick.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_nodes_pretrain_as_one_process_with_the_global_batch(tmp_path, shapes_root):
    args = [
        str(ROOT / "configs/pretrain/simsiam_synthetic_r18.yaml"),
        *tiny_data_overrides(shapes_root),
        "train.epochs=1",
        "optim.batch_size=256",
        "backbone.width=8",
        "run.name=simsiam",
    ]
    sslbench("pretrain", *args, f"run.output_dir={tmp_path / 'one'}", cwd=tmp_path)
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [
        sys.executable,
        "-m",
        "sslbench.pipeline.launch",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--endpoint={endpoint}",
        "--rdzv-id=sslbench-test",
        "--",
        "pretrain",
        *args,
        f"run.output_dir={tmp_path / 'two'}",
    ]
    nodes = [
        subprocess.Popen(
            launch,
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    one = load_file(tmp_path / "one" / "simsiam" / "backbone.safetensors")
    two = load_file(tmp_path / "two" / "simsiam" / "backbone.safetensors")
    assert one.keys() == two.keys()
    # Two steps. The launcher adds nothing: measured, two launches give bit-identical weights to
    # `torchrun --standalone --nproc_per_node=2`. That 2-process run differs from one process by
    # float32 reduction order (all-reduce, cross-process BN): at most 2.6e-4 here after two steps.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-3, msg=name)
    manifest = (tmp_path / "two" / "simsiam" / "backbone.json").read_text()
    assert '"world_size": 2' in manifest or '"world_size":2' in manifest


def test_a_multi_node_job_is_started_through_the_launcher(tmp_path):
    cfg = load_pipeline_config(
        [QUICK], ["executor.name=submitit", "pretrain.nodes=2", "pretrain.processes=4"]
    )
    pretrain = next(job for job in build_jobs(cfg, tmp_path) if job.kind == "pretrain")
    command = pretrain.command()
    assert (
        command[1:6] == ["-m", "sslbench.pipeline.launch", "--nnodes=2", "--nproc-per-node=4", "--"]
        and command[6] == "pretrain"
    )
    with pytest.raises(ConfigError, match="pretrain.nodes > 1: .* needs executor.name=submitit"):
        load_pipeline_config([QUICK], ["pretrain.nodes=2"])
