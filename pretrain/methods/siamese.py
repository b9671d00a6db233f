"""The two branches of a Siamese method, the `momentum_encoder` switch (UniGrad;
docs/methods.md#the-momentum-encoder-switch) and the three loss forms (pretrain/unified.py).

The online branch is backbone → projector. Each view's target is either the output of an EMA
copy of that branch (`momentum_encoder: true`: BYOL, UniGrad) or the online output itself under
stop-gradient (`false`: SimSiam). "No momentum encoder" is never an EMA with momentum 0, whose
cosine schedule would sweep the momentum from 0 to 1 (the trap in UniGrad's code).

`loss_form: original | exact` run the method's own loss (`loss_forward`). `loss_form: unigrad`
runs `unified_forward`, the official code's frame shared by every method: the paper's projector
(no output BN, no predictor), all four outputs ℓ2-normalised, and the method's per-sample
gradients g1, g2 (`unigrad_gradients`) injected through
    L̃ = ½(mean_b⟨sg(g1_b), u1_b⟩ + mean_b⟨sg(g2_b), u2_b⟩),
whose value is what the official code logs as the loss.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from ..momentum import SCHEDULES, EMATarget, momentum_at
from ..unified import check_loss_form, gradient_surrogate, with_value
from .base import Method, MethodConfig

# A symmetric pairwise criterion ℓ(a, b) → (loss, {term: value}) and its ∂ℓ/∂a.
PairLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
PairGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def require(ok: bool, field: str, message: str) -> None:
    """Raise a ValueError that names the offending config field."""
    if not ok:
        raise ValueError(f"method.{field}: {message}")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (features come out of bfloat16 autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def full_precision(x: torch.Tensor):
    """A context without autocast, for losses on upcast features (correlations, Gram matrices)."""
    return torch.autocast(x.device.type, enabled=False)


def correlation(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """tmp_F = (t1ᵀt1 + t2ᵀt2) / 2B of one process's target features."""
    return (t1.T @ t1 + t2.T @ t2) / (2 * t1.shape[0])


