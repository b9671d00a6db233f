"""Barlow Twins (Zbontar et al., 2021): drive the cross-correlation of the two views to I.

ẑ = BN(z) without affine over the *global* batch, C = ẑ1ᵀẑ2 / N,
L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²,  λ = 0.0051  (BT Eq. 1–2, `barlowtwins/main.py`).

The features of all processes are gathered with gradient before the normalisation, so the BN
statistics and C are those of the global batch; every process computes the same loss, the
gather's backward sums the copies and DDP's mean undoes the sum.

Exact form, with respect to the standardised features:
∂L/∂ẑ1_b = (2/N)[−ẑ2_b + (λ/N) Σ_v (ẑ2_v·ẑ2_b) ẑ1_v + (1 − λ) diag(C) ẑ2_b]
(the middle term is λ·C ẑ2_b). Every term is kept, so the exact form is the gradient of L;
autograd carries it through the standardisation.

Unigrad form (`loss_barlow_twins_grad_mm` in fundamentalvision/UniGrad project/pretrainer.py,
configs/barlow_twins_grad_mm.py): ℓ2-normalised features instead of standardised ones, the
diagonal term dropped, 2/N folded into the scale and λ = 50:

    g1_b = 2(−ū2_b + (λ/N) Σ_v (ū2_b·ū2_v) u1_v),

g2 alike with the views swapped. The weights come from the target view-2 similarities, the
vectors summed are the detached online view-1 features, and v runs over the gathered global
batch, N of them (the code's `whole_batch_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from .base import MethodConfig, register_method
from .siamese import SiameseMethod, full_precision, require, upcast


@dataclass
class BarlowTwinsForm:
    """The unigrad form's constant (`method.unigrad.*`), the official code's default."""

    lambd: float = 50.0  # λ: `lambd` of configs/barlow_twins_grad_mm.py


@dataclass
class BarlowTwinsConfig(MethodConfig):
    name: str = "barlow_twins"
    proj_hidden_dim: int = 8192
    proj_layers: int = 3
    out_dim: int = 8192
    lambd: float = 0.0051
    bias_lr_scale: float = 0.024  # lr of biases and BN parameters: 0.0048 / 0.2 (BT main.py)
    unigrad: BarlowTwinsForm = field(default_factory=BarlowTwinsForm)


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode: zero mean, unit (biased) variance per column."""
    return (z - z.mean(dim=0)) * torch.rsqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(
    a: torch.Tensor, b: torch.Tensor, lambd: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L(â, b̂) for standardised features; also returns the on- and off-diagonal sums."""
    c = a.T @ b / a.shape[0]
    diag = torch.diagonal(c)
    on_diag = (1 - diag).square().sum()
    off_diag = c.square().sum() - diag.square().sum()
    return on_diag + lambd * off_diag, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


def barlow_twins_grad(a: torch.Tensor, b: torch.Tensor, lambd: float) -> torch.Tensor:
    """∂L(â, b̂)/∂â = (2/N)[−b̂ + λ b̂Cᵀ + (1 − λ) b̂·diag(C)]."""
    n = a.shape[0]
    c = a.T @ b / n
    return (2.0 / n) * (-b + lambd * (b @ c.T) + (1.0 - lambd) * b * torch.diagonal(c))


@torch.no_grad()
def barlow_twins_unigrad(
    target: torch.Tensor, target_bank: torch.Tensor, online_bank: torch.Tensor, lambd: float
) -> torch.Tensor:
    """g = 2(−ū2 + λ(ū2·Ū2ᵀ)U1/N): `target` the local ū2, the banks the gathered ū2 and u1."""
    n = target_bank.shape[0]
    return 2 * (-target + lambd * (target @ target_bank.T) @ online_bank / n)


@register_method("barlow_twins", BarlowTwinsConfig)
class BarlowTwins(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: BarlowTwinsConfig):
        require(cfg.lambd >= 0, "lambd", f"must be >= 0, got {cfg.lambd}")
        require(cfg.bias_lr_scale > 0, "bias_lr_scale", f"must be > 0, got {cfg.bias_lr_scale}")
        require(cfg.unigrad.lambd >= 0, "unigrad.lambd", f"must be >= 0, got {cfg.unigrad.lambd}")
        super().__init__(backbone, cfg)

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(in_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers, last_bias=False)

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        z = tuple(upcast(zi) for zi in self.embed(views))
        t = tuple(upcast(ti) for ti in self.targets(views, z))
        lambd = self.cfg.lambd
        with full_precision(z[0]):
            a1, a2 = (standardise(D.gather_with_grad(zi)) for zi in z)
            b1, b2 = (
                (None, None)
                if self.target is None
                else (standardise(D.gather_no_grad(ti)) for ti in t)
            )
            loss, terms = self.pair_objective(
                a1,
                a2,
                b1,
                b2,
                lambda x, y: barlow_twins_loss(x, y, lambd),
                lambda x, y: barlow_twins_grad(x, y, lambd),
            )
        z1, z2 = (zi.detach() for zi in z)
        return {
            "loss": loss,
            "logs": {**terms, **self.base_logs((z1, z2), t)},
            "embeddings": (z1, z2),
        }

    def unigrad_gradients(self, u1, u2, t1, t2):
        online1, online2, bank1, bank2 = (D.gather_no_grad(x.detach()) for x in (u1, u2, t1, t2))
        lambd = self.cfg.unigrad.lambd
        return (
            barlow_twins_unigrad(t2, bank2, online1, lambd),
            barlow_twins_unigrad(t1, bank1, online2, lambd),
        )

    def norm_bias_overrides(self) -> dict:
        return {"lr_scale": self.cfg.bias_lr_scale}
