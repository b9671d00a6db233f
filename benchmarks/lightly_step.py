"""sslbench's pretraining step against the same step assembled from lightly's heads and losses.

Issue 13 measured SimCLR 1.16-1.29x slower than lightly's SimCLRProjectionHead + NTXentLoss while
BYOL, Barlow Twins and VICReg sat at 0.98-1.04x; this keeps that comparison measured. Each side
gets the same backbone (sslbench's, built from the method's synthetic_r18 recipe), the same head
sizes, the same images and plain SGD; a step is forward + loss + backward + SGD step (+ the EMA
update for BYOL). sslbench's side is built through its own method registry, as
benchmarks/pretrain_step.py does. lightly's side forwards each view as its own batch, as lightly's
examples do; for SimCLR it is also timed forwarding both views as one batch of 2N, sslbench's
formulation (BatchNorm sees both views, as in the official code), which isolates what the batch
layout costs from what the code costs. Medians of interleaved repeats in one process, fixed
threads; a ratio above 1 means sslbench is slower. Needs lightly (`pip install -c constraints.txt
-e '.[bench]'`).

    python benchmarks/lightly_step.py --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import statistics

import lightly
import torch
from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models.modules import heads
from lightly.models.utils import deactivate_requires_grad, update_momentum
from pretrain_step import recipe_for, time_call  # this folder is on sys.path when run as a script
from torch import nn

from pretrain.config import load_pretrain_config
from pretrain.methods import build_method
from sslbench.backbones import build_backbone

METHODS = ("simclr", "byol", "barlow_twins", "vicreg")


def lightly_model(name: str, m, feature_dim: int) -> tuple[nn.Module, nn.Module]:
    """lightly's projection head (and BYOL's predictor as a second element) and loss for `name`,
    sized as sslbench's method config `m`."""
    if name == "simclr":
        head = heads.SimCLRProjectionHead(feature_dim, m.proj_hidden_dim, m.out_dim, m.proj_layers)
        return nn.ModuleList([head]), NTXentLoss(temperature=m.temperature)
    if name == "byol":
        return nn.ModuleList(
            [
                heads.BYOLProjectionHead(feature_dim, m.proj_hidden_dim, m.out_dim),
                heads.BYOLPredictionHead(m.out_dim, m.pred_hidden_dim, m.out_dim),
            ]
        ), NegativeCosineSimilarity()
    if name == "barlow_twins":
        head = heads.BarlowTwinsProjectionHead(feature_dim, m.proj_hidden_dim, m.out_dim)
        return nn.ModuleList([head]), BarlowTwinsLoss(lambda_param=m.lambd)
    if name == "vicreg":
        head = heads.VICRegProjectionHead(
            feature_dim, m.proj_hidden_dim, m.out_dim, num_layers=m.proj_layers
        )
        return nn.ModuleList([head]), VICRegLoss()
    raise SystemExit(f"no lightly counterpart for {name!r}; choose from {', '.join(METHODS)}")


def sslbench_step(cfg, backbone: nn.Module, views: list[torch.Tensor]):
    """A step closure of the method built through sslbench's registry."""
    method = build_method(backbone, cfg.method).train()
    opt = torch.optim.SGD(method.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        method(views)["loss"].backward()
        opt.step()
        method.after_optimizer_step(0.5)

    return step


def lightly_step(name: str, m, backbone: nn.Module, views: list[torch.Tensor], one_batch: bool):
    """A step closure of lightly's formulation; `one_batch` forwards both views as one batch."""
    parts, criterion = lightly_model(name, m, backbone.feature_dim)
    online = nn.ModuleList([backbone, parts]).train()
    opt = torch.optim.SGD(online.parameters(), lr=1e-4, momentum=0.9)
    x0, x1 = views
    x = torch.cat(views)
    if name == "byol":
        target = copy.deepcopy(nn.Sequential(backbone, parts[0]))
        deactivate_requires_grad(target)

        def loss_fn():
            p0, p1 = (parts[1](parts[0](backbone(v))) for v in (x0, x1))
            with torch.no_grad():
                t0, t1 = target(x0), target(x1)
            return 0.5 * (criterion(p0, t1) + criterion(p1, t0))

    elif one_batch:

        def loss_fn():
            return criterion(*parts[0](backbone(x)).chunk(2))

    else:

        def loss_fn():
            return criterion(parts[0](backbone(x0)), parts[0](backbone(x1)))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        if name == "byol":
            update_momentum(nn.Sequential(backbone, parts[0]), target, m=0.99)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--batch", type=int, default=64, help="view pairs per step")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"data.image_size={args.image_size}", f"backbone.width={args.width}"]
    print(
        f"batch {args.batch} pairs, {args.image_size} px, width {args.width}, "
        f"{args.threads} thread(s), {args.repeats} interleaved repeats, "
        f"lightly {lightly.__version__}"
    )
    print(
        f"{'method':<14} {'lightly':<12} {'sslbench s':>10} {'lightly s':>10} {'ratio':>7} "
        f"{'ratio range':>14}"
    )
    for name in args.methods.split(","):
        cfg = load_pretrain_config([recipe_for(name)], overrides)
        arch_kwargs = {
            "stem": cfg.backbone.stem,
            "zero_init_residual": cfg.backbone.zero_init_residual,
            "width": cfg.backbone.width,
        }
        gen = torch.Generator().manual_seed(0)
        size = args.image_size
        views = [torch.randn(args.batch, 3, size, size, generator=gen) for _ in range(2)]
        torch.manual_seed(0)
        ours = sslbench_step(cfg, build_backbone(cfg.backbone.arch, **arch_kwargs), views)
        layouts = ("two batches", "one batch") if name == "simclr" else ("two batches",)
        theirs = []
        for layout in layouts:
            torch.manual_seed(0)
            backbone = build_backbone(cfg.backbone.arch, **arch_kwargs)
            theirs.append(lightly_step(name, cfg.method, backbone, views, layout == "one batch"))
        for _ in range(args.warmup):
            for step in (ours, *theirs):
                step()
        ours_t, theirs_t = [], [[] for _ in theirs]
        for _ in range(args.repeats):  # interleaved, so machine load hits all alike
            ours_t += time_call(ours, 1)
            for step, times in zip(theirs, theirs_t):
                times += time_call(step, 1)
        a = statistics.median(ours_t)
        for layout, times in zip(layouts, theirs_t):
            ratios = sorted(x / y for x, y in zip(ours_t, times))
            b = statistics.median(times)
            print(
                f"{name:<14} {layout:<12} {a:>10.3f} {b:>10.3f} {a / b:>6.2f}x "
                f"{ratios[0]:>6.2f}-{ratios[-1]:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
