"""kNN evaluation time and peak memory: faiss (sslbench) against scikit-learn's brute force.

    python benchmarks/knn_bench.py [--bank 50000 --queries 10000 --dim 512 --classes 100]
                                   [--threads 1] [--repeats 3] [--index flat|ivf]

Both sides do the same work on the same random data: find the 200 most cosine-similar bank
vectors of every query and score the weighted vote for k in {10, 20, 100, 200}; the vote is
the same code, so the difference is the neighbour search. Each side runs in its own process,
so its peak resident memory is its own; the figure quoted is the peak above the process's
memory once the data is in place. Times are medians over --repeats runs. Exact search on both
sides is bound by the same (queries x bank) matrix product; --index ivf shows the approximate
index (knn.index=ivf, with the evaluator's default nlist / nprobe), whose accuracies may differ.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

KS = [10, 20, 100, 200]
TEMPERATURE = 0.07


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(args):
    import torch

    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank, args.dim, generator=gen)
    bank_y = torch.randint(0, args.classes, (args.bank,), generator=gen)
    queries = torch.randn(args.queries, args.dim, generator=gen)
    query_y = torch.randint(0, args.classes, (args.queries,), generator=gen)
    return bank, bank_y, queries, query_y


def run_faiss(bank, bank_y, queries, query_y, classes, kind):
    from evaluators.config import KnnConfig
    from evaluators.knn import NeighbourIndex, knn_grid

    defaults = KnnConfig()
    index = NeighbourIndex(bank, kind, defaults.ivf_nlist, defaults.ivf_nprobe)
    return knn_grid(index, bank_y, queries, query_y, KS, [TEMPERATURE], classes, progress=False)


def run_sklearn(bank, bank_y, queries, query_y, classes, kind):
    import torch
    from sklearn.neighbors import NearestNeighbors

    from evaluators.knn import as_percent, vote_hits

    nn = NearestNeighbors(n_neighbors=max(KS), metric="cosine", algorithm="brute")
    dist, idx = nn.fit(bank.numpy()).kneighbors(queries.numpy())
    sims, labels = torch.from_numpy(1 - dist), bank_y[torch.from_numpy(idx)]
    return {
        key: as_percent(hits)
        for key, hits in vote_hits(sims, labels, query_y, KS, [TEMPERATURE], classes).items()
    }


def child(args) -> None:
    """Time one implementation; print a JSON line."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        data = make_data(args)
        base = rss_mb()
        run = run_faiss if args.child == "faiss" else run_sklearn
        times, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run(*data, args.classes, args.index)
            times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "median_s": statistics.median(times),
                "times_s": times,
                "peak_extra_mb": rss_mb() - base,
                "data_mb": base,
                "top1": {str(k): result[(k, TEMPERATURE)]["top1"] for k in KS},
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=50_000, help="bank (training) vectors")
    parser.add_argument("--queries", type=int, default=10_000, help="query (test) vectors")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--classes", type=int, default=100, help="number of classes")
    parser.add_argument("--threads", type=int, default=1, help="torch / faiss / BLAS threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument(
        "--index",
        choices=["flat", "ivf"],
        default="flat",
        help="faiss index: exact (flat, the default) or approximate (ivf)",
    )
    parser.add_argument("--child", choices=["faiss", "sklearn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(
        f"bank {args.bank} x {args.dim}, {args.queries} queries, {args.classes} classes, "
        f"k in {KS}, {args.threads} thread(s), median of {args.repeats}, faiss index {args.index}"
    )
    results = {}
    for name in ("faiss", "sklearn"):
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", name],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"the {name} run failed (exit {proc.returncode}):\n{proc.stderr}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(
            f"{name:8s} {r['median_s']:8.2f} s  "
            f"(runs {', '.join(f'{t:.2f}' for t in r['times_s'])})"
            f"  peak memory above the data {r['peak_extra_mb']:7.1f} MB  top-1 {r['top1']}"
        )
    same = results["faiss"]["top1"] == results["sklearn"]["top1"]
    print(
        "speed-up (sklearn / faiss): "
        f"{results['sklearn']['median_s'] / results['faiss']['median_s']:.1f}x"
        f"  (goal >= 5x); identical accuracies: {same}"
    )


if __name__ == "__main__":
    main()
