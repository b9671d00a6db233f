"""The fast pretraining step (issue 13 item 3): no host sync per step, torch.compile as an option,
multi-tensor / fused optimisers, persistent loader workers, DDP without buffer broadcasts, and
collapse diagnostics computed once."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from distributed import assert_steps_match, one_and_two_processes
from method_checks import SMALL
from omegaconf import OmegaConf
from test_optim import lars_reference
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain import engine
from pretrain.config import load_pretrain_config
from pretrain.diagnostics import collapse_diagnostics, singular_values
from pretrain.sampling import EpochBatchSampler, MultiViewDataset
from sslbench import distributed as D
from sslbench.optim import LARS, all_on_cuda, build_optimizer, param_groups

ROOT = Path(__file__).resolve().parents[1]
CPU = D.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BATCH, IMAGE = 8, 16


def tiny_training(
    tmp_path: Path, *overrides: str, env: D.DistEnv = CPU, method: str = "byol"
) -> engine.Training:
    """`method`'s recipe on a width-4 ResNet-18 at 16 px, 4 steps per epoch of 32 images, on the
    CPU."""
    cfg = load_pretrain_config(
        [ROOT / "configs" / "pretrain" / f"{method}_synthetic_r18.yaml"],
        [
            "backbone.width=4",
            f"data.image_size={IMAGE}",
            f"optim.batch_size={BATCH}",
            "train.epochs=2",
            "train.device=cpu",
            "train.progress=false",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return engine.build_training(
        cfg, env, tmp_path, engine.Schedule.of(cfg, 4 * BATCH), resume=False, num_classes=2
    )


def random_views(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen) for _ in range(2)]


class HostReads(TorchDispatchMode):
    """Records the ops that copy a tensor's value to the host (`.item()`, `bool()`, `nonzero`)."""

    SYNCING = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


# ---- 1. no host sync per step; a non-finite loss still stops the run before a save -------------


# an EMA target; UniGrad's F buffer; the contrastive masks; MoCo's queue
@pytest.mark.parametrize("method", ["byol", "unigrad", "simclr", "mocov2", "mocov3"])
def test_a_step_reads_nothing_back_from_the_device(tmp_path, method):
    t = tiny_training(tmp_path, method=method)
    engine.train_step(t, random_views(0), torch.zeros(BATCH))  # first-step set-up aside
    with HostReads() as reads:
        for seed in range(1, 3):
            engine.train_step(t, random_views(seed), torch.zeros(BATCH))
    assert reads.ops == []
    assert len(t.unchecked) == 3 and t.step == 3
    engine.check_finite(t)  # all finite: the queue empties
    assert t.unchecked == []


def test_the_first_non_finite_loss_since_the_last_check_is_named(tmp_path):
    t = tiny_training(tmp_path)
    t.step = 7
    t.unchecked[:] = [
        torch.tensor(1.0),
        torch.tensor(2.0),
        torch.tensor(math.inf),
        torch.tensor(math.nan),
    ]
    with pytest.raises(engine.NonFiniteLossError, match=r"loss is inf at step 5 \(epoch 1\)"):
        engine.check_finite(t)


def test_a_checkpoint_is_not_written_after_an_unchecked_non_finite_loss(tmp_path):
    t = tiny_training(tmp_path)
    t.step = 2
    t.unchecked[:] = [torch.tensor(1.0), torch.tensor(math.nan)]
    with pytest.raises(engine.NonFiniteLossError, match="none was written before it"):
        engine.save_resume_state(t)
    assert not (tmp_path / engine.CHECKPOINT_FILE).exists()


def test_a_forward_that_fails_on_broken_weights_reports_the_non_finite_loss(tmp_path):
    t = tiny_training(tmp_path)
    t.unchecked.append(torch.tensor(math.nan))
    t.step = 1

    def decomposition_of_nan(*_):
        raise RuntimeError("linalg.cholesky: The factorization could not be completed")

    t.model = decomposition_of_nan
    with pytest.raises(engine.NonFiniteLossError, match="loss is nan at step 0"):
        engine.train_step(t, random_views(0), torch.zeros(BATCH))


def test_logging_is_one_all_reduce_of_every_scalar(tmp_path, monkeypatch):
    t = tiny_training(tmp_path)
    reduced = []
    monkeypatch.setattr(D, "all_reduce_mean", lambda x: reduced.append(x) or x)
    out = {"loss": torch.tensor(1.5), "logs": {"pos_sim": torch.tensor(0.25), "fill": 0.5}}
    engine._log_train(t, out, lr=0.1)
    assert len(reduced) == 1 and reduced[0].shape == (3,)
    t.log.close()
    rows = (tmp_path / "train.csv").read_text().splitlines()
    assert rows == ["step,loss,pos_sim,fill,lr", "0,1.5,0.25,0.5,0.1"]


# ---- 2. torch.compile ------------------------------------------------------------------------


def _compile_works() -> str | None:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as err:  # noqa: BLE001 - any failure means no compiler on this machine
        return f"torch.compile does not run here: {type(err).__name__}: {err}"[:300]
    return None


