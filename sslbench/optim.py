"""Optimisers and learning-rate schedules shared by pretraining and linear probing.

Parameter groups carry the per-group knobs the seed papers use: weight decay and LARS adaptation
skipped for biases and normalisation weights (SimCLR, BYOL, MoCo v3, Barlow Twins), a constant
predictor lr (SimSiam's fix-pred-lr) and a scaled bias lr (Barlow Twins). The schedule sets one
lr per step and `set_lr` spreads it over the groups.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "lars", "adamw")
# Keys every group carries besides params, weight_decay and name; see `set_lr` and `LARS`.
GROUP_DEFAULTS = {"lr_scale": 1.0, "fixed_lr": False, "lars_exclude": False}


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of the seed papers: lr = base_lr × batch / 256."""
    return base_lr * batch_size / 256


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_norm_bias: bool = True,
    overrides: dict[str, dict] | None = None,
    *,
    norm_bias_overrides: dict | None = None,
) -> list[dict]:
    """Split the trainable parameters of `model` into optimizer groups.

    exclude_norm_bias: parameters with ndim <= 1 (biases, BN/LN weights) get no weight decay and
        no LARS adaptation ("lars_exclude").
    overrides: extra group keys for parameters whose name starts with a prefix, e.g.
        {"predictor.": {"fixed_lr": True}}; where prefixes nest, the longest match wins.
    norm_bias_overrides: extra group keys for the ndim <= 1 parameters, e.g. Barlow Twins' bias
        lr {"lr_scale": 0.024} (0.0048 / 0.2); applied before the prefix overrides.
    """
    overrides = overrides or {}
    split_norm_bias = exclude_norm_bias or norm_bias_overrides is not None
    groups: dict[tuple[str | None, bool], dict] = {}
    for name, param in model.named_parameters():  # yields a shared parameter once
        if not param.requires_grad:
            continue
        prefix = max((p for p in overrides if name.startswith(p)), key=len, default=None)
        is_norm_bias = split_norm_bias and param.ndim <= 1
        key = (prefix, is_norm_bias)
        if key not in groups:
            kind = "norm_bias" if is_norm_bias else "weights" if split_norm_bias else "params"
            group = {
                "params": [],
                "name": (prefix or "") + kind,
                "weight_decay": weight_decay,
                **GROUP_DEFAULTS,
            }
            if is_norm_bias:
                if exclude_norm_bias:
                    group.update(weight_decay=0.0, lars_exclude=True)
                group.update(norm_bias_overrides or {})
            if prefix is not None:
                group.update(overrides[prefix])
            groups[key] = group
        groups[key]["params"].append(param)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as in MoCo v3 / BYOL.

    For a parameter p of a group without "lars_exclude": g ← g + wd·p, then
    g ← g · eta·||p|| / ||g|| (ratio 1 where either norm is 0). Excluded parameters (biases,
    norm weights) use the raw gradient. Then mu ← momentum·mu + g and p ← p − lr·mu.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ):
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False),
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, a group at a time through torch's
        multi-tensor (_foreach) kernels: a few launches per group instead of several per
        parameter, and no device sync (the trust ratio is a torch.where, not a Python branch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if not group["lars_exclude"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                trust = torch.where(
                    (p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm, 1.0
                )
                torch._foreach_mul_(updates, list(trust.unbind()))
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mus = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float = 0.9, weight_decay: float = 0.0, **kw
) -> torch.optim.Optimizer:
    """ "sgd", "lars" or "adamw" over `groups`; a group's own weight_decay beats the argument.

    AdamW ignores `momentum` (pass betas=... in kw). The groups start at lr × lr_scale. SGD
    and AdamW take torch's fused kernel (one launch for the whole step) when every parameter is
    on CUDA; LARS is multi-tensor on any device.
    """
    if name in ("sgd", "adamw"):
        kw.setdefault("fused", all_on_cuda(groups))
    if name == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw
        )
    elif name == "lars":
        optimizer = LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kw)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    set_lr(optimizer, lr, lr)
    return optimizer


def all_on_cuda(groups: list[dict]) -> bool:
    """Whether every parameter of `groups` is on CUDA, where torch's fused optimisers run. On the
    CPU the default (foreach) step is kept: it is what the bit-exact resume tests pin."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_lr: float = 0.0,
    warmup_start_lr: float = 0.0,
) -> float:
    """The lr at 0-based `step`: linear warm-up to base_lr, then a half cosine down to final_lr.

    The cosine spans the total − warmup steps after the warm-up (UniGrad's code divides by total
    instead, so its lr never reaches final_lr); from step `total_steps` on the lr is final_lr.
    """
    if step < 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need step >= 0 and 0 <= warmup_steps <= total_steps, got step={step}, "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if step >= total_steps:
        return final_lr
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Give every group the scheduled `lr` (`base_lr` if the group is fixed_lr) × its lr_scale."""
    for group in optimizer.param_groups:
        fixed = group.get("fixed_lr", GROUP_DEFAULTS["fixed_lr"])
        group["lr"] = (base_lr if fixed else lr) * group.get("lr_scale", GROUP_DEFAULTS["lr_scale"])
