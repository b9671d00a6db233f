"""Deterministic data order and augmentation for pretraining.

The batch order of an epoch is a permutation seeded by (seed, epoch), and every sample's
augmentation is seeded by (seed, epoch, index). Nothing depends on how many batches were drawn
before, on worker count or on the process count, which is what makes a resumed run bit-identical
to an uninterrupted one and a multi-process run see the same global batches as one process.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) & _MASK63


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of each global batch of one epoch, from batch `start` on.

    Process r takes the r-th contiguous chunk of every global batch, so gathering chunks in rank
    order restores the single-process batch. Yields (index, augmentation seed) pairs.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ):
        if global_batch % world_size:
            raise ValueError(
                f"batch size {global_batch} is not divisible by {world_size} processes"
            )
        self.size, self.global_batch, self.seed, self.epoch = size, global_batch, seed, epoch
        self.local = global_batch // world_size
        self.rank, self.start = rank, start

    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 & 0xFFFF))
        order = torch.randperm(self.size, generator=gen).tolist()
        for b in range(self.start, self.batches_per_epoch()):
            lo = b * self.global_batch + self.rank * self.local
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in order[lo : lo + self.local]]


class MultiViewDataset(Dataset):
    """Wraps a labelled image dataset; `ds[(index, seed)]` returns (views, label)."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image, label = self.base[index]
        return self.transform(image, seed), label
