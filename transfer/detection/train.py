"""Iteration-based detector training (torchvision backend): detectron2's solver semantics.

SGD with momentum, no weight decay on norm layers' parameters unless asked (WEIGHT_DECAY_NORM),
a linear warm-up from warmup_factor x lr, then x gamma at each step. Under torchrun the model is
wrapped in DDP and each process reads its share of every global batch (DistributedSampler, a new
permutation per epoch). Precise BN replaces BatchNorm's running averages by the true mean of
batch statistics over many training batches before evaluation, as detectron2's PreciseBN hook.

Training saves what an exact continuation needs (weights, optimizer, iteration, the loss log so
far and every process's RNG state) every solver.checkpoint_period iterations and when it ends;
the same run started again continues from there. The batches are a function of (seed, epoch),
so the continuation reads what an uninterrupted run would have.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import math
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from sslbench import distributed as D
from sslbench.checkpoint import (
    load_checkpoint,
    require_same_recipe,
    require_same_world_size,
    save_checkpoint,
)

from .config import Schedule
from .data import DetectionDataset, collate

RESUME_FILE = "resume.pt"  # in the work directory, until the result record is written


def lr_at(iteration: int, schedule: Schedule, gamma: float, warmup_factor: float) -> float:
    """detectron2's WarmupMultiStepLR at 0-based `iteration`."""
    factor = gamma ** bisect.bisect_right(schedule.steps, iteration)
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return schedule.base_lr * factor


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Trainable parameters in two groups: those of norm layers, and the rest."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, norm_types)
        for p in m.parameters(recurse=False)
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in norm_ids], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in norm_ids], "weight_decay": weight_decay_norm},
    ]
    return [g for g in groups if g["params"]]


def batches(
    dataset: DetectionDataset,
    per_process: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    start: int = 0,
) -> Iterator[tuple[list, list]]:
    """Endless training batches from the `start`-th on: epoch after epoch, this process's share
    of each global batch. The loaders draw their worker seeds from their own generator, so the
    global RNG is the model's alone (its multi-scale sizes and sampled proposals)."""
    sampler = DistributedSampler(
        dataset, num_replicas=D.world_size(), rank=D.rank(), shuffle=True, seed=seed, drop_last=True
    )
    batch_sampler = BatchSampler(sampler, per_process, drop_last=True)
    if len(batch_sampler) == 0:
        raise ValueError(
            f"{len(dataset)} training images make no batch of {per_process} per "
            f"process; lower solver.ims_per_batch"
        )
    first, skip = divmod(start, len(batch_sampler))
    for epoch in itertools.count(first):
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        chosen = list(batch_sampler)[skip if epoch == first else 0 :]
        loader = DataLoader(
            dataset,
            batch_sampler=chosen,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
        )
        yield from loader


def _save_state(
    path: Path,
    key: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    iterations: int,
    log: str,
    device: torch.device,
) -> None:
    """Every process calls this (each one's RNG state is gathered); the main one writes."""
    rng = {"cpu": D.gather_no_grad(torch.get_rng_state().to(device)[None]).cpu()}
    if device.type == "cuda":
        rng["cuda"] = D.gather_no_grad(torch.cuda.get_rng_state(device).to(device)[None]).cpu()
    if D.rank() == 0:
        save_checkpoint(
            path,
            {
                "step": iterations,
                "key": key,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "log": log,
                "rng": rng,
            },
        )


