"""VICReg (Bardes et al., 2022) and its duality variants VICReg-exp and VICReg-ctr (Garrido et al.,
2023), selected by `method.name`: `vicreg`, `vicreg_exp`, `vicreg_ctr`.

VICReg on embeddings x, y (N × D, gathered over processes with gradient, as the official
FullGatherLayer does):
    ℓ(x, y) = λ·mean((x − y)²) + μ·[v(x) + v(y)]/2 + ν·[c(x) + c(y)],  λ = μ = 25, ν = 1,
    v(x) = mean_j relu(1 − s_j), s_j = sqrt(Var_j(x) + 1e-4),
    c(x) = Σ_{i≠j} C_ij² / D,      C = x̃ᵀx̃/(N − 1), x̃ = x − mean_batch(x)   (`main_vicreg.py`).
VICReg-exp (Garrido Eq. 11–12) replaces c by c_exp(x) = (1/D) Σ_i log Σ_{j≠i} exp(C_ij/τ).
VICReg-ctr (Garrido Eq. 13) is VICReg-exp with the variance and covariance criteria applied to
the transposed embedding matrix: v then acts on each embedding's spread across dimensions (its
norm) and c_exp on the N × N Gram matrix, a DCL-style repulsion between samples.

What we implement where the main text leaves it open (Table S6 and the Supp. I pseudocode were
not retrievable, METHODS.md §6):
- VICReg-ctr centres each dimension over the batch first (Table 1: "dimension centring ✓"), then
  applies the *same* v and c_exp functions to the transpose. Those centre each embedding across
  its dimensions and divide the Gram matrix by D − 1, so the variance hinge holds every
  embedding's scaled norm ‖k̃_i‖/√(D − 1) ≥ 1 and the Gram entries are covariance-like, our
  reading of Table 1's "embedding norm 1". No explicit ℓ2 normalisation is added. The invariance
  term stays on the raw embeddings (Eq. 13).
- τ is a config field, default 0.15: Garrido's tuned SimCLR temperature, the method VICReg-ctr
  interpolates towards; it is our choice, not the paper's Table S6 value.

Gradient form: the exact ∂ℓ/∂x (METHODS.md §3.5),
    2λ(x_b − y_b)/(ND) + x̃_b·(G + Gᵀ)·ν/(N − 1) − μ/(2D(N − 1))·Σ_j 1[s_j < 1](x̃_bj/s_j)e_j,
where G = ∂c/∂C: 2·OffDiag(C)/D for VICReg, softmax_{j≠i}(C_ij/τ)/(Dτ) for c_exp. The negative
weights come from the same branch. For VICReg-ctr the same expression is taken on the transpose
and mapped back through the transpose and the dimension centring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from .base import MethodConfig, register_method
from .siamese import SiameseMethod, full_precision, require, upcast

STD_EPS = 1e-4


@dataclass
class VICRegConfig(MethodConfig):
    name: str = "vicreg"
    proj_hidden_dim: int = 8192
    proj_layers: int = 3
    out_dim: int = 8192
    sim_coeff: float = 25.0  # λ
    std_coeff: float = 25.0  # μ
    cov_coeff: float = 1.0  # ν


@dataclass
class VICRegExpConfig(VICRegConfig):
    name: str = "vicreg_exp"
    temperature: float = 0.15  # τ of c_exp (our choice; see the module docstring)


@dataclass
class VICRegCtrConfig(VICRegExpConfig):
    name: str = "vicreg_ctr"


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0)


def _covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xc = _centred(x)
    return xc, xc.T @ xc / (x.shape[0] - 1)


def _off_diagonal_logits(c: torch.Tensor, temperature: float) -> torch.Tensor:
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    return (c / temperature).masked_fill(eye, float("-inf"))


def regularisers(x: torch.Tensor, temperature: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(v(x), c(x)) of an N × D matrix; c is c_exp when a temperature is given."""
    _, c = _covariance(x)
    v = F.relu(1 - torch.sqrt(torch.diagonal(c) + STD_EPS)).mean()
    if temperature is None:
        diag = torch.diagonal(c)
        cov = (c.square().sum() - diag.square().sum()) / x.shape[1]
    else:
        cov = torch.logsumexp(_off_diagonal_logits(c, temperature), dim=1).mean()
    return v, cov


