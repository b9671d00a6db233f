"""Images/s of one pretraining step per method versus the bare backbone forward+backward.

Both sides see the same images: a step on B view pairs is timed against backbone fwd+bwd (plus
an SGD step) on the same 2B images, so the ratio is the cost of heads, targets and loss. A method
with a momentum encoder must also run it forward on the 2B images, so its floor is fwd+bwd plus
one no-grad forward; the last column is the step against that floor (the overhead of the code
rather than of the method's definition). Each
method runs its synthetic_r18 recipe (backbone, heads, image size) unless overridden. Data
loading is excluded (random tensors). Medians of interleaved repeats, one process, fixed threads.
`--compile` also times the step through torch.compile (train.compile), interleaved with the
eager one, and prints compiled img/s and eager/compiled time (compilation in the warm-up).

    python benchmarks/pretrain_step.py --methods simsiam,simclr --batch 64 --threads 1
    python benchmarks/pretrain_step.py --methods all --batch 32 --repeats 5
    python benchmarks/pretrain_step.py --methods byol --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pretrain.config import load_pretrain_config
from pretrain.methods import METHODS, build_method
from sslbench.backbones import build_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def recipe_for(method: str) -> Path:
    path = CONFIGS / f"{method}_synthetic_r18.yaml"
    if not path.exists():
        raise SystemExit(f"no recipe {path} for method {method!r}")
    return path


def time_call(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="simsiam", help="comma list, or 'all'")
    parser.add_argument("--batch", type=int, default=64, help="view pairs per step")
    parser.add_argument("--image-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument(
        "--width", type=int, default=None, help="backbone width; default: the recipe's"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the compiled step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = (
        [m for m in METHODS.names() if (CONFIGS / f"{m}_synthetic_r18.yaml").exists()]
        if args.methods == "all"
        else args.methods.split(",")
    )

    overrides = [f"data.image_size={args.image_size}"] if args.image_size else []
    overrides += [f"backbone.width={args.width}"] if args.width else []

    print(
        f"batch {args.batch} pairs ({2 * args.batch} images), {args.threads} thread(s), "
        f"median of {args.repeats}"
    )
    print(
        f"{'method':<14} {'arch':<16} {'px':>3} {'step img/s':>11} {'backbone img/s':>15} "
        f"{'ratio':>7} "
        f"{'vs floor':>9}" + (f" {'compiled img/s':>15} {'speed-up':>9}" if args.compile else "")
    )
    for name in names:
        cfg = load_pretrain_config([recipe_for(name)], overrides)
        arch_kwargs = {
            "stem": cfg.backbone.stem,
            "zero_init_residual": cfg.backbone.zero_init_residual,
            "width": cfg.backbone.width,
        }
        size = cfg.data.image_size
        gen = torch.Generator().manual_seed(0)
        views = [torch.randn(args.batch, 3, size, size, generator=gen) for _ in range(2)]
        images = torch.cat(views)
        torch.manual_seed(0)
        method = build_method(build_backbone(cfg.backbone.arch, **arch_kwargs), cfg.method).train()
        bare = build_backbone(cfg.backbone.arch, **arch_kwargs).train()
        opt_m = torch.optim.SGD(method.parameters(), lr=1e-4, momentum=0.9)
        opt_b = torch.optim.SGD(bare.parameters(), lr=1e-4, momentum=0.9)

        def method_step(model=method):
            opt_m.zero_grad(set_to_none=True)
            model(views)["loss"].backward()
            opt_m.step()
            method.after_optimizer_step(0.5)

        compiled = torch.compile(method) if args.compile else None

        def backbone_step():
            opt_b.zero_grad(set_to_none=True)
            bare(images).sum().backward()
            opt_b.step()

        @torch.no_grad()
        def target_forward():  # what an EMA target costs at least: a train-mode forward
            bare(images)

        has_target = getattr(method, "target", None) is not None
        for _ in range(args.warmup):
            method_step(), backbone_step(), target_forward()
            if compiled is not None:
                method_step(compiled)
        step_t, bare_t, fwd_t, comp_t = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so machine load hits all alike
            step_t += time_call(method_step, 1)
            bare_t += time_call(backbone_step, 1)
            fwd_t += time_call(target_forward, 1) if has_target else [0.0]
            comp_t += time_call(lambda: method_step(compiled), 1) if compiled is not None else []
        step, base = statistics.median(step_t), statistics.median(bare_t)
        floor = base + statistics.median(fwd_t)
        n = 2 * args.batch
        arch = f"{cfg.backbone.arch}/w{cfg.backbone.width}"
        tail = ""
        if comp_t:
            comp = statistics.median(comp_t)
            tail = f" {n / comp:>15.1f} {step / comp:>8.2f}x"
        print(
            f"{name:<14} {arch:<16} {size:>3} {n / step:>11.1f} {n / base:>15.1f} "
            f"{step / base:>6.2f}x "
            f"{step / floor:>8.2f}x{tail}",
            flush=True,
        )


if __name__ == "__main__":
    main()
