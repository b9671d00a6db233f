"""SimSiam (Chen & He, 2021): predictor + stop-gradient, symmetric negative cosine.

L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),  D(p, z) = −p̂·ẑ  (SimSiam Eq. 1–2).
`stop_gradient=False` removes the sg — the ablation that collapses (SimSiam Fig. 2).

Exact form. UniGrad writes the predictor branch's gradient for a *linear* predictor W as
∂(−cos(Wu1, ū2))/∂u1 = (1/‖Wu1‖)[−Wᵀū2 + λWᵀWu1], λ = (Wu1·ū2)/‖Wu1‖². That expression is the
chain rule through W of the unified form at the predictor output p = Wu1,

    ∂D(p, t)/∂p = (1/‖p‖)[−t̂ + λp],   λ = (p·t̂)/‖p‖²,

so the exact form injects this gradient at p and lets autograd apply the predictor's Jacobian
(Wᵀ for a linear predictor, the MLP's for ours). The predictor stays learnable, so the exact form
equals the original loss's gradient.

Unigrad form (`loss_byol_directpred_grad` in fundamentalvision/UniGrad project/pretrainer.py and
configs/byol_directpred_grad.py; one form for BYOL and SimSiam, whose rows of the paper's table
are equal). No predictor network: the predictor is DirectPred's closed form from F, the EMA of
the targets' correlation (ρ = 0.99, updated before use, as UniGrad's):

    F = U diag(s) Uᵀ,   W = U diag(max(√(s/s_max) + ε, 1e-4)) Uᵀ,   F̂ = F/s_max + ε²I,  ε = 0.3,
    g1 = (1/‖Wu1‖)(−Wū2 + λ1 F̂u1),   λ1 = ⟨Wu1, ū2⟩ / ⟨F̂u1, u1⟩,

g2 alike. This is the code's form, not Fig. 1's simplified −ū2 + λFu1: W stays on the positive,
F̂ stands in for WᵀW without the cross term 2ε√(F/s_max), and λ is per sample. The code takes
the SVD of F; F is symmetric positive semi-definite, so its eigendecomposition (eigenvalues
clipped at 0 against round-off) is the same and keeps W symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import build_mlp
from ..unified import gradient_surrogate, with_value
from .base import MethodConfig, register_method
from .siamese import SiameseMethod, full_precision, require, upcast


@dataclass
class DirectPredForm:
    """The unigrad form's constants (`method.unigrad.*`), the official code's defaults."""

    rho: float = 0.99  # ρ, EMA factor of the correlation F
    eps: float = 0.3  # ε, added to the predictor's eigenvalues √(s/s_max)
    eig_min: float = 1e-4  # lower clamp of the predictor's eigenvalues


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
    unigrad: DirectPredForm = field(default_factory=DirectPredForm)


def negative_cosine(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """D(p, t) = −mean_b cos(p_b, t_b)."""
    return -F.cosine_similarity(p, t, dim=-1).mean()


def negative_cosine_grad(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∂D(p, t)/∂p = (1/(B‖p‖))[−t̂ + λp], λ = (p·t̂)/‖p‖²: UniGrad's form
    (docs/methods.md#simsiam)."""
    t_hat = F.normalize(t, dim=1)
    norm = p.norm(dim=1, keepdim=True)
    lam = (p * t_hat).sum(dim=1, keepdim=True) / norm.square()
    return (-t_hat + lam * p) / (norm * p.shape[0])