class SiameseMethod(Method):
    """A method with an online branch (backbone, projector) and a target per view.

    Subclasses build their own projector (`build_projector`, used by the original and exact
    forms), compute their loss in `loss_forward`, and give their unified form's per-sample
    gradients in `unigrad_gradients` where they have one (pretrain/unified.py, UNIFIED_FORMS).
    """

    def __init__(self, backbone: nn.Module, cfg: MethodConfig):
        super().__init__(backbone, cfg)
        check_loss_form(cfg.name, cfg.loss_form)
        require(
            cfg.momentum_schedule in SCHEDULES,
            "momentum_schedule",
            f"{cfg.momentum_schedule!r} is not one of {', '.join(SCHEDULES)}",
        )
        require(
            0.0 <= cfg.base_momentum <= 1.0,
            "base_momentum",
            f"must lie in [0, 1], got {cfg.base_momentum}",
        )
        require(
            not (cfg.momentum_encoder and cfg.base_momentum == 0),
            "base_momentum",
            "0 with momentum_encoder=true is not 'no momentum encoder' (a cosine schedule "
            "sweeps it from 0 to 1: UniGrad's trap); set method.momentum_encoder=false",
        )
        if self.unigrad_form:  # the paper's shared head: no BN on the output, bias on the last
            self.projector = build_mlp(
                backbone.feature_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers
            )
        else:
            self.projector = self.build_projector(backbone.feature_dim)
        self.target = None
        if cfg.momentum_encoder:
            self.target = EMATarget(self._online(), cfg.base_momentum, cfg.momentum_schedule)
            m0 = momentum_at(cfg.base_momentum, 0.0, cfg.momentum_schedule)
            self.register_buffer("momentum", torch.tensor(m0))

    def build_projector(self, in_dim: int) -> nn.Module:
        """The method's own projector (original and exact forms)."""
        raise NotImplementedError

    @property
    def exact_form(self) -> bool:
        return self.cfg.loss_form == "exact"

    @property
    def unigrad_form(self) -> bool:
        return self.cfg.loss_form == "unigrad"

    def _online(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.projector)  # not registered: same modules

    def embed(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Online projector outputs of the first two views."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        return z1, z2

    def targets(
        self, views: list[torch.Tensor], z: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA branch's outputs, or sg(online) without a momentum encoder."""
        if self.target is None:
            return z[0].detach(), z[1].detach()
        t1, t2 = (self.target(v) for v in views[:2])
        return t1, t2

    def momentum_logs(self) -> dict[str, torch.Tensor]:
        """The EMA momentum in use, when there is a momentum encoder."""
        return {} if self.target is None else {"momentum": self.momentum.detach().clone()}

    def base_logs(
        self, z: tuple[torch.Tensor, torch.Tensor], t: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """UniGrad's monitor pos_sim = mean cos(z1, t2) over both directions, and the momentum."""
        with torch.no_grad():
            cos = F.cosine_similarity
            pos_sim = 0.5 * (cos(z[0], t[1], dim=1).mean() + cos(z[1], t[0], dim=1).mean())
        return {"pos_sim": pos_sim, **self.momentum_logs()}

    def forward(self, views: list[torch.Tensor]) -> dict:
        return self.unified_forward(views) if self.unigrad_form else self.loss_forward(views)

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        """The original loss, or its exact gradient injected (`loss_form: original | exact`)."""
        raise NotImplementedError

    def unigrad_gradients(
        self, u1: torch.Tensor, u2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unified form's g1, g2 (one row per local sample, before the batch mean) from the
        ℓ2-normalised online features u and target features t of this process."""
        raise NotImplementedError

    def unified_forward(self, views: list[torch.Tensor]) -> dict:
        """`loss_form: unigrad`: inject unigrad_gradients through the official code's L̃."""
        z = self.embed(views)
        t = self.targets(views, z)
        with full_precision(z[0]):
            u1, u2, t1, t2 = (F.normalize(upcast(x), dim=1) for x in (*z, *t))
            g1, g2 = self.unigrad_gradients(u1, u2, t1, t2)
            loss = 0.5 * (gradient_surrogate(u1, g1) + gradient_surrogate(u2, g2)) / u1.shape[0]
        z1, z2 = (upcast(zi.detach()) for zi in z)
        return {"loss": loss, "logs": self.base_logs((z1, z2), (t1, t2)), "embeddings": (z1, z2)}

    def register_correlation(self, dim: int) -> None:
        """Buffers for F, the EMA of the targets' correlation (state dict, hence resume)."""
        self.register_buffer("correlation_ema", torch.zeros(dim, dim))
        self.register_buffer("correlation_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_correlation(self, t1: torch.Tensor, t2: torch.Tensor, rho: float) -> torch.Tensor:
        """F ← tmp_F at the first step, ρF + (1 − ρ)tmp_F after, tmp_F averaged over processes
        (UniGrad's `loss_unigrad` and `loss_byol_directpred_grad`); returns the updated F."""
        tmp = D.all_reduce_mean(correlation(t1, t2))
        ema = rho * self.correlation_ema + (1 - rho) * tmp
        self.correlation_ema.copy_(torch.where(self.correlation_updates == 0, tmp, ema))
        self.correlation_updates += 1
        return self.correlation_ema.clone()

    def pair_objective(
        self,
        a1: torch.Tensor,
        a2: torch.Tensor,
        b1: torch.Tensor | None,
        b2: torch.Tensor | None,
        loss: PairLoss,
        grad: PairGrad,
    ) -> tuple[torch.Tensor, dict]:
        """The loss of a symmetric criterion ℓ (Barlow Twins, VICReg) on online features a1, a2
        and target features b1, b2 (None without a momentum encoder).

        Without a momentum encoder it is the paper's ℓ(a1, a2), with gradient through both
        views. With one it is ℓ(a1, b2) + ℓ(a2, b1): each online view gets exactly the gradient
        it gets in ℓ(a1, a2) with the other view replaced by its target, so the switch changes
        the target and nothing else. The exact form injects ∂₁ℓ(a1, b2) and ∂₁ℓ(a2, b1)
        (with b = sg(a) when there is no momentum encoder), the same gradient. Returns the loss
        and the terms of ℓ(view 1, view 2).
        """
        # The exact form needs only the value of ℓ: no graph through the D × D matrices.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.exact_form):
            if self.target is None:
                value, terms = loss(a1, a2)
            else:
                (v12, terms), (v21, _) = loss(a1, b2), loss(a2, b1)
                value = v12 + v21
        if self.target is None:
            b1, b2 = a1.detach(), a2.detach()
        if not self.exact_form:
            return value, terms
        surrogate = gradient_surrogate(a1, grad(a1, b2)) + gradient_surrogate(a2, grad(a2, b1))
        return with_value(surrogate, value), terms

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        if self.target is not None:
            self.momentum.fill_(self.target.update(self._online(), progress))