@pytest.mark.integration  # compiling a ResNet's forward and backward takes minutes on a CPU
def test_a_compiled_step_matches_the_eager_one(tmp_path):
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    eager = tiny_training(tmp_path / "eager")
    compiled = tiny_training(tmp_path / "compiled", "train.compile=true")
    assert compiled.model is not compiled.method  # called compiled, saved plain
    views = random_views(0)
    out_e, _ = engine.train_step(eager, views, torch.zeros(BATCH))
    out_c, _ = engine.train_step(compiled, views, torch.zeros(BATCH))
    torch.testing.assert_close(out_c["loss"], out_e["loss"], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(
        eager.method.state_dict().items(), compiled.method.state_dict().values()
    ):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


# ---- 3. optimisers ---------------------------------------------------------------------------


def test_lars_multi_tensor_step_matches_the_float64_formula():
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.conv = nn.Parameter(torch.randn(8, 3, 3, 3, generator=gen))
    model.fc = nn.Parameter(torch.randn(10, 8, generator=gen))
    model.zero = nn.Parameter(torch.zeros(4, 4))  # zero norm: the trust ratio falls back to 1
    model.bias = nn.Parameter(torch.randn(10, generator=gen))  # excluded: the raw gradient
    model.frozen = nn.Parameter(torch.randn(3, generator=gen))  # never given a gradient
    params = list(model.parameters())
    start = [p.detach().double() for p in params[:4]]
    optimizer = build_optimizer("lars", param_groups(model, 0.05), lr=0.3, momentum=0.9, eta=0.02)
    assert isinstance(optimizer, LARS)
    grads_per_step = [[torch.randn(p.shape, generator=gen) for p in params[:4]] for _ in range(4)]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected = lars_reference(
        start,
        [False, False, False, True],
        [[g.double() for g in grads] for grads in grads_per_step],
        0.3,
        0.9,
        0.05,
        0.02,
    )
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
    assert params[4].grad is None and params[4] not in optimizer.state


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_kernels_are_asked_for_on_cuda_only(name):
    model = nn.Linear(6, 3)
    groups = param_groups(model, 1e-4)
    assert not all_on_cuda(groups)
    optimizer = build_optimizer(name, groups, lr=0.1)
    assert optimizer.defaults["fused"] is False
    # The same request as on CUDA, run by torch's CPU fused kernel: the same step as the default.
    fused_model = nn.Linear(6, 3)
    fused_model.load_state_dict(model.state_dict())
    fused = build_optimizer(name, param_groups(fused_model, 1e-4), lr=0.1, fused=True)
    assert fused.defaults["fused"] is True
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    for m, opt in ((model, optimizer), (fused_model, fused)):
        for _ in range(3):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# ---- 4. persistent loader workers ------------------------------------------------------------


class Pids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4 * BATCH

    def __getitem__(self, index: int):
        return index, 0


def worker_pid(index: int, seed: int) -> torch.Tensor:
    return torch.tensor([index, seed, os.getpid()])


def test_the_loader_keeps_its_workers_and_follows_each_epoch(tmp_path):
    cfg = OmegaConf.create(
        {"optim": {"batch_size": BATCH}, "run": {"seed": 3}, "data": {"num_workers": 1}}
    )
    data = MultiViewDataset(Pids(), worker_pid)
    loader = engine.EpochLoader(data, cfg, CPU)
    assert loader.loader.persistent_workers and not loader.loader.pin_memory
    pids = set()
    for epoch, start in ((0, 0), (1, 2), (2, 0)):
        got = [views for views, _ in loader.epoch(epoch, start)]
        want = list(EpochBatchSampler(len(data), BATCH, 3, epoch, start=start))
        assert [v[:, :2].tolist() for v in got] == [[list(k) for k in b] for b in want]
        pids |= {int(p) for v in got for p in v[:, 2]}
    assert len(pids) == 1 and os.getpid() not in pids  # one worker process, all three epochs


# ---- 5. DDP does not broadcast buffers -------------------------------------------------------
# tests/dist_step.py wraps as the engine does (engine.wrap_ddp), so every one- vs two-process
# equality test runs without the broadcast. A broadcast acts at a forward's start, so only from
# the second step on could its absence show: three steps here, and each process's buffers.

BUFFER_CASES = {
    "mocov2-queue": [
        "method.name=mocov2",
        *(f"method.{k}={v}" for k, v in SMALL["mocov2"].items()),
    ],
    "unigrad-F": ["method.name=unigrad", *(f"method.{k}={v}" for k, v in SMALL["unigrad"].items())],
    "byol-ema": ["method.name=byol", *(f"method.{k}={v}" for k, v in SMALL["byol"].items())],
}


@pytest.mark.distributed
def test_buffers_stay_equal_on_every_process_without_a_broadcast(tmp_path):
    steps = one_and_two_processes(tmp_path, list(BUFFER_CASES.values()), "--float64", "--steps=3")
    for case, (one, two) in zip(BUFFER_CASES, steps):
        assert_steps_match(one, two, rtol=1e-7, atol=1e-9)
        for name, per_rank in two["buffers_per_rank"].items():
            assert per_rank.shape[0] == 2
            assert torch.equal(per_rank[1], per_rank[0]), f"{case}: {name}"
        assert any("queue" in k or "correlation" in k or "target" in k for k in one["state"])


# ---- 6. collapse diagnostics, once -----------------------------------------------------------


def _embeddings() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 16, generator=gen))] * 2


def test_the_main_process_computes_the_diagnostics_of_the_whole_batch(tmp_path):
    t = tiny_training(tmp_path)
    embeddings = _embeddings()
    got = engine._log_diagnostics(t, embeddings, epoch=1)
    z1, z2 = (torch.cat([e[i] for e in embeddings]) for i in (0, 1))
    assert got == {**collapse_diagnostics(z1, z2), "epoch": 1}
    torch.testing.assert_close(t.spectrum, singular_values(z1), rtol=0, atol=0)


def test_other_processes_gather_but_do_not_compute(tmp_path, monkeypatch):
    other = D.DistEnv(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"))
    t = tiny_training(tmp_path, env=other)
    monkeypatch.setattr(engine, "collapse_diagnostics", lambda *_: pytest.fail("computed"))
    monkeypatch.setattr(engine, "singular_values", lambda *_: pytest.fail("computed"))
    assert engine._log_diagnostics(t, _embeddings(), epoch=0) == {}
    assert t.spectrum is None
