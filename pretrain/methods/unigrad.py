"""UniGrad (Tao et al., 2022): the unified gradient with negatives from a correlation EMA F.

For ℓ2-normalised online features u and target features ū of the other view,
    ∂L/∂u1 = −ū2 + λ F u1,   λ = 100
with F the EMA of the correlation of the *momentum-encoder* features of both views,
    tmp_F = (ū1ᵀū1 + ū2ᵀū2) / 2B, averaged over processes;
    F = tmp_F at the first step, then F ← ρF + (1 − ρ)tmp_F, ρ = 0.99, updated *before* use
(`fundamentalvision/UniGrad` project/pretrainer.py::loss_unigrad). F is a buffer, so it is in the
state dict and the resume checkpoint.

"original" is the README's explicit loss with F held constant,
    L = ½ Σ_views mean_b[−u1_b·ū2_b + (λ/2) u1_bᵀ F u1_b];
"exact" and "unigrad" are the code's surrogate ½(mean_b⟨sg(g1_b), u1_b⟩ + mean_b⟨sg(g2_b), u2_b⟩),
g1 = −ū2 + λu1F, whose gradient is L's: UniGrad is the one method whose unified form is its
exact gradient. "exact" reports L's value, "unigrad" the surrogate's, as the code does.
Projector [Linear(no bias)-BN-ReLU]×2 then Linear with bias; no predictor; the momentum follows
the cosine schedule from 0.996.
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
class UniGradConfig(MethodConfig):
    name: str = "unigrad"
    momentum_encoder: bool = True
    base_momentum: float = 0.996
    proj_hidden_dim: int = 2048
    proj_layers: int = 3
    out_dim: int = 2048
    lambd: float = 100.0  # λ, weight of the negative term
    rho: float = 0.99  # ρ, EMA factor of the correlation matrix F


def unigrad_loss(
    u: torch.Tensor, t: torch.Tensor, corr: torch.Tensor, lambd: float
) -> torch.Tensor:
    """mean_b[−u_b·t_b + (λ/2) u_bᵀ F u_b], F constant (the README's explicit loss)."""
    return (-(u * t).sum(dim=1) + 0.5 * lambd * ((u @ corr) * u).sum(dim=1)).mean()


def unigrad_grad(
    u: torch.Tensor, t: torch.Tensor, corr: torch.Tensor, lambd: float
) -> torch.Tensor:
    """∂ unigrad_loss/∂u = (−t + λuF)/B for symmetric F (UniGrad's g, divided by the mean's B)."""
    return (-t + lambd * u @ corr) / u.shape[0]


@register_method("unigrad", UniGradConfig)
class UniGrad(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: UniGradConfig):
        require(0.0 <= cfg.rho < 1.0, "rho", f"must lie in [0, 1), got {cfg.rho}")
        require(cfg.lambd >= 0, "lambd", f"must be >= 0, got {cfg.lambd}")
        super().__init__(backbone, cfg)
        self.register_correlation(cfg.out_dim)

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(in_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers)

    def unigrad_gradients(self, u1, u2, t1, t2):
        corr = self.update_correlation(t1, t2, self.cfg.rho)
        return -t2 + self.cfg.lambd * u1 @ corr, -t1 + self.cfg.lambd * u2 @ corr

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        z = self.embed(views)
        t = self.targets(views, z)
        lambd = self.cfg.lambd
        with full_precision(z[0]):
            u1, u2, t1, t2 = (F.normalize(upcast(x), dim=1) for x in (*z, *t))
            corr = self.update_correlation(t1, t2, self.cfg.rho)
            loss = 0.5 * (unigrad_loss(u1, t2, corr, lambd) + unigrad_loss(u2, t1, corr, lambd))
            if self.exact_form:
                surrogate = 0.5 * (
                    gradient_surrogate(u1, unigrad_grad(u1, t2, corr, lambd))
                    + gradient_surrogate(u2, unigrad_grad(u2, t1, corr, lambd))
                )
                loss = with_value(surrogate, loss)
            with torch.no_grad():
                negative = 0.25 * lambd * sum(((u @ corr) * u).sum(1).mean() for u in (u1, u2))
        z1, z2 = (upcast(zi.detach()) for zi in z)
        logs = {"negative_term": negative, **self.base_logs((z1, z2), (t1, t2))}
        return {"loss": loss, "logs": logs, "embeddings": (z1, z2)}
