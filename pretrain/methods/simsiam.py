"""SimSiam (Chen & He, 2021): predictor + stop-gradient, symmetric negative cosine.

L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),  D(p, z) = −p̂·ẑ.
`stop_gradient=False` removes the sg — the ablation that collapses (SimSiam Fig. 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import build_mlp
from .base import Method, MethodConfig, register_method


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    proj_hidden_dim: int = 2048
    proj_layers: int = 3
    out_dim: int = 2048
    pred_hidden_dim: int = 512
    stop_gradient: bool = True
    fix_pred_lr: bool = True


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(p, z, dim=-1).mean()


@register_method("simsiam", SimSiamConfig)
class SimSiam(Method):
    def __init__(self, backbone: nn.Module, cfg: SimSiamConfig):
        super().__init__(backbone, cfg)
        self.projector = build_mlp(backbone.feature_dim, cfg.proj_hidden_dim, cfg.out_dim,
                                   cfg.proj_layers, last_bn=True, last_bn_affine=False)
        self.predictor = build_mlp(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim, 2)

    def forward(self, views: list[torch.Tensor]) -> dict:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1, z2, p1, p2 = (t.float() for t in (z1, z2, p1, p2))
        t1, t2 = (z1.detach(), z2.detach()) if self.cfg.stop_gradient else (z1, z2)
        loss = 0.5 * negative_cosine(p1, t2) + 0.5 * negative_cosine(p2, t1)
        return {"loss": loss, "logs": {}, "embeddings": (z1.detach(), z2.detach())}

    def param_group_overrides(self) -> dict[str, dict]:
        return {"predictor.": {"fixed_lr": True}} if self.cfg.fix_pred_lr else {}
