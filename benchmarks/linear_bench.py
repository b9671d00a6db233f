"""Fast against standard linear probe: wall time and accuracy on synthetic-shapes.

    python benchmarks/linear_bench.py [--backbone RUN_DIR] [--threads 1] [key=value ...]

Runs the shipped recipes configs/eval/linear_fast.yaml and linear_standard.yaml through the
same code path as `sslbench eval linear`, in this process. The fast probe is timed twice: cold
(its time includes extracting the features, not generating the data) and warm (features from
the cache, as when kNN ran first). Without --backbone a random-init ResNet-18 is used (timings
are what matter then; its accuracies are near chance). Overrides apply to both recipes, e.g.
data.root=... data.options=...
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "fast": ROOT / "configs/eval/linear_fast.yaml",
    "standard": ROOT / "configs/eval/linear_standard.yaml",
}


def random_backbone(directory: Path) -> Path:
    import torch

    from sslbench.artifact import save_backbone
    from sslbench.backbones import build_backbone

    torch.manual_seed(0)
    return save_backbone(
        directory / "random-init",
        build_backbone("resnet18", stem="small"),
        arch="resnet18",
        arch_kwargs={"stem": "small"},
        method="random-init",
        run_name="random-init",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone",
        metavar="RUN_DIR",
        help="backbone artifact to probe (default: a random-init ResNet-18)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch / faiss threads")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="eval config overrides for both probes; smaller: data.image_size=16 "
        "'data.options={train_per_class: 64, val_per_class: 8, "
        "test_per_class: 24, image_size: 32}' probe.epochs=5",
    )
    args = parser.parse_args()

    from evaluators.config import linear_config
    from evaluators.context import load_splits
    from evaluators.run import evaluate
    from sslbench.results import read_record

    work = Path(tempfile.mkdtemp(prefix="linear_bench_"))
    backbone = Path(args.backbone) if args.backbone else random_backbone(work)
    overrides = [
        f"run.threads={args.threads}",
        "run.progress=false",
        f"features.cache_dir={work / 'cache'}",
        *args.overrides,
    ]
    # A synthetic dataset is generated on first use: do it before the clocks start.
    load_splits(linear_config([RECIPES["fast"]], overrides).data, None)
    rows = {}
    for label, recipe in (
        ("fast (cold cache)", "fast"),
        ("fast (warm cache)", "fast"),
        ("standard", "standard"),
    ):
        cfg = linear_config([RECIPES[recipe]], overrides)
        start = time.perf_counter()
        record = read_record(evaluate("linear", cfg, backbone, work / "results" / label.split()[0]))
        rows[label] = (time.perf_counter() - start, record)
        print(
            f"{label:18s} {rows[label][0]:8.1f} s   test top-1 {record.metrics['top1']:6.2f}"
            f"   val top-1 {record.metrics['val_top1']:6.2f}   protocol {record.protocol_id}",
            flush=True,
        )
    standard = rows["standard"][0]
    print(
        f"speed-up of the fast probe: {standard / rows['fast (cold cache)'][0]:.1f}x cold, "
        f"{standard / rows['fast (warm cache)'][0]:.1f}x warm (goal >= 20x); "
        f"backbone {backbone}; scratch {work}"
    )


if __name__ == "__main__":
    main()
