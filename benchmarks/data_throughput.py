"""Decoded and augmented two-view images per second: the PIL path against the accelerator path.

    python benchmarks/data_throughput.py [--device cpu|cuda] [--images 256] [--batch-size 64]
                                         [--workers 2] [--image-size 224] [--pipeline simclr]

Writes --images JPEGs of 224×224 pixels (smooth colour fields with pixel noise, quality 90) into
a temporary ImageFolder, then feeds the same batches of the same files through both of
pretraining's data paths (pretrain/engine.py):

- PIL (augment.device=cpu): DataLoader workers decode each JPEG and build both views with
  torchvision's PIL transforms; the main process moves the views to --device.
- accelerator (augment.device=accelerator): workers decode to uint8 --image-size² squares; the
  main process moves each batch to --device and builds both views there, batched
  (pretrain/augment_batched.py).

For each path: source images (each giving two views) per second of wall time, and per CPU core
consumed: images per second of user+system CPU time of this process and its DataLoader workers
(getrusage, workers counted once they exit at the end of the pass; their share is shown apart:
on a GPU it is nearly all the accelerator path consumes). A process waiting for a
CUDA device may spin, which counts as consumed. The accelerator path's batched ops run first on
a random batch, untimed, so one-time initialisation is not counted. Prints both paths and the
ratios accelerator / PIL, measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pretrain.augment import MultiViewTransform, build_view_transforms
from pretrain.augment_batched import BatchedTwoViews, DecodeResize
from pretrain.sampling import EpochBatchSampler, MultiViewDataset
from sslbench.data.imagefolder import ImageFolder

SOURCE_SIDE = 224
CLASSES = 4


def write_jpegs(root: Path, count: int) -> None:
    """`count` 224 px JPEGs in CLASSES class folders of root/train."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        coarse = np.asarray(coarse.resize((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.BICUBIC))
        noise = rng.integers(0, 256, (SOURCE_SIDE, SOURCE_SIDE, 3))
        pixels = (coarse * 0.8 + noise * 0.2).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def cpu_seconds() -> tuple[float, float]:
    """User + system time of this process, and of its children that have exited."""
    return tuple(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def run_path(
    dataset: ImageFolder,
    transform,
    augment: BatchedTwoViews | None,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """One pass over the images in batches; source images per wall second and per CPU second."""
    sampler = EpochBatchSampler(len(dataset), args.batch_size, seed=0, epoch=0)
    loader = DataLoader(
        MultiViewDataset(dataset, transform),
        batch_sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    images = 0
    (main, workers), wall = cpu_seconds(), time.perf_counter()
    for batch, (views, _) in enumerate(loader):
        if augment is None:
            views = [v.to(device, non_blocking=True) for v in views]
        else:
            pixels, sizes = views
            views = augment(pixels.to(device, non_blocking=True), sizes, (0, 0, batch))
        images += len(views[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall
    del loader  # the workers have exited with the pass; their time is counted
    main_end, workers_end = cpu_seconds()
    main, workers = main_end - main, workers_end - workers
    return {
        "images": images,
        "wall_s": wall,
        "cpu_s": main + workers,
        "workers_s": workers,
        "per_s": images / wall,
        "per_cpu_s": images / (main + workers),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pipeline", default="simclr")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is fewer than one batch of {args.batch_size}")
    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0))
    print(
        f"{args.images} JPEGs of {SOURCE_SIDE} px, {args.pipeline} views at {args.image_size} "
        f"px, batch {args.batch_size}, {args.workers} workers, {cores} CPU cores, "
        f"{torch.get_num_threads()} torch threads, device {device}"
    )
    augment = BatchedTwoViews(args.pipeline, args.image_size)
    warm = torch.randint(
        0,
        256,
        (args.batch_size, 3, args.image_size, args.image_size),
        dtype=torch.uint8,
        device=device,
    )
    augment(warm, torch.tensor([[args.image_size] * 2] * args.batch_size), (1, 0, 0))
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images)
        dataset = ImageFolder(tmp, "train")
        results = {
            "PIL": run_path(
                dataset,
                MultiViewTransform(build_view_transforms(args.pipeline, args.image_size)),
                None,
                args,
                device,
            ),
            "accelerator": run_path(
                dataset,
                DecodeResize(args.image_size, augment.recipe.interpolation),
                augment,
                args,
                device,
            ),
        }
    print(
        f"{'path':<12} {'images':>7} {'wall s':>8} {'CPU s':>8} {'(workers)':>10} "
        f"{'images/s':>9} {'images/CPU-s':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r['images']:>7} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
            f"{r['workers_s']:>10.2f} {r['per_s']:>9.1f} {r['per_cpu_s']:>13.1f}"
        )
    pil, acc = results["PIL"], results["accelerator"]
    print(
        f"accelerator / PIL: {acc['per_s'] / pil['per_s']:.2f}x images/s, "
        f"{acc['per_cpu_s'] / pil['per_cpu_s']:.2f}x images per CPU-second"
    )


if __name__ == "__main__":
    main()