def _load_state(
    path: Path, key: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[int, str]:
    """Restore a saved state; returns its iteration count and loss log."""
    state = load_checkpoint(path)
    require_same_recipe(path, state["key"], key, f"delete {path}")
    rng = state["rng"]
    require_same_world_size(path, len(rng["cpu"]), D.world_size())
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # clone: this process's row as a tensor of its own (set_rng_state crashes on a row view)
    torch.set_rng_state(rng["cpu"][D.rank()].clone())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"][D.rank()].clone(), device)
    return int(state["step"]), state["log"]


def train(
    model: nn.Module,
    dataset: DetectionDataset,
    schedule: Schedule,
    solver: DictConfig,
    device: torch.device,
    *,
    seed: int,
    num_workers: int,
    progress: bool,
    log_every: int,
    checkpoint: Path | None = None,
    key: str = "",
) -> tuple[str, int | None]:
    """Train in place for schedule.max_iter iterations; returns the loss log as CSV text and the
    iteration training resumed at (None when it started from scratch).

    With `checkpoint`, continue from the state saved there when there is one (under the same
    `key`, the recipe's hash), and save one every solver.checkpoint_period iterations and at the
    end.
    """
    per_process = schedule.ims_per_batch // schedule.world_size
    optimizer = torch.optim.SGD(
        param_groups(model, solver.weight_decay, solver.weight_decay_norm),
        lr=schedule.base_lr,
        momentum=solver.momentum,
    )
    start, log_so_far, resumed = 0, "", None
    if checkpoint is not None and checkpoint.is_file():
        start, log_so_far = _load_state(checkpoint, key, model, optimizer, device)
        resumed = start
        if D.rank() == 0:
            print(
                f"detection: resuming at iteration {start} of {schedule.max_iter} from "
                f"{checkpoint}",
                flush=True,
            )
    net = (
        model
        if schedule.world_size == 1
        else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    )
    net.train()
    log = io.StringIO()
    log.write(log_so_far)
    writer = None
    data = batches(dataset, per_process, seed, num_workers, device.type == "cuda", start)
    bar = tqdm(
        range(start, schedule.max_iter),
        desc="detection",
        unit="it",
        dynamic_ncols=True,
        initial=start,
        total=schedule.max_iter,
        disable=not (progress and D.rank() == 0),
    )
    for iteration in bar:
        lr = lr_at(iteration, schedule, solver.gamma, solver.warmup_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = next(data)
        images = [x.to(device, non_blocking=True) for x in images]
        targets = [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
        ]
        losses = net(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise RuntimeError(
                f"detection training: loss is {loss.item()} at iteration "
                f"{iteration} ({parts}); lower solver.base_lr or lengthen "
                "solver.warmup_iters"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (iteration + 1) % log_every == 0 or iteration + 1 == schedule.max_iter:
            row = {
                "iteration": iteration + 1,
                "lr": lr,
                "loss": D.all_reduce_mean(loss.detach()).item(),
                **{k: D.all_reduce_mean(v.detach()).item() for k, v in losses.items()},
            }
            if writer is None:
                writer = csv.DictWriter(log, fieldnames=list(row))
                if not log_so_far:
                    writer.writeheader()
            writer.writerow(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2g}")
        done = iteration + 1
        if (
            checkpoint is not None
            and solver.checkpoint_period
            and (done % solver.checkpoint_period == 0 or done == schedule.max_iter)
        ):
            _save_state(checkpoint, key, model, optimizer, done, log.getvalue(), device)
    bar.close()
    return log.getvalue(), resumed


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    dataset: DetectionDataset,
    per_process: int,
    iters: int,
    device: torch.device,
    *,
    seed: int,
    num_workers: int,
    progress: bool,
) -> int:
    """Set every trainable BatchNorm's running statistics to the mean of its batch statistics
    over `iters` training batches; returns how many layers were updated."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not layers or iters <= 0:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the running stats become the mean over batches
    model.train()
    data = batches(dataset, per_process, seed + 1, num_workers, device.type == "cuda")
    for _ in tqdm(
        range(iters),
        desc="precise BN",
        unit="it",
        leave=False,
        disable=not (progress and D.rank() == 0),
    ):
        images, targets = next(data)
        model(
            [x.to(device) for x in images],
            [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets],
        )
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
        # plain BN saw only this process's batches: average over processes (SyncBN agrees already)
        m.running_mean.copy_(D.all_reduce_mean(m.running_mean))
        m.running_var.copy_(D.all_reduce_mean(m.running_var))
    return len(layers)
