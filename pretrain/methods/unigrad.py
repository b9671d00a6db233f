"""UniGrad (Tao et al., 2022): the unified gradient with negatives from a correlation EMA F.

For ℓ2-normalised online features u and target features ū of the other view,
    ∂L/∂u1 = −ū2 + λ F u1,   λ = 100                                       (METHODS.md §3.6)
with F the EMA of the correlation of the *momentum-encoder* features of both views,
    tmp_F = (ū1ᵀū1 + ū2ᵀū2) / 2B, averaged over processes;
    F = tmp_F at the first step, then F ← ρF + (1 − ρ)tmp_F, ρ = 0.99, updated *before* use
(`fundamentalvision/UniGrad` project/pretrainer.py::loss_unigrad). F is a buffer, so it is in the
state dict and the resume checkpoint.

loss_form "gradient" is the code's surrogate ½(mean_b⟨sg(g1_b), u1_b⟩ + mean_b⟨sg(g2_b), u2_b⟩),
g1 = −ū2 + λu1F; "original" is the README's explicit loss with F held constant,
    L = ½ Σ_views mean_b[−u1_b·ū2_b + (λ/2) u1_bᵀ F u1_b],
whose gradient is the same. Both report L's value. Projector [Linear(no bias)-BN-ReLU]×2 then
Linear with bias; no predictor; the momentum follows the cosine schedule from 0.996.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from ..unified import gradient_surrogate, with_value
from .base import MethodConfig, register_method
from .siamese import SiameseMethod, full_precision, require, upcast


@dataclass
class UniGradConfig(MethodConfig):
    name: str = "unigrad"
    momentum_encoder: bool = True
    base_momentum: float = 0.996
    proj_hidden_dim: int = 2048
    proj_layers: int = 3
    out_dim: int = 2048
    lambd: float = 100.0  # λ, weight of the negative term
    rho: float = 0.99  # ρ, EMA factor of the correlation matrix F


def correlation(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """tmp_F = (t1ᵀt1 + t2ᵀt2) / 2B of one process's target features."""
    return (t1.T @ t1 + t2.T @ t2) / (2 * t1.shape[0])


def unigrad_loss(u: torch.Tensor, t: torch.Tensor, corr: torch.Tensor, lambd: float) -> torch.Tensor:
    """mean_b[−u_b·t_b + (λ/2) u_bᵀ F u_b], F constant (the README's explicit loss)."""
    return (-(u * t).sum(dim=1) + 0.5 * lambd * ((u @ corr) * u).sum(dim=1)).mean()


def unigrad_grad(u: torch.Tensor, t: torch.Tensor, corr: torch.Tensor, lambd: float) -> torch.Tensor:
    """∂ unigrad_loss/∂u = (−t + λuF)/B for symmetric F (UniGrad's g, divided by the mean's B)."""
    return (-t + lambd * u @ corr) / u.shape[0]


@register_method("unigrad", UniGradConfig)
class UniGrad(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: UniGradConfig):
        require(0.0 <= cfg.rho < 1.0, "rho", f"must lie in [0, 1), got {cfg.rho}")
        require(cfg.lambd >= 0, "lambd", f"must be >= 0, got {cfg.lambd}")
        projector = build_mlp(backbone.feature_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers)
        super().__init__(backbone, cfg, projector)
        self.register_buffer("correlation_ema", torch.zeros(cfg.out_dim, cfg.out_dim))
        self.register_buffer("correlation_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_correlation(self, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        """F ← tmp_F at the first step, ρF + (1 − ρ)tmp_F after; returns the updated F."""
        tmp = D.all_reduce_mean(correlation(t1, t2))
        ema = self.cfg.rho * self.correlation_ema + (1 - self.cfg.rho) * tmp
        self.correlation_ema.copy_(torch.where(self.correlation_updates == 0, tmp, ema))
        self.correlation_updates += 1
        return self.correlation_ema.clone()

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = self.embed(views)
        t = self.targets(views, z)
        lambd = self.cfg.lambd
        with full_precision(z[0]):
            u1, u2, t1, t2 = (F.normalize(upcast(x), dim=1) for x in (*z, *t))
            corr = self.update_correlation(t1, t2)
            loss = 0.5 * (unigrad_loss(u1, t2, corr, lambd) + unigrad_loss(u2, t1, corr, lambd))
            if self.gradient_form:
                surrogate = 0.5 * (gradient_surrogate(u1, unigrad_grad(u1, t2, corr, lambd))
                                   + gradient_surrogate(u2, unigrad_grad(u2, t1, corr, lambd)))
                loss = with_value(surrogate, loss)
            with torch.no_grad():
                negative = 0.25 * lambd * sum(((u @ corr) * u).sum(1).mean() for u in (u1, u2))
        z1, z2 = (upcast(zi.detach()) for zi in z)
        logs = {"negative_term": negative, **self.base_logs((z1, z2), (t1, t2))}
        return {"loss": loss, "logs": logs, "embeddings": (z1, z2)}