@torch.no_grad()
def directpred_predictor(
    corr: torch.Tensor, eps: float, eig_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DirectPred's W = U diag(max(√(s/s_max) + ε, eig_min)) Uᵀ from F = U diag(s) Uᵀ, and
    F̂ = F/s_max + ε²I, UniGrad's stand-in for WᵀW."""
    s, vecs = torch.linalg.eigh(corr)
    s = s.clamp(min=0)
    s_max = s.max()
    w = (vecs * ((s / s_max).sqrt() + eps).clamp(min=eig_min)) @ vecs.T
    eye = torch.eye(corr.shape[0], dtype=corr.dtype, device=corr.device)
    return w, corr / s_max + eps**2 * eye


@torch.no_grad()
def directpred_unigrad(
    u: torch.Tensor, positive: torch.Tensor, w: torch.Tensor, f_hat: torch.Tensor
) -> torch.Tensor:
    """g = (1/‖Wu‖)(−W·positive + λF̂u), λ = ⟨Wu, positive⟩/⟨F̂u, u⟩, per row; W, F̂ symmetric."""
    wu, fu = u @ w, u @ f_hat
    lam = (wu * positive).sum(dim=1, keepdim=True) / (fu * u).sum(dim=1, keepdim=True)
    return (-positive @ w + lam * fu) / wu.norm(dim=1, keepdim=True)


@register_method("simsiam", SimSiamConfig)
class SimSiam(SiameseMethod):
    def __init__(self, backbone: nn.Module, cfg: SimSiamConfig):
        if not cfg.stop_gradient:
            require(
                not cfg.momentum_encoder,
                "stop_gradient",
                "false needs momentum_encoder=false (an EMA target carries no gradient)",
            )
            require(
                cfg.loss_form == "original",
                "stop_gradient",
                "false needs loss_form=original (the injected forms hold the target fixed)",
            )
        form = cfg.unigrad
        require(0.0 <= form.rho < 1.0, "unigrad.rho", f"must lie in [0, 1), got {form.rho}")
        require(form.eps >= 0, "unigrad.eps", f"must be >= 0, got {form.eps}")
        require(form.eig_min > 0, "unigrad.eig_min", f"must be > 0, got {form.eig_min}")
        super().__init__(backbone, cfg)
        if self.unigrad_form:
            self.register_correlation(cfg.out_dim)
        else:
            self.predictor = build_mlp(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim, 2)

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(
            in_dim,
            cfg.proj_hidden_dim,
            cfg.out_dim,
            cfg.proj_layers,
            last_bn=cfg.proj_last_bn,
            last_bn_affine=False,
        )

    @staticmethod
    def combine(d12: torch.Tensor, d21: torch.Tensor) -> torch.Tensor:
        """The symmetrised loss from the two directions' D (SimSiam Eq. 2)."""
        return 0.5 * (d12 + d21)

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        z = self.embed(views)
        p1, p2 = (upcast(self.predictor(zi)) for zi in z)
        t1, t2 = (upcast(zi) for zi in (self.targets(views, z) if self.cfg.stop_gradient else z))
        with full_precision(p1):
            d12, d21 = negative_cosine(p1, t2), negative_cosine(p2, t1)
            loss = self.combine(d12, d21)
            if self.exact_form:
                surrogate = self.combine(
                    gradient_surrogate(p1, negative_cosine_grad(p1, t2)),
                    gradient_surrogate(p2, negative_cosine_grad(p2, t1)),
                )
                loss = with_value(surrogate, loss)
        z1, z2 = (upcast(zi.detach()) for zi in z)
        logs = {"pred_cos": -0.5 * (d12 + d21).detach(), **self.base_logs((z1, z2), (t1, t2))}
        return {"loss": loss, "logs": logs, "embeddings": (z1, z2)}

    def unigrad_gradients(self, u1, u2, t1, t2):
        form = self.cfg.unigrad
        w, f_hat = directpred_predictor(
            self.update_correlation(t1, t2, form.rho), form.eps, form.eig_min
        )
        return directpred_unigrad(u1, t2, w, f_hat), directpred_unigrad(u2, t1, w, f_hat)

    def param_group_overrides(self) -> dict[str, dict]:
        fixed = self.cfg.fix_pred_lr and not self.unigrad_form  # no predictor in that form
        return {"predictor.": {"fixed_lr": True}} if fixed else {}
