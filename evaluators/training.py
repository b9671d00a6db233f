"""Supervised training of a classifier on a backbone: the standard linear probe and fine-tuning.

Both protocols train `Classifier` (backbone + linear head) on augmented images with a cosine
schedule; they differ only in whether the backbone is frozen and in the optimizer groups. Under
torchrun the classifier is wrapped in DDP, process r takes the r-th contiguous chunk of every
global batch and each sample's augmentation is seeded by the sample itself, so N processes train
on the same batches and crops as one.

Given a `Resume`, `fit` saves what an exact continuation needs (the trained weights, optimizer,
step, the epoch's losses so far, the RNG) atomically every few steps and once training ends, and
a run started again with the same path continues from it: the batches and crops are functions
of (seed, epoch, sample), so the continuation sees what an uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from sslbench import distributed as D
from sslbench.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from sslbench.data import LabeledDataset
from sslbench.optim import set_lr, warmup_cosine
from sslbench.transforms import IMAGENET_MEAN, IMAGENET_STD

from .accuracy import scored
from .features import infer


def train_transform(
    image_size: int,
    crop_min_scale: float,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """The linear-evaluation augmentation of the seed papers: random-resized crop and flip;
    mean/std: the backbone's input normalisation (artifact.input_normalization)."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(tuple(mean), tuple(std)),
        ]
    )


class SeededAugmentation(Dataset):
    """Samples of `dataset` (by `indices`, default all) augmented under an RNG seeded by
    (seed, epoch, sample index).

    torchvision's random transforms draw from the global RNG, so a sample's crop would otherwise
    depend on which process or worker loads it, and processes seeded alike would repeat each
    other's crops. `fit` sets `epoch` before each epoch.
    """

    def __init__(
        self,
        dataset: LabeledDataset,
        transform: Callable,
        seed: int,
        indices: Sequence[int] | None = None,
    ):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0
        self.indices = range(len(dataset)) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = self.indices[i]
        image = self.dataset.load_image(index)
        sample_seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA's is left alone
            torch.default_generator.manual_seed(int(sample_seed))
            return self.transform(image), self.dataset.targets[index]


