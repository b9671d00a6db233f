"""Weighted kNN classification on frozen features (Wu et al. 2018; the DINO evaluation).

Features are l2-normalised and searched exactly by inner product: with faiss on the CPU (IVF for
very large banks, approximate), and on a GPU by chunked matmul + top-k in torch, which needs no
faiss-gpu and is as fast (faiss#3621); faiss-gpu stays an option (knn.backend=faiss). Each of a
query's k nearest training samples votes for its class with weight exp(sim / T). Neighbours are
searched once for the largest k and every (k, T) of the grid is scored from them; queries go in
chunks, so memory stays bounded by chunk_size x max(k) whatever the number of queries. (k, T) is
chosen on val and the test split is scored once, with the chosen pair.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sslbench.results import HITS_KEY, TaskOutput, pack_hits

from .accuracy import topk_hits
from .context import EvalContext

TOP = (1, 5)


class NeighbourIndex:
    """A faiss inner-product index over the l2-normalised bank: search returns cosines."""

    def __init__(
        self,
        bank: torch.Tensor,
        kind: str = "flat",
        nlist: int = 1024,
        nprobe: int = 32,
        gpu: int | None = None,
    ):
        """gpu: the CUDA device index to search on (faiss-gpu), or None for the CPU."""
        vectors = _normalised(bank)
        n, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            if nlist > n:
                raise ValueError(
                    f"knn.ivf_nlist={nlist} is larger than the bank ({n} vectors); "
                    "lower it or use knn.index=flat"
                )
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.train(vectors)
            index.nprobe = nprobe
        else:
            raise ValueError(f"unknown knn.index {kind!r}; expected 'flat' or 'ivf'")
        if gpu is not None:
            self._resources = faiss.StandardGpuResources()  # must outlive the index
            index = faiss.index_cpu_to_gpu(self._resources, gpu, index)
        index.add(vectors)
        self.index = index
        self.description = f"{type(index).__name__}({'cpu' if gpu is None else f'cuda:{gpu}'})"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) similarities and bank indices, most similar first. An IVF search that finds
        fewer than k pads with index -1 and similarity -3.4e38, whose vote weight is exactly 0."""
        sims, idx = self.index.search(_normalised(queries), k)
        return torch.from_numpy(sims), torch.from_numpy(idx)


class TorchIndex:
    """Exact inner-product search over the l2-normalised bank on `device`, by matmul + top-k over
    bank chunks with a running merge: memory is bounded by queries x bank_chunk."""

    def __init__(self, bank: torch.Tensor, device: torch.device, bank_chunk: int = 65536):
        self.bank = F.normalize(bank.float(), dim=1).to(device)
        self.device, self.bank_chunk = device, bank_chunk
        self.description = f"TorchIndex({device})"

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) similarities and bank indices (CPU tensors), most similar first."""
        q = F.normalize(queries.float(), dim=1).to(self.device)
        best_sims = torch.empty(len(q), 0, device=self.device)
        best_idx = torch.empty(len(q), 0, dtype=torch.long, device=self.device)
        for lo in range(0, len(self.bank), self.bank_chunk):
            sims = q @ self.bank[lo : lo + self.bank_chunk].T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            merged = torch.cat([best_sims, top.values], dim=1)
            order = merged.topk(min(k, merged.shape[1]), dim=1).indices
            best_sims = merged.gather(1, order)
            best_idx = torch.cat([best_idx, top.indices + lo], dim=1).gather(1, order)
        return best_sims.cpu(), best_idx.cpu()


BACKENDS = ("auto", "faiss", "torch")


def build_index(
    bank: torch.Tensor,
    device: torch.device,
    backend: str = "auto",
    kind: str = "flat",
    nlist: int = 1024,
    nprobe: int = 32,
):
    """The index `choose_backend` names; faiss's on the GPU only where faiss-gpu is installed."""
    if choose_backend(device, backend, kind) == "torch":
        return TorchIndex(bank, device)
    on_gpu = device.type == "cuda" and faiss_gpu_available()
    gpu = (device.index or 0) if on_gpu else None
    return NeighbourIndex(bank, kind, nlist, nprobe, gpu)


