"""The method interface the training engine drives.

A method owns the backbone and its heads (and any target encoder, queue or statistics buffer,
so that one state dict holds everything a resume needs). `forward(views)` returns the loss, a
dict of scalar logs, and the projector outputs of the first two views for collapse diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sslbench.registry import Registry


@dataclass
class MethodConfig:
    """Fields every method has; each method's config subclasses this."""

    name: str = "?"
    loss_form: str = "original"  # "original" | "exact" | "unigrad" (pretrain/unified.py)
    momentum_encoder: bool = False  # target = EMA copy (True) or sg(online) (False)
    base_momentum: float = 0.99
    momentum_schedule: str = "cosine"  # "cosine" | "constant"


@dataclass(frozen=True)
class MethodEntry:
    config: type
    build: Callable[[nn.Module, MethodConfig], Method]


METHODS: Registry[MethodEntry] = Registry("method")


def register_method(name: str, config: type):
    def add(cls):
        METHODS.register(name)(MethodEntry(config, cls))
        return cls

    return add


def method_config_class(name: str) -> type:
    return METHODS.get(name).config


def build_method(backbone: nn.Module, cfg: MethodConfig) -> Method:
    return METHODS.get(cfg.name).build(backbone, cfg)


class Method(nn.Module):
    """Base class: subclasses build heads in __init__ and implement `forward`."""

    def __init__(self, backbone: nn.Module, cfg: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def forward(self, views: list[torch.Tensor]) -> dict:
        """Return {"loss": scalar, "logs": {name: scalar tensor}, "embeddings": (z1, z2)}."""
        raise NotImplementedError

    def param_group_overrides(self) -> dict[str, dict]:
        """Extra optimizer-group keys by parameter-name prefix (e.g. a fixed predictor lr)."""
        return {}

    def norm_bias_overrides(self) -> dict | None:
        """Extra optimizer-group keys for all biases and norm weights (Barlow Twins' bias lr)."""
        return None

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Hook for state that follows the online weights (EMA targets); progress in [0, 1]."""
