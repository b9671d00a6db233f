"""SimSiam (Chen & He, 2021): predictor + stop-gradient, symmetric negative cosine.

L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),  D(p, z) = −p̂·ẑ  (SimSiam Eq. 1–2).
`stop_gradient=False` removes the sg — the ablation that collapses (SimSiam Fig. 2).

Gradient form. UniGrad writes the predictor branch's gradient for a *linear* predictor W as
∂(−cos(Wu1, ū2))/∂u1 = (1/‖Wu1‖)[−Wᵀū2 + λWᵀWu1], λ = (Wu1·ū2)/‖Wu1‖² (METHODS.md §3.3). That
expression is the chain rule through W of the unified form at the predictor output p = Wu1,

    ∂D(p, t)/∂p = (1/‖p‖)[−t̂ + λp],   λ = (p·t̂)/‖p‖²,

so we inject this gradient at p and let autograd apply the predictor's Jacobian (Wᵀ for a linear
predictor, the MLP's for ours). The predictor stays learnable, so the gradient form equals the
original loss's gradient exactly and the two forms differ in nothing else. (UniGrad's
`loss_byol_directpred_grad` instead replaces the learnt predictor by a DirectPred one built from
its correlation EMA F, with WᵀW ≈ F/s_max + ε²I: a different predictor, which is what
`method.name=unigrad` studies.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import build_mlp
from ..unified import gradient_surrogate, with_value
from .base import MethodConfig, register_method
from .siamese import SiameseMethod, full_precision, require, upcast


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    proj_hidden_dim: int = 2048
    proj_layers: int = 3
    proj_last_bn: bool = True  # BN(affine=False) on the projector output
    out_dim: int = 2048
    pred_hidden_dim: int = 512
    stop_gradient: bool = True
    fix_pred_lr: bool = True


def negative_cosine(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """D(p, t) = −mean_b cos(p_b, t_b)."""
    return -F.cosine_similarity(p, t, dim=-1).mean()


def negative_cosine_grad(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∂D(p, t)/∂p = (1/(B‖p‖))[−t̂ + λp], λ = (p·t̂)/‖p‖² (UniGrad's form, METHODS.md §3.3)."""
    t_hat = F.normalize(t, dim=1)
    norm = p.norm(dim=1, keepdim=True)
    lam = (p * t_hat).sum(dim=1, keepdim=True) / norm.square()
    return (-t_hat + lam * p) / (norm * p.shape[0])


@register_method("simsiam", SimSiamConfig)
class SimSiam(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: SimSiamConfig):
        if not cfg.stop_gradient:
            require(not cfg.momentum_encoder, "stop_gradient",
                    "false needs momentum_encoder=false (an EMA target carries no gradient)")
            require(cfg.loss_form == "original", "stop_gradient",
                    "false needs loss_form=original (the gradient form holds the target fixed)")
        projector = build_mlp(backbone.feature_dim, cfg.proj_hidden_dim, cfg.out_dim,
                              cfg.proj_layers, last_bn=cfg.proj_last_bn, last_bn_affine=False)
        super().__init__(backbone, cfg, projector)
        self.predictor = build_mlp(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim, 2)

    @staticmethod
    def combine(d12: torch.Tensor, d21: torch.Tensor) -> torch.Tensor:
        """The symmetrised loss from the two directions' D (SimSiam Eq. 2)."""
        return 0.5 * (d12 + d21)

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = self.embed(views)
        p1, p2 = (upcast(self.predictor(zi)) for zi in z)
        t1, t2 = (upcast(zi) for zi in (self.targets(views, z) if self.cfg.stop_gradient else z))
        with full_precision(p1):
            d12, d21 = negative_cosine(p1, t2), negative_cosine(p2, t1)
            loss = self.combine(d12, d21)
            if self.gradient_form:
                surrogate = self.combine(gradient_surrogate(p1, negative_cosine_grad(p1, t2)),
                                         gradient_surrogate(p2, negative_cosine_grad(p2, t1)))
                loss = with_value(surrogate, loss)
        z1, z2 = (upcast(zi.detach()) for zi in z)
        logs = {"pred_cos": -0.5 * (d12 + d21).detach(), **self.base_logs((z1, z2), (t1, t2))}
        return {"loss": loss, "logs": logs, "embeddings": (z1, z2)}

    def param_group_overrides(self) -> dict[str, dict]:
        return {"predictor.": {"fixed_lr": True}} if self.cfg.fix_pred_lr else {}
