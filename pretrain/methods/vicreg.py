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
not retrievable; docs/methods.md#where-the-sources-are-silent):
- VICReg-ctr centres each dimension over the batch first (Table 1: "dimension centring ✓"), then
  applies the *same* v and c_exp functions to the transpose. Those centre each embedding across
  its dimensions and divide the Gram matrix by D − 1, so the variance hinge holds every
  embedding's scaled norm ‖k̃_i‖/√(D − 1) ≥ 1 and the Gram entries are covariance-like, our
  reading of Table 1's "embedding norm 1". No explicit ℓ2 normalisation is added. The invariance
  term stays on the raw embeddings (Eq. 13).
- τ is a config field, default 0.15: Garrido's tuned SimCLR temperature, the method VICReg-ctr
  interpolates towards; it is our choice, not the paper's Table S6 value.

Exact form: the exact ∂ℓ/∂x,
    2λ(x_b − y_b)/(ND) + x̃_b·(G + Gᵀ)·ν/(N − 1) − μ/(2D(N − 1))·Σ_j 1[s_j < 1](x̃_bj/s_j)e_j,
where G = ∂c/∂C: 2·OffDiag(C)/D for VICReg, softmax_{j≠i}(C_ij/τ)/(Dτ) for c_exp. The negative
weights come from the same branch. For VICReg-ctr the same expression is taken on the transpose
and mapped back through the transpose and the dimension centring.

Unigrad form (VICReg only) — our derivation, not the paper's: the official code has no VICReg
form and the paper's VICReg gradient was not available here (UNIFIED_FORMS marks it `derived`).
Take the invariance and covariance terms on ℓ2 features scaled to unit average variance per
dimension, x = √D·u, C_u the covariance of u:

    ∂ℓ/∂u_b = (2λ/N)[u_b − u2_b + (2νD/λ)·(N/(N − 1))·OffDiag(C_u)ũ_b].

Then, as UniGrad simplifies Barlow Twins: drop u_b (parallel to u_b: the normalisation's backward
removes it), the scale 2λ/N, the factor N/(N − 1) and the diagonal exclusion; replace the
centred covariance by the uncentred correlation of the target branch of the same view:

    g1 = −ū2 + λ_u F1 u1,   F1 = (1/N) Σ_v ū1_v ū1_vᵀ (global batch, no EMA),   λ_u = 2νD/λ,

g2 alike (λ_u = 40.96 for ν = 1, λ = 25, D = 512). It is UniGrad's shape with a same-branch
correlation of the current batch. The variance hinge is dropped too; F1's uncentred mean part
repels u1 from the batch mean, the collapse the hinge guards against. `method.unigrad.lambd`
overrides λ_u.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class VICRegForm:
    """The unigrad form's constant (`method.unigrad.*`): ours, see the module docstring."""

    lambd: Optional[float] = None  # λ_u; None: 2·cov_coeff·out_dim / sim_coeff


@dataclass
class VICRegConfig(MethodConfig):
    name: str = "vicreg"
    proj_hidden_dim: int = 8192
    proj_layers: int = 3
    out_dim: int = 8192
    sim_coeff: float = 25.0  # λ
    std_coeff: float = 25.0  # μ
    cov_coeff: float = 1.0  # ν
    unigrad: VICRegForm = field(default_factory=VICRegForm)


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


def regularisers(
    x: torch.Tensor, temperature: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v(x), c(x)) of an N × D matrix; c is c_exp when a temperature is given."""
    _, c = _covariance(x)
    v = F.relu(1 - torch.sqrt(torch.diagonal(c) + STD_EPS)).mean()
    if temperature is None:
        diag = torch.diagonal(c)
        cov = (c.square().sum() - diag.square().sum()) / x.shape[1]
    else:
        cov = torch.logsumexp(_off_diagonal_logits(c, temperature), dim=1).mean()
    return v, cov


def regulariser_grad(
    x: torch.Tensor, std_coeff: float, cov_coeff: float, temperature: Optional[float]
) -> torch.Tensor:
    """∂/∂x of std_coeff·v(x)/2 + cov_coeff·c(x).

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

    def loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        invariance = F.mse_loss(x, y)
        (vx, cx), (vy, cy) = (regularisers(self.regularised(k), self.temperature) for k in (x, y))
        variance, covariance = (vx + vy) / 2, cx + cy
        loss = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return loss, {k: v.detach() for k, v in terms.items()}

    def grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        reg = regulariser_grad(
            self.regularised(x), self.std_coeff, self.cov_coeff, self.temperature
        )
        if self.transpose:  # back through the transpose and the (self-adjoint) centring
            reg = _centred(reg.T)
        return 2 * self.sim_coeff * (x - y) / x.numel() + reg


@torch.no_grad()
def vicreg_unigrad(
    u: torch.Tensor, positive: torch.Tensor, same: torch.Tensor, lambd: float
) -> torch.Tensor:
    """g = −positive + λ_u·u·F, F the correlation of `same` (this view's targets) over the
    global batch."""
    return -positive + lambd * u @ D.all_reduce_mean(same.T @ same / same.shape[0])


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
        criterion = VICRegCriterion(
            cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff, cfg.temperature if exp else None, transpose
        )
        lambd = cfg.unigrad.lambd
        if lambd is None:
            require(
                cfg.sim_coeff > 0,
                "sim_coeff",
                f"must be > 0 to derive method.unigrad.lambd, got {cfg.sim_coeff}",
            )
            lambd = 2 * cfg.cov_coeff * cfg.out_dim / cfg.sim_coeff
        require(lambd >= 0, "unigrad.lambd", f"must be >= 0, got {lambd}")
        super().__init__(backbone, cfg)
        self.criterion = criterion
        self.unigrad_lambd = lambd

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(in_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers, last_bias=False)

    def unigrad_gradients(self, u1, u2, t1, t2):
        return (
            vicreg_unigrad(u1, t2, t1, self.unigrad_lambd),
            vicreg_unigrad(u2, t1, t2, self.unigrad_lambd),
        )

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        z = tuple(upcast(zi) for zi in self.embed(views))
        t = tuple(upcast(ti) for ti in self.targets(views, z))
        x, y = (D.gather_with_grad(zi) for zi in z)
        tx, ty = (None, None) if self.target is None else (D.gather_no_grad(ti) for ti in t)
        with full_precision(x):
            loss, terms = self.pair_objective(
                x, y, tx, ty, self.criterion.loss, self.criterion.grad
            )
        z1, z2 = (zi.detach() for zi in z)
        return {
            "loss": loss,
            "logs": {**terms, **self.base_logs((z1, z2), t)},
            "embeddings": (z1, z2),
        }