def regulariser_grad(x: torch.Tensor, std_coeff: float, cov_coeff: float,
                     temperature: Optional[float]) -> torch.Tensor:
    """∂/∂x of std_coeff·v(x)/2 + cov_coeff·c(x) (METHODS.md §3.5).

    Every row sum of the result over the batch is 0 (it is x̃ times a matrix), so the batch
    centring inside v and c passes it through unchanged.
    """
    n, d = x.shape
    xc, c = _covariance(x)
    if temperature is None:
        g = 2 * (c - torch.diag_embed(torch.diagonal(c))) / d
    else:
        g = torch.softmax(_off_diagonal_logits(c, temperature), dim=1) / (d * temperature)
    std = torch.sqrt(torch.diagonal(c) + STD_EPS)
    hinge = (std < 1).to(x.dtype) / std
    return (cov_coeff / (n - 1)) * xc @ (g + g.T) - (std_coeff / (2 * d * (n - 1))) * xc * hinge


@dataclass(frozen=True)
class VICRegCriterion:
    """ℓ(x, y) and ∂ℓ/∂x for one of the three variants; x, y are N × D embeddings."""

    sim_coeff: float
    std_coeff: float
    cov_coeff: float
    temperature: Optional[float] = None  # None: VICReg's squared covariance
    transpose: bool = False  # VICReg-ctr

    def regularised(self, x: torch.Tensor) -> torch.Tensor:
        """The matrix v and c act on: x, or for VICReg-ctr the dimension-centred xᵀ."""
        return _centred(x).T if self.transpose else x

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        invariance = F.mse_loss(x, y)
        (vx, cx), (vy, cy) = (regularisers(self.regularised(k), self.temperature) for k in (x, y))
        variance, covariance = (vx + vy) / 2, cx + cy
        loss = (self.sim_coeff * invariance + self.std_coeff * variance
                + self.cov_coeff * covariance)
        terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return loss, {k: v.detach() for k, v in terms.items()}

    def grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        reg = regulariser_grad(self.regularised(x), self.std_coeff, self.cov_coeff, self.temperature)
        if self.transpose:  # back through the transpose and the (self-adjoint) centring
            reg = _centred(reg.T)
        return 2 * self.sim_coeff * (x - y) / x.numel() + reg


# name → (LogSumExp repulsion, criteria on the transpose)
VARIANTS = {"vicreg": (False, False), "vicreg_exp": (True, False), "vicreg_ctr": (True, True)}


@register_method("vicreg", VICRegConfig)
@register_method("vicreg_exp", VICRegExpConfig)
@register_method("vicreg_ctr", VICRegCtrConfig)
class VICReg(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: VICRegConfig):
        require(cfg.name in VARIANTS, "name", f"{cfg.name!r} is not one of {', '.join(VARIANTS)}")
        exp, transpose = VARIANTS[cfg.name]
        if exp:
            require(cfg.temperature > 0, "temperature", f"must be > 0, got {cfg.temperature}")
        criterion = VICRegCriterion(cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff,
                                    cfg.temperature if exp else None, transpose)
        projector = build_mlp(backbone.feature_dim, cfg.proj_hidden_dim, cfg.out_dim,
                              cfg.proj_layers, last_bias=False)
        super().__init__(backbone, cfg, projector)
        self.criterion = criterion

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = tuple(upcast(zi) for zi in self.embed(views))
        t = tuple(upcast(ti) for ti in self.targets(views, z))
        x, y = (D.gather_with_grad(zi) for zi in z)
        tx, ty = (None, None) if self.target is None else (D.gather_no_grad(ti) for ti in t)
        with full_precision(x):
            loss, terms = self.pair_objective(x, y, tx, ty, self.criterion.loss,
                                              self.criterion.grad)
        z1, z2 = (zi.detach() for zi in z)
        return {"loss": loss, "logs": {**terms, **self.base_logs((z1, z2), t)},
                "embeddings": (z1, z2)}
