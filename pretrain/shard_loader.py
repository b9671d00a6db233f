"""Pretraining batches streamed from shards (sslbench/data/shards.py), in an order that depends
only on (seed, epoch), the index and the recipe, so resume stays exact.

An epoch's order, computed from the index's counts alone, before any shard is read:

1. The shards are permuted, seeded by (seed, epoch), and their samples laid end to end.
2. That sequence is cut into `streams` contiguous pieces of equal size (±1), one per stream.
3. A stream shuffles its piece a buffer at a time: whole shards (or the parts of them in its
   piece) until it holds `shuffle_buffer` samples, emitted in a random order drawn from the
   stream's own generator, seeded by (seed, epoch, stream).
4. Global batch j takes the j-th run of batch/streams samples from every stream, in stream
   order, for steps = samples // batch batches (what is left over is dropped, as in the folder's
   order); each sample's augmentation is seeded by (seed, epoch, index), as it is there.

Process r of W reads the streams r*S/W ... (r+1)*S/W - 1, which make its rows of every global
batch, so a run on any number of processes sees the single-process batches, as
pretrain/sampling.py's order does; DataLoader worker w reads the process's streams s with
s = w (mod workers): each shard is read by one worker of one process (a shard cut between two
streams by the two that share it, each skipping the other's part). Resuming at step k skips the
first k runs of each stream: buffers emitted before them are not read at all.

A single stream whose buffer holds the whole split draws its one permutation from the generator
pretrain/sampling.py's order draws from, so it is that order exactly: the same ImageFolder and
its shards then train to the same weights, bit for bit (tests/test_shards.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from sslbench import distributed as D
from sslbench.data.shards import ShardDataset

from .sampling import MultiViewDataset, sample_seed

SHARD_ORDER_STREAM = 0x8000  # a generator stream no shuffle stream uses
MAX_STREAMS = SHARD_ORDER_STREAM


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """Stream 0's generator is the one EpochBatchSampler draws its permutation from."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, (-1 - stream) & 0xFFFF))


@dataclass(frozen=True)
class Segment:
    shard: int
    lo: int  # positions within the shard
    hi: int


@dataclass(frozen=True)
class Buffer:
    segments: tuple[Segment, ...]
    order: torch.Tensor  # the sample indices it emits, in order (a prefix where the stream ends)


