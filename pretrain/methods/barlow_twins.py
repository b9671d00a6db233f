"""Barlow Twins (Zbontar et al., 2021): drive the cross-correlation of the two views to I.

ẑ = BN(z) without affine over the *global* batch, C = ẑ1ᵀẑ2 / N,
L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²,  λ = 0.0051  (BT Eq. 1–2, `barlowtwins/main.py`).

The features of all processes are gathered with gradient before the normalisation, so the BN
statistics and C are those of the global batch; every process computes the same loss, the
gather's backward sums the copies and DDP's mean undoes the sum.

Gradient form, with respect to the standardised features (METHODS.md §3.4):
∂L/∂ẑ1_b = (2/N)[−ẑ2_b + (λ/N) Σ_v (ẑ2_v·ẑ2_b) ẑ1_v + (1 − λ) diag(C) ẑ2_b]
(the middle term is λ·C ẑ2_b). Unlike UniGrad's code, which drops the diagonal term and uses
ℓ2-normalised features with its own λ, we keep every term, so the gradient form is exactly the
gradient of L; autograd carries it through the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from .base import MethodConfig, register_method
from .siamese import SiameseMethod, full_precision, require, upcast


@dataclass
class BarlowTwinsConfig(MethodConfig):
    name: str = "barlow_twins"
    proj_hidden_dim: int = 8192
    proj_layers: int = 3
    out_dim: int = 8192
    lambd: float = 0.0051
    bias_lr_scale: float = 0.024  # lr of biases and BN parameters: 0.0048 / 0.2 (BT main.py)


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode: zero mean, unit (biased) variance per column."""
    return (z - z.mean(dim=0)) * torch.rsqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(a: torch.Tensor, b: torch.Tensor, lambd: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L(â, b̂) for standardised features; also returns the on- and off-diagonal sums."""
    c = a.T @ b / a.shape[0]
    diag = torch.diagonal(c)
    on_diag = (1 - diag).square().sum()
    off_diag = c.square().sum() - diag.square().sum()
    return on_diag + lambd * off_diag, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


def barlow_twins_grad(a: torch.Tensor, b: torch.Tensor, lambd: float) -> torch.Tensor:
    """∂L(â, b̂)/∂â = (2/N)[−b̂ + λ b̂Cᵀ + (1 − λ) b̂·diag(C)] (METHODS.md §3.4)."""
    n = a.shape[0]
    c = a.T @ b / n
    return (2.0 / n) * (-b + lambd * (b @ c.T) + (1.0 - lambd) * b * torch.diagonal(c))


@register_method("barlow_twins", BarlowTwinsConfig)
class BarlowTwins(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig):
        require(cfg.lambd >= 0, "lambd", f"must be >= 0, got {cfg.lambd}")
        require(cfg.bias_lr_scale > 0, "bias_lr_scale", f"must be > 0, got {cfg.bias_lr_scale}")
        projector = build_mlp(backbone.feature_dim, cfg.proj_hidden_dim, cfg.out_dim,
                              cfg.proj_layers, last_bias=False)
        super().__init__(backbone, cfg, projector)

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = tuple(upcast(zi) for zi in self.embed(views))
        t = tuple(upcast(ti) for ti in self.targets(views, z))
        lambd = self.cfg.lambd
        with full_precision(z[0]):
            a1, a2 = (standardise(D.gather_with_grad(zi)) for zi in z)
            b1, b2 = (None, None) if self.target is None else (
                standardise(D.gather_no_grad(ti)) for ti in t)
            loss, terms = self.pair_objective(
                a1, a2, b1, b2, lambda x, y: barlow_twins_loss(x, y, lambd),
                lambda x, y: barlow_twins_grad(x, y, lambd))
        z1, z2 = (zi.detach() for zi in z)
        return {"loss": loss, "logs": {**terms, **self.base_logs((z1, z2), t)},
                "embeddings": (z1, z2)}

    def norm_bias_overrides(self) -> dict:
        return {"lr_scale": self.cfg.bias_lr_scale}
