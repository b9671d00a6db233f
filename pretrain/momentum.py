"""The momentum (EMA) target encoder shared by MoCo, BYOL, UniGrad and every method's
`momentum_encoder: true` variant.

`momentum_encoder: false` never builds one: the target is then sg(online), not an EMA whose
schedule happens to start at 0 (the trap in UniGrad's code,
docs/methods.md#the-momentum-encoder-switch).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

SCHEDULES = ("cosine", "constant")


def momentum_at(base: float, progress: float, schedule: str = "cosine") -> float:
    """BYOL / MoCo v3 / UniGrad: m = 1 − (1 − base)(cos(π·progress) + 1)/2; MoCo v2: constant."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule {schedule!r}; expected one of {SCHEDULES}")


class EMATarget(nn.Module):
    """A gradient-free copy of an online module that follows it by exponential moving average.

    Only parameters are averaged; buffers (BN running statistics) are the target's own, updated
    by its forward passes in train mode, as in MoCo and BYOL.
    """

    def __init__(self, online: nn.Module, base_momentum: float, schedule: str = "cosine"):
        super().__init__()
        momentum_at(base_momentum, 0.0, schedule)  # validates the schedule name
        self.net = copy.deepcopy(online)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.base_momentum = base_momentum
        self.schedule = schedule

    @torch.no_grad()
    def update(self, online: nn.Module, progress: float) -> float:
        m = momentum_at(self.base_momentum, progress, self.schedule)
        target = list(self.net.parameters())
        source = [p.detach() for p in online.parameters()]
        if len(target) != len(source):
            raise ValueError("EMA target and online module have different parameter lists")
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, source, alpha=1.0 - m)
        return m

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)