class EpochOrder:
    """One epoch's order over a split of shards with these sample counts (module docstring)."""

    def __init__(
        self,
        counts: list[int],
        batch_size: int,
        streams: int,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
    ):
        if not 1 <= streams <= MAX_STREAMS or batch_size % streams:
            raise ValueError(
                f"optim.batch_size={batch_size} must be a multiple of the number "
                f"of streams (data.options.streams={streams}, 1 to {MAX_STREAMS})"
            )
        self.counts, self.streams, self.buffer = list(counts), streams, shuffle_buffer
        self.seed, self.epoch = seed, epoch
        self.firsts = [0, *accumulate(self.counts)][:-1]
        total = sum(self.counts)
        self.steps = total // batch_size
        self.run = batch_size // streams  # samples each stream gives each global batch
        shards = torch.randperm(
            len(self.counts), generator=_generator(seed, epoch, SHARD_ORDER_STREAM)
        ).tolist()
        self.pieces = [
            self._piece(shards, s * total // streams, (s + 1) * total // streams)
            for s in range(streams)
        ]

    def _piece(self, shards: list[int], start: int, stop: int) -> list[Segment]:
        """Positions [start, stop) of the permuted shards' samples laid end to end."""
        segments, at = [], 0
        for shard in shards:
            lo, hi = max(start - at, 0), min(stop - at, self.counts[shard])
            if lo < hi:
                segments.append(Segment(shard, lo, hi))
            at += self.counts[shard]
        return segments

    def buffers(self, stream: int) -> Iterator[Buffer]:
        """The stream's buffers in order; together they emit steps * run samples."""
        gen = _generator(self.seed, self.epoch, stream)
        left = self.steps * self.run
        group: list[Segment] = []
        segments = self.pieces[stream]
        for i, segment in enumerate(segments):
            group.append(segment)
            held = sum(g.hi - g.lo for g in group)
            if held < self.buffer and i + 1 < len(segments):
                continue
            indices = torch.cat(
                [
                    torch.arange(self.firsts[g.shard] + g.lo, self.firsts[g.shard] + g.hi)
                    for g in group
                ]
            )
            order = indices.sort().values[torch.randperm(held, generator=gen)][:left]
            yield Buffer(tuple(group), order)
            left -= len(order)
            if left == 0:
                return
            group = []

    def batch(self, j: int) -> list[int]:
        """Global batch j's sample indices (no shard is read)."""
        runs = [
            torch.cat([b.order for b in self.buffers(s)])[j * self.run : (j + 1) * self.run]
            for s in range(self.streams)
        ]
        return torch.cat(runs).tolist()


class ShardViews(IterableDataset):
    """This process's part of an epoch, from global batch `start` on: for each batch and each
    of its streams that this worker reads, the stream's run of samples as views, collated."""

    def __init__(
        self,
        dataset: ShardDataset,
        transform: Callable,
        order: EpochOrder,
        rank: int,
        world_size: int,
        start: int,
    ):
        if order.streams % world_size:
            raise ValueError(
                f"data.options.streams={order.streams} must be a multiple of the "
                f"number of processes ({world_size})"
            )
        self.dataset, self.transform, self.order, self.start = dataset, transform, order, start
        per_rank = order.streams // world_size
        self.streams = range(rank * per_rank, (rank + 1) * per_rank)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = [s for s in self.streams if (s - self.streams.start) % workers == worker]
        samples = {s: self._samples(s) for s in mine}
        order, epoch = self.order, self.order.epoch
        for _ in range(self.start, order.steps):
            for s in mine:
                items = []
                for _ in range(order.run):
                    index, image = next(samples[s])
                    items.append(
                        (
                            self.transform(image, sample_seed(order.seed, epoch, index)),
                            self.dataset.targets[index],
                        )
                    )
                yield default_collate(items)

    def _samples(self, stream: int) -> Iterator:
        """(index, image) in the stream's order from run `start` on; a buffer is read once it
        is reached, and only for the samples still to come."""
        skip = self.start * self.order.run
        for buffer in self.order.buffers(stream):
            if skip >= len(buffer.order):
                skip -= len(buffer.order)
                continue
            wanted = buffer.order[skip:].tolist()
            skip, needed, held = 0, set(wanted), {}
            for seg in buffer.segments:
                held.update(self.dataset.read(seg.shard, seg.lo, seg.hi, needed))
            for index in wanted:
                yield index, self.dataset.decode(index, held.pop(index))


def shard_batches(
    views_data: MultiViewDataset, cfg: DictConfig, env: D.DistEnv, epoch: int, start: int
) -> Iterator:
    """The (views, labels) batches of this process from global batch `start` of `epoch` to the
    end of it, read from the shards by cfg.data.num_workers workers (which must divide the
    number of streams each process reads)."""
    dataset: ShardDataset = views_data.base
    order = EpochOrder(
        [s.samples for s in dataset.shards],
        cfg.optim.batch_size,
        dataset.streams,
        dataset.shuffle_buffer,
        cfg.run.seed,
        epoch,
    )
    stream = ShardViews(dataset, views_data.transform, order, env.rank, env.world_size, start)
    per_rank, workers = len(stream.streams), cfg.data.num_workers
    if per_rank % max(workers, 1):
        raise ValueError(
            f"data.num_workers={workers} must divide the {per_rank} streams each "
            f"of the {env.world_size} processes reads (data.options.streams="
            f"{order.streams})"
        )
    # Workers take pieces in turn, so piece t is from worker t mod workers: the order above.
    # The generator keeps the global one (the model's) untouched, as in the engine's loader.
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 * per_rank // workers if workers else None,
        generator=torch.Generator(),
    )
    pieces = iter(loader)
    pin = env.device.type == "cuda"
    for _ in range(start, order.steps):
        yield _concat([next(pieces) for _ in range(per_rank)], pin)


def _concat(parts: list, pin: bool):
    """Collated pieces joined along the batch (into pinned memory for a CUDA device)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if len(parts) == 1 and not pin:
            return first
        out = torch.empty(
            (sum(len(p) for p in parts), *first.shape[1:]), dtype=first.dtype, pin_memory=pin
        )
        return torch.cat(parts, out=out)
    return type(first)(_concat(list(group), pin) for group in zip(*parts))
