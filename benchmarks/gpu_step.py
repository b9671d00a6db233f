"""Images/s of each method's full step with on-device augmentation versus the bare backbone.

The floor is what the network costs: backbone forward+backward (plus an SGD step) on 2B resident,
already-augmented tensors. The full step is what a training step on the accelerator does: a
uint8 batch of B decoded images is augmented into two views on the device (pretrain's
BatchedTwoViews, the recipe's pipeline, a fresh draw each step), then the method's forward,
backward and optimizer step. Both run in bf16 autocast with channels_last, as the engine does on
CUDA with train.amp. The goals (issue 13): full step >= 0.9x the floor, >= 0.85x for methods with
a momentum encoder (they add a forward by definition). Medians of interleaved repeats; on CUDA
each timing synchronises once at its end.

    python benchmarks/gpu_step.py --methods simclr,byol,barlow_twins,unigrad --device cuda
    python benchmarks/gpu_step.py --methods simclr --batch 4 --size 32 --steps 2 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pretrain.augment_batched import BatchedTwoViews
from pretrain.config import load_pretrain_config
from pretrain.methods import build_method
from sslbench.backbones import build_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
GOAL, MOMENTUM_GOAL = 0.9, 0.85


def recipe_for(method: str) -> Path:
    path = CONFIGS / f"{method}_imagenet_r50.yaml"
    if not path.exists():
        raise SystemExit(f"no recipe {path} for method {method!r}")
    return path


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(
    name: str, args: argparse.Namespace, device: torch.device, gen: torch.Generator
) -> tuple[float, float, float]:
    """(full step img/s, floor img/s, goal ratio) of one method."""
    cfg = load_pretrain_config([recipe_for(name)], [f"data.image_size={args.size}"])
    arch_kwargs = {
        "stem": cfg.backbone.stem,
        "width": cfg.backbone.width,
        "zero_init_residual": cfg.backbone.zero_init_residual,
    }
    torch.manual_seed(0)
    method = build_method(build_backbone(cfg.backbone.arch, **arch_kwargs), cfg.method)
    bare = build_backbone(cfg.backbone.arch, **arch_kwargs)
    method = method.to(device, memory_format=torch.channels_last).train()
    bare = bare.to(device, memory_format=torch.channels_last).train()
    opt_m = torch.optim.SGD(method.parameters(), lr=1e-4, momentum=0.9)
    opt_b = torch.optim.SGD(bare.parameters(), lr=1e-4, momentum=0.9)
    augment = BatchedTwoViews(cfg.augment.pipeline, args.size)
    uint8 = torch.randint(
        0, 256, (args.batch, 3, args.size, args.size), generator=gen, dtype=torch.uint8
    ).to(device)
    sizes = torch.tensor([[args.size, args.size]]).repeat(args.batch, 1)
    resident = torch.randn(2 * args.batch, 3, args.size, args.size, generator=gen)
    resident = resident.to(device, memory_format=torch.channels_last)
    counter = iter(range(10**9))

    def full_step():
        views = augment(uint8, sizes, (0, 0, next(counter)))
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        opt_m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = method(views)["loss"]
        loss.backward()
        opt_m.step()
        method.after_optimizer_step(0.5)

    def bare_step():
        opt_b.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = bare(resident).float().mean()
        loss.backward()
        opt_b.step()

    for _ in range(args.warmup):
        full_step(), bare_step()
    step_t, bare_t = [], []
    for _ in range(args.steps):  # interleaved, so load and clocks hit both alike
        step_t.append(timed(full_step, device))
        bare_t.append(timed(bare_step, device))
    n = 2 * args.batch
    goal = MOMENTUM_GOAL if getattr(method, "target", None) is not None else GOAL
    return n / statistics.median(step_t), n / statistics.median(bare_t), goal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        default="simclr,byol,barlow_twins,unigrad",
        help="comma list of methods with a configs/pretrain/*_imagenet_r50.yaml",
    )
    parser.add_argument("--batch", type=int, default=256, help="source images (view pairs)")
    parser.add_argument("--size", type=int, default=224, help="view side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.batch < 2 or args.size < 8 or args.steps < 1:
        raise SystemExit(
            f"--batch {args.batch}, --size {args.size}, --steps {args.steps}: "
            "expected batch >= 2, size >= 8, steps >= 1"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(
        f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"batch {args.batch} images -> {2 * args.batch} views at {args.size} px, bf16, "
        f"channels_last, median of {args.steps}",
        flush=True,
    )
    print(f"{'method':<14} {'step img/s':>11} {'floor img/s':>12} {'ratio':>7} {'goal':>5}")
    gen = torch.Generator().manual_seed(0)
    for name in args.methods.split(","):
        step, floor, goal = measure(name, args, device, gen)
        print(
            f"{name:<14} {step:>11.1f} {floor:>12.1f} {step / floor:>6.2f}x {goal:>5.2f}",
            flush=True,
        )
        if device.type == "cuda":  # the previous method's memory
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
