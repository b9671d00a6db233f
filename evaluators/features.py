"""Frozen-backbone inference over a dataset, and the feature cache kNN and the fast probe share.

`infer` runs a model over a dataset in eval mode; under torchrun each process takes one
contiguous shard and the shards are gathered in rank order onto the main process only, which
ends with exactly the single-process result; the others hold None. A feature bank (1.28M x 2048
float32 is 10 GB for ImageNet) is then held once, not once per process, and whatever reads it
(the kNN search, the fast probe) runs on the main process as one process runs it, so the numbers
do not depend on the process count. (Sharding the bank with a top-k merge would split the search
too, but the search is seconds against the extraction's minutes, and one GPU holds the bank.)
`cached_features` stores a backbone's features under a key made of everything that determines
them (weights sha256, how they are read out, dataset description, transform), so one extraction
serves every evaluator and every protocol that reads the same features.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from sslbench import distributed as D
from sslbench.data import LabeledDataset
from sslbench.io import atomic_path

CACHE_VERSION = 1  # bump when extraction changes in a way that changes the features
CACHE_ENV = "SSLBENCH_CACHE"


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous shard; every shard but the last has ceil(n/W)."""
    per = math.ceil(size / world_size)
    return min(rank * per, size), min((rank + 1) * per, size)


@torch.inference_mode()
def infer(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "infer",
) -> torch.Tensor | None:
    """model(x) for every sample, in dataset order, as float32 on the CPU of the main process;
    None on the other processes.

    The model runs in eval mode (BatchNorm uses its running statistics). Under torchrun the
    shards are padded to equal length for the gather and the padding is dropped afterwards.
    """
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset is empty")
    model.eval()
    world, rank = D.world_size(), D.rank()
    start, stop = shard_bounds(len(dataset), rank, world)
    loader = DataLoader(
        Subset(dataset, range(start, stop)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    outputs = [
        model(x.to(device, non_blocking=True)).float().cpu()
        for x, _ in tqdm(
            loader, desc=desc, unit="batch", leave=False, disable=not (progress and rank == 0)
        )
    ]
    if world == 1:
        return torch.cat(outputs)
    # Rank 0's shard is never empty; a later one can be (fewer samples than processes).
    shape = D.broadcast_object(outputs[0].shape[1:] if rank == 0 else None)
    per = math.ceil(len(dataset) / world)
    padded = torch.zeros(per, *shape)
    if outputs:
        padded[: stop - start] = torch.cat(outputs)
    gathered = D.gather_to_main(padded.to(device))
    if gathered is None:
        return None
    parts = []
    for r in range(world):
        lo, hi = shard_bounds(len(dataset), r, world)
        parts.append(gathered[r * per : r * per + hi - lo])
    return torch.cat(parts)


@dataclass(frozen=True)
class Features:
    features: torch.Tensor | None  # (N, D) float32 on the main process; None on the others
    labels: torch.Tensor  # (N,) int64
    from_cache: bool = False


def readout(backbone: nn.Module) -> dict:
    """What turns the weights into features beyond the weights themselves: a ViT's pooling (CLS
    token or patch average, from its facts), {"readout": {"pool": ...}}; {} for a ResNet or a
    module without facts. Evaluators add it to the protocol: the same weights read two ways
    are two protocols."""
    facts = getattr(backbone, "facts", None)
    pool = facts.structure.get("pool") if facts is not None else None
    return {"readout": {"pool": pool}} if pool else {}


def cache_key(weights_sha256: str, dataset: LabeledDataset, backbone_readout: dict) -> dict:
    """Everything that determines a backbone's features on a dataset split."""
    return {
        "version": CACHE_VERSION,
        "weights_sha256": weights_sha256,
        **backbone_readout,
        "dataset": dataset.describe(),
        "transform": repr(dataset.transform),
    }


def cache_location(enabled: bool, configured: str | None, results_dir: str | Path) -> Path | None:
    """features.cache_dir if set, else $SSLBENCH_CACHE, else <results dir>/.feature_cache."""
    if not enabled:
        return None
    return Path(configured or os.environ.get(CACHE_ENV) or Path(results_dir) / ".feature_cache")


def cached_features(
    backbone: nn.Module,
    weights_sha256: str,
    dataset: LabeledDataset,
    *,
    cache_dir: Path | None,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
) -> Features:
    """The backbone's features on `dataset`, read from `cache_dir` when present, else extracted
    (and written there atomically by the main process). cache_dir=None disables the cache.
    Every process must call it (extraction is collective); only the main one gets the
    features, the others get None in their place and the labels."""
    key = cache_key(weights_sha256, dataset, readout(backbone))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = None if cache_dir is None else Path(cache_dir) / f"{dataset.split}-{digest}.safetensors"
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    # The main process decides for all: a file appearing between two processes' checks (another
    # evaluator writing it) must not send one process into the collective extraction alone.
    if path is not None and D.broadcast_object(path.is_file()):
        if D.rank() != 0:
            return Features(None, labels, from_cache=True)
        try:
            stored = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"feature cache {path} is unreadable ({err}); delete it") from None
        if not torch.equal(stored["labels"], labels):
            raise ValueError(
                f"feature cache {path} holds other labels than {dataset.name}/"
                f"{dataset.split}: the dataset changed without its description "
                "changing; delete the cache file"
            )
        return Features(stored["features"], labels, from_cache=True)
    feats = infer(
        backbone,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
        desc=f"features {dataset.name}/{dataset.split}",
    )
    if path is not None and D.rank() == 0:
        with atomic_path(path) as tmp:
            save_file(
                {"features": feats.contiguous(), "labels": labels},
                str(tmp),
                metadata={"key": json.dumps(key, sort_keys=True)},
            )
    D.barrier()
    return Features(feats, labels)
