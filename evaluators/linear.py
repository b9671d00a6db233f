"""Linear evaluation, in two protocols that are recorded as different protocols.

fast: multinomial logistic regression on cached, standardised features (L-BFGS on the full batch,
    or mini-batch SGD for banks too large for that); (lr, weight decay) swept on val, test scored
    once with the chosen pair. Minutes instead of days; it is what the ablations use.
standard: the protocol papers report: a linear layer on the frozen backbone (BatchNorm in eval
    mode) trained on random-resized crops and flips with SGD or LARS, a cosine schedule and the
    lr x batch/256 rule. Its number is not interchangeable with the fast one.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sslbench.artifact import input_normalization
from sslbench.config import to_dict
from sslbench.optim import build_optimizer, param_groups, scaled_lr, set_lr, warmup_cosine
from sslbench.results import HITS_KEY, TaskOutput, pack_hits

from .accuracy import scored
from .context import EvalContext
from .training import Classifier, SeededAugmentation, fit, train_transform, val_test_scores

SOLVERS = ("lbfgs", "sgd")


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature by its train mean and std (constant features: scale 1)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float,
    lr: float = 1.0,
    solver: str = "lbfgs",
    max_iter: int = 500,
    epochs: int = 100,
    batch_size: int = 1024,
    seed: int = 0,
) -> nn.Linear:
    """Minimise mean cross-entropy + weight_decay/2 * ||W||^2 (bias not decayed).

    This is scikit-learn's LogisticRegression objective with C = 1 / (weight_decay * n).
    lbfgs: full batch, strong-Wolfe line search (lr scales its first step). sgd: momentum 0.9,
    cosine-decayed lr, batches in an order seeded by `seed`. A diverged fit returns NaN weights.
    """
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    def objective(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(xb), yb) + 0.5 * weight_decay * head.weight.pow(2).sum()

    if solver == "lbfgs":
        opt = torch.optim.LBFGS(
            head.parameters(),
            lr=lr,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = objective(x, y)
            loss.backward()
            return loss

        opt.step(closure)
    elif solver == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        total, step = epochs * math.ceil(len(x) / batch_size), 0
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=gen).to(x.device).split(batch_size):
                set_lr(opt, warmup_cosine(step, total, 0, lr), lr)
                loss = objective(x[batch], y[batch])
                if not torch.isfinite(loss):
                    with torch.no_grad():
                        head.weight.fill_(math.nan)
                    return head
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
    else:
        raise ValueError(f"unknown probe.solver {solver!r}; expected one of {SOLVERS}")
    return head


@torch.no_grad()
def _accuracy(
    head: nn.Linear, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1/top-5 (%) and the per-sample top-1 hits; a diverged head hits nothing."""
    scores = head(x)
    if not torch.isfinite(scores).all():
        return {"top1": 0.0, "top5": 0.0}, torch.zeros(len(y), dtype=torch.bool)
    return scored(scores.cpu(), y.cpu())