class Classifier(nn.Module):
    """Backbone + linear head. Frozen: the backbone gets no gradient and stays in eval mode (its
    BatchNorm statistics are part of the representation being evaluated)."""

    def __init__(self, backbone: nn.Module, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)  # as MoCo / SimSiam linear evaluation
        nn.init.zeros_(self.head.bias)
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.backbone(x)
        return self.head(features)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_batches(
    size: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This process's share of each global batch of one epoch.

    The order is a permutation seeded by (seed, epoch), padded by wrapping around to a multiple of
    the process count. A last batch smaller than half a batch is merged into the one before (so
    no sample is dropped and BatchNorm never sees a batch of one); the rule does not depend on
    the process count, so N processes see the same global batches as one.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
    gen = _epoch_generator(seed, epoch)
    order = torch.randperm(size, generator=gen).tolist()
    order += order[: -len(order) % world_size]
    starts = list(range(0, len(order), batch_size))
    if len(starts) > 1 and 2 * (len(order) - starts[-1]) < batch_size:
        starts.pop()
    bounds = [*starts, len(order)]
    batches = []
    for lo, hi in zip(bounds, bounds[1:]):
        per = (hi - lo) // world_size
        batches.append(order[lo + rank * per : lo + (rank + 1) * per])
    return batches


@dataclass
class Resume:
    """Where `fit` keeps its resume state, saved every `every` steps and when training ends;
    `fit` sets `from_step` when it continued from a state found there."""

    path: Path
    every: int
    from_step: int | None = None


def _trained(model: Classifier) -> nn.Module:
    """What training changes: the head alone when the backbone is frozen (the frozen backbone is
    the artifact itself, reloaded by every run)."""
    return model.head if model.frozen else model


def _save_state(
    resume: Resume,
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    step: int,
    total: int,
    losses: list[torch.Tensor],
    device: torch.device,
) -> None:
    """Every process calls this (the epoch's losses are averaged over them); the main one writes.

    Every process seeds and draws its RNG alike, so the main one's states stand for all.
    """
    mean_losses = D.all_reduce_mean(torch.stack(losses)).cpu() if losses else torch.zeros(0)
    if D.rank() != 0:
        return
    rng = rng_state(device)
    save_checkpoint(
        resume.path,
        {
            "step": step,
            "total_steps": total,
            "trained": _trained(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch_losses": mean_losses,
            "rng": rng,
        },
    )


def _load_state(
    resume: Resume,
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    total: int,
    device: torch.device,
) -> tuple[int, list[torch.Tensor]]:
    """Restore a saved state; returns its step and its epoch's losses so far."""
    state = load_checkpoint(resume.path)
    if state["total_steps"] != total:
        raise CheckpointError(
            f"{resume.path} was saved by a run of {state['total_steps']} steps; "
            f"this one has {total}. Delete it to start again."
        )
    _trained(model).load_state_dict(state["trained"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], device)
    resume.from_step = int(state["step"])
    return resume.from_step, [loss.to(device) for loss in state["epoch_losses"].unbind()]


def fit(
    model: Classifier,
    dataset: SeededAugmentation,
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    *,
    epochs: int,
    batch_size: int,
    warmup_epochs: float,
    seed: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "train",
    resume: Resume | None = None,
) -> float:
    """Train with cross-entropy under a warm-up + cosine schedule; returns the last epoch's loss.

    With `resume`, continue from the state at resume.path when there is one, and save one there
    every resume.every steps and when training ends.
    """
    world, rank = D.world_size(), D.rank()
    steps_per_epoch = len(epoch_batches(len(dataset), batch_size, seed, 0, rank, world))
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    step, losses = 0, []
    if resume is not None and resume.path.is_file():
        step, losses = _load_state(resume, model, optimizer, total, device)
        if rank == 0:
            print(f"{desc}: resuming at step {step} of {total} from {resume.path}", flush=True)
    net = (
        model
        if world == 1
        else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    )
    net.train()
    bar = tqdm(
        total=total,
        initial=step,
        desc=desc,
        unit="step",
        leave=False,
        disable=not (progress and rank == 0),
        dynamic_ncols=True,
    )
    for epoch in range(step // steps_per_epoch, epochs):
        dataset.epoch = epoch
        done = step - epoch * steps_per_epoch  # batches of this epoch trained before a resume
        losses = losses if done else []
        batches = epoch_batches(len(dataset), batch_size, seed, epoch, rank, world)[done:]
        # The loader's own generator: it leaves the global RNG to the model, as saved.
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=_epoch_generator(seed, epoch),
        )
        for x, y in loader:
            set_lr(optimizer, warmup_cosine(step, total, warmup, base_lr), base_lr)
            loss = F.cross_entropy(net(x.to(device, non_blocking=True)), y.to(device))
            if not torch.isfinite(loss.detach()):
                raise RuntimeError(
                    f"{desc}: loss is {loss.item()} at step {step}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            step += 1
            bar.update()
            if resume is not None and resume.every and (step % resume.every == 0 or step == total):
                _save_state(resume, model, optimizer, step, total, losses, device)
        bar.set_postfix(epoch=epoch + 1, loss=f"{_mean(losses):.4f}")
    bar.close()
    return _mean(losses)


def _mean(losses: list[torch.Tensor]) -> float:
    """The mean loss over steps and processes (NaN when no step ran)."""
    return D.all_reduce_mean(torch.stack(losses).mean()).item() if losses else math.nan


def evaluate(
    model: nn.Module,
    dataset: LabeledDataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> tuple[dict[str, float], torch.Tensor] | None:
    """Top-1 / top-5 accuracy (%) of `model`'s logits on `dataset` (eval mode, no augmentation)
    and the per-sample top-1 hits; None on processes other than the main one (infer gathers
    the logits there only)."""
    logits = infer(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
        desc=desc,
    )
    return None if logits is None else scored(logits, torch.as_tensor(dataset.targets))


def val_test_scores(model: nn.Module, ctx) -> tuple[dict[str, float], torch.Tensor] | None:
    """The trained classifier scored on val and test as every training protocol reports it: test
    top-1/top-5 with val's beside them (val_top1, val_top5), and test's per-image top-1 hits.
    `ctx` is the task's EvalContext. None on processes other than the main one."""
    val, test = (
        evaluate(
            model,
            ctx.datasets[split],
            batch_size=ctx.cfg.features.batch_size,
            device=ctx.device,
            num_workers=ctx.cfg.data.num_workers,
            progress=ctx.cfg.run.progress,
            desc=f"evaluate {split}",
        )
        for split in ("val", "test")
    )
    if val is None:
        return None
    metrics = {**test[0], "val_top1": val[0]["top1"], "val_top5": val[0]["top5"]}
    return metrics, test[1]