def choose_backend(device: torch.device, backend: str = "auto", kind: str = "flat") -> str:
    """With "auto": torch on a GPU (whether faiss-gpu is installed or not: it needs none and is
    as fast), faiss on the CPU and for IVF, which is faiss's only (torch's search is exact)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown knn.backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "torch" if device.type == "cuda" and kind == "flat" else "faiss"
    if backend == "torch" and kind != "flat":
        raise ValueError(
            f"knn.index={kind!r} needs knn.backend=faiss (the torch search is exact only)"
        )
    return backend


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _normalised(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(x.float(), dim=1).numpy(), dtype=np.float32)


def weighted_votes(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float, num_classes: int
) -> torch.Tensor:
    """(n, C) class scores: sum over neighbours of exp(sim / T), in float64.

    Shifting by each query's top similarity (a per-row factor exp(-max/T)) leaves the ranking
    unchanged and keeps small temperatures from overflowing.
    """
    sims = sims.double()
    weights = ((sims - sims[:, :1]) / temperature).exp()
    votes = torch.zeros(len(sims), num_classes, dtype=torch.float64)
    return votes.scatter_add_(1, neighbour_labels, weights)


def _chunks(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(
        starts, desc=desc, unit="chunk", leave=False, disable=not progress or len(starts) < 2
    )


def vote_hits(
    sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    truth: torch.Tensor,
    ks: list[int],
    temperatures: list[float],
    num_classes: int,
) -> dict[tuple[int, float], torch.Tensor]:
    """Each query's top-1/top-5 hits (n, 2) of the vote for every (k, T), from neighbours sorted
    by similarity."""
    return {
        (k, t): topk_hits(
            weighted_votes(sims[:, :k], neighbour_labels[:, :k], t, num_classes), truth, TOP
        )
        for k, t in itertools.product(ks, temperatures)
    }


def as_percent(hits: torch.Tensor) -> dict[str, float]:
    """{"top1": %, "top5": %} of per-query hits (n, 2)."""
    return {f"top{top}": 100.0 * h.item() / len(hits) for top, h in zip(TOP, hits.sum(0))}


def grid_hits(
    index: NeighbourIndex,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: list[int],
    temperatures: list[float],
    num_classes: int,
    chunk_size: int = 4096,
    progress: bool = True,
    desc: str = "knn",
) -> dict[tuple[int, float], torch.Tensor]:
    """Each query's top-1/top-5 hits (n, 2) for every (k, T); k must be <= bank size."""
    hits = {key: [] for key in itertools.product(ks, temperatures)}
    for lo in _chunks(len(queries), chunk_size, desc, progress):
        sims, idx = index.search(queries[lo : lo + chunk_size], max(ks))
        chunk = vote_hits(
            sims,
            bank_labels[idx],
            query_labels[lo : lo + chunk_size],
            ks,
            temperatures,
            num_classes,
        )
        for key, value in chunk.items():
            hits[key].append(value)
    return {key: torch.cat(parts) for key, parts in hits.items()}


def knn_grid(
    index: NeighbourIndex,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: list[int],
    temperatures: list[float],
    num_classes: int,
    chunk_size: int = 4096,
    progress: bool = True,
    desc: str = "knn",
) -> dict[tuple[int, float], dict[str, float]]:
    """Top-1/top-5 accuracy (%) of the weighted vote for every (k, T); k must be <= bank size."""
    return {
        key: as_percent(hits)
        for key, hits in grid_hits(
            index,
            bank_labels,
            queries,
            query_labels,
            ks,
            temperatures,
            num_classes,
            chunk_size,
            progress,
            desc,
        ).items()
    }


@dataclass(frozen=True)
class KnnResult:
    metrics: dict[str, float]
    details: dict


def evaluate_knn(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    ks: list[int],
    temperatures: list[float],
    *,
    index: str = "flat",
    ivf_nlist: int = 1024,
    ivf_nprobe: int = 32,
    chunk_size: int = 4096,
    device: torch.device = torch.device("cpu"),
    backend: str = "auto",
    progress: bool = True,
) -> KnnResult:
    """Choose (k, T) by val top-1 (then top-5, then smaller k, then smaller T); score test with it.

    k larger than the bank is clipped to the bank size (with a note in the details)."""
    if not ks or not temperatures or min(ks) < 1 or min(temperatures) <= 0:
        raise ValueError(
            f"knn.k must be positive integers and knn.temperature positive numbers, "
            f"got k={ks}, temperature={temperatures}"
        )
    bank, bank_labels = train
    ks, temperatures = sorted(set(ks)), sorted(set(temperatures))
    notes = []
    clipped = sorted({min(k, len(bank)) for k in ks})
    if ks[-1] > len(bank):
        notes.append(
            f"k values {sorted(k for k in ks if k > len(bank))} exceed the bank size "
            f"{len(bank)} and were clipped to it"
        )
    index_ = build_index(bank, device, backend, index, ivf_nlist, ivf_nprobe)
    grid = knn_grid(
        index_,
        bank_labels,
        *val,
        clipped,
        temperatures,
        num_classes,
        chunk_size,
        progress,
        "knn val",
    )
    order = list(grid)
    best = max(order, key=lambda key: (grid[key]["top1"], grid[key]["top5"], -order.index(key)))
    test_hits = grid_hits(
        index_,
        bank_labels,
        *test,
        [best[0]],
        [best[1]],
        num_classes,
        chunk_size,
        progress,
        "knn test",
    )[best]
    metrics = {
        **as_percent(test_hits),
        "val_top1": grid[best]["top1"],
        "val_top5": grid[best]["top5"],
    }
    details = {
        "selected": {"k": best[0], "temperature": best[1]},
        HITS_KEY: pack_hits(test_hits[:, 0].bool()),
        "val_grid": [{"k": k, "temperature": t, **s} for (k, t), s in grid.items()],
        "index": index_.description,
        "notes": notes,
    }
    return KnnResult(metrics, details)


def run(ctx: EvalContext) -> TaskOutput | None:
    """The kNN evaluator: cached features of train (the bank), val and test. The search runs on
    the main process, which alone holds the bank; the others return None."""
    cfg = ctx.cfg.knn
    train, val, test = ctx.all_features()
    if train.features is None:
        return None
    result = evaluate_knn(
        (train.features, train.labels),
        (val.features, val.labels),
        (test.features, test.labels),
        ctx.num_classes,
        list(cfg.k),
        list(cfg.temperature),
        index=cfg.index,
        ivf_nlist=cfg.ivf_nlist,
        ivf_nprobe=cfg.ivf_nprobe,
        chunk_size=cfg.chunk_size,
        device=ctx.device,
        backend=cfg.backend,
        progress=ctx.cfg.run.progress,
    )
    protocol = {"k": sorted(cfg.k), "temperature": sorted(cfg.temperature), "index": cfg.index}
    if cfg.index == "ivf":
        protocol.update(ivf_nlist=cfg.ivf_nlist, ivf_nprobe=cfg.ivf_nprobe)
    return TaskOutput(result.metrics, {"knn": protocol}, result.details)