def fast_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    lrs: list[float],
    weight_decays: list[float],
    solver: str = "lbfgs",
    max_iter: int = 500,
    epochs: int = 100,
    batch_size: int = 1024,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> tuple[dict[str, float], dict]:
    """Sweep (lr, weight decay) on val; train on train; score test once with the chosen pair.

    Ties on val top-1 go to val top-5, then to the larger weight decay and the smaller lr.
    A setting that diverges scores 0 (and is listed in the grid as such).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown probe.solver {solver!r}; expected one of {SOLVERS}")
    xs = standardise(train[0].to(device), val[0].to(device), test[0].to(device))
    ys = [y.to(device) for y in (train[1], val[1], test[1])]
    grid = list(itertools.product(sorted(set(lrs)), sorted(set(weight_decays), reverse=True)))
    results = []
    for lr, wd in tqdm(
        grid, desc=f"linear fast ({solver})", unit="fit", leave=False, disable=not progress
    ):
        head = fit_logistic(
            xs[0],
            ys[0],
            num_classes,
            weight_decay=wd,
            lr=lr,
            solver=solver,
            max_iter=max_iter,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
        results.append((lr, wd, head, _accuracy(head, xs[1], ys[1])[0]))
    best = max(
        range(len(results)), key=lambda i: (results[i][3]["top1"], results[i][3]["top5"], -i)
    )
    lr, wd, head, val_scores = results[best]
    test_scores, test_hits = _accuracy(head, xs[2], ys[2])
    metrics = {**test_scores, "val_top1": val_scores["top1"], "val_top5": val_scores["top5"]}
    details = {
        "selected": {"lr": lr, "weight_decay": wd},
        HITS_KEY: pack_hits(test_hits),
        "val_grid": [
            {"lr": lr_, "weight_decay": wd_, "val_top1": acc["top1"], "val_top5": acc["top5"]}
            for lr_, wd_, _, acc in results
        ],
    }
    return metrics, details


def standard_probe(ctx: EvalContext, protocol: dict) -> tuple[dict[str, float], dict] | None:
    """Train a linear head on the frozen backbone with the recipe in ctx.cfg.probe (whose
    record's protocol part is `protocol`); the metrics and details on the main process, None on
    the others."""
    cfg, run = ctx.cfg.probe, ctx.cfg.run
    train = SeededAugmentation(
        ctx.datasets["train"],
        train_transform(
            ctx.cfg.data.image_size, cfg.crop_min_scale, *input_normalization(ctx.manifest)
        ),
        run.seed,
    )
    torch.manual_seed(run.seed)
    model = Classifier(ctx.backbone, ctx.num_classes, frozen=True).to(ctx.device)
    lr = scaled_lr(cfg.base_lr, cfg.batch_size)
    optimizer = build_optimizer(
        cfg.optimizer, param_groups(model, cfg.weight_decay), lr, cfg.momentum, cfg.weight_decay
    )
    loss = fit(
        model,
        train,
        optimizer,
        lr,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        warmup_epochs=cfg.warmup_epochs,
        seed=run.seed,
        device=ctx.device,
        num_workers=ctx.cfg.data.num_workers,
        progress=run.progress,
        desc=f"linear standard ({cfg.optimizer})",
        resume=ctx.resume_state(protocol),
    )
    scores = val_test_scores(model, ctx)
    if scores is None:  # not the main process
        return None
    metrics, test_hits = scores
    return metrics, {"lr": lr, "final_train_loss": loss, HITS_KEY: pack_hits(test_hits)}


def run(ctx: EvalContext) -> TaskOutput | None:
    cfg = ctx.cfg.probe
    if cfg.name == "standard":
        protocol = {"probe": to_dict(cfg)}
        scores = standard_probe(ctx, protocol)
        if scores is None:  # not the main process
            return None
        metrics, details = scores
        return TaskOutput(metrics, protocol, details)
    train, val, test = ctx.all_features()
    if train.features is None:  # the fast probe runs on the main process, which holds them
        return None
    metrics, details = fast_probe(
        (train.features, train.labels),
        (val.features, val.labels),
        (test.features, test.labels),
        ctx.num_classes,
        lrs=list(cfg.lr),
        weight_decays=list(cfg.weight_decay),
        solver=cfg.solver,
        max_iter=cfg.max_iter,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=ctx.cfg.run.seed,
        device=ctx.device,
        progress=ctx.cfg.run.progress,
    )
    solver_keys = ("max_iter",) if cfg.solver == "lbfgs" else ("epochs", "batch_size")
    protocol = {
        "name": "fast",
        "solver": cfg.solver,
        "lr": sorted(set(cfg.lr)),
        "weight_decay": sorted(set(cfg.weight_decay)),
        **{k: cfg[k] for k in solver_keys},
    }
    return TaskOutput(metrics, {"probe": protocol}, details)
