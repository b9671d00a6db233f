"""The two branches of a Siamese method and the `momentum_encoder` switch (UniGrad, METHODS.md §4).

The online branch is backbone → projector. Each view's target is either the output of an EMA
copy of that branch (`momentum_encoder: true`: BYOL, UniGrad) or the online output itself under
stop-gradient (`false`: SimSiam). "No momentum encoder" is never an EMA with momentum 0, whose
cosine schedule would sweep the momentum from 0 to 1 (the trap in UniGrad's code).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..momentum import SCHEDULES, EMATarget, momentum_at
from ..unified import LOSS_FORMS, gradient_surrogate, with_value
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


class SiameseMethod(Method):
    """A method with an online branch (backbone, projector) and a target per view."""

    def __init__(self, backbone: nn.Module, cfg: MethodConfig, projector: nn.Module):
        super().__init__(backbone, cfg)
        require(cfg.loss_form in LOSS_FORMS, "loss_form",
                f"{cfg.loss_form!r} is not one of {', '.join(LOSS_FORMS)}")
        require(cfg.momentum_schedule in SCHEDULES, "momentum_schedule",
                f"{cfg.momentum_schedule!r} is not one of {', '.join(SCHEDULES)}")
        require(0.0 <= cfg.base_momentum <= 1.0, "base_momentum",
                f"must lie in [0, 1], got {cfg.base_momentum}")
        require(not (cfg.momentum_encoder and cfg.base_momentum == 0), "base_momentum",
                "0 with momentum_encoder=true is not 'no momentum encoder' (a cosine schedule "
                "sweeps it from 0 to 1: UniGrad's trap); set method.momentum_encoder=false")
        self.projector = projector
        self.target = None
        if cfg.momentum_encoder:
            self.target = EMATarget(self._online(), cfg.base_momentum, cfg.momentum_schedule)
            m0 = momentum_at(cfg.base_momentum, 0.0, cfg.momentum_schedule)
            self.register_buffer("momentum", torch.tensor(m0))

    @property
    def gradient_form(self) -> bool:
        return self.cfg.loss_form == "gradient"

    def _online(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.projector)  # not registered: same modules

    def embed(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Online projector outputs of the first two views."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        return z1, z2

    def targets(self, views: list[torch.Tensor], z: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA branch's outputs, or sg(online) without a momentum encoder."""
        if self.target is None:
            return z[0].detach(), z[1].detach()
        t1, t2 = (self.target(v) for v in views[:2])
        return t1, t2

    def momentum_logs(self) -> dict[str, torch.Tensor]:
        """The EMA momentum in use, when there is a momentum encoder."""
        return {} if self.target is None else {"momentum": self.momentum.detach().clone()}

    def base_logs(self, z: tuple[torch.Tensor, torch.Tensor], t: tuple[torch.Tensor, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
        """UniGrad's monitor pos_sim = mean cos(z1, t2) over both directions, and the momentum."""
        with torch.no_grad():
            cos = F.cosine_similarity
            pos_sim = 0.5 * (cos(z[0], t[1], dim=1).mean() + cos(z[1], t[0], dim=1).mean())
        return {"pos_sim": pos_sim, **self.momentum_logs()}

    def pair_objective(self, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor | None,
                       b2: torch.Tensor | None, loss: PairLoss, grad: PairGrad
                       ) -> tuple[torch.Tensor, dict]:
        """The loss of a symmetric criterion ℓ (Barlow Twins, VICReg) on online features a1, a2
        and target features b1, b2 (None without a momentum encoder).

        Without a momentum encoder it is the paper's ℓ(a1, a2), with gradient through both
        views. With one it is ℓ(a1, b2) + ℓ(a2, b1): each online view gets exactly the gradient
        it gets in ℓ(a1, a2) with the other view replaced by its target, so the switch changes
        the target and nothing else. The gradient form injects ∂₁ℓ(a1, b2) and ∂₁ℓ(a2, b1)
        (with b = sg(a) when there is no momentum encoder), the same gradient. Returns the loss
        and the terms of ℓ(view 1, view 2).
        """
        # The gradient form needs only the value of ℓ: no graph through the D × D matrices.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.gradient_form):
            if self.target is None:
                value, terms = loss(a1, a2)
            else:
                (v12, terms), (v21, _) = loss(a1, b2), loss(a2, b1)
                value = v12 + v21
        if self.target is None:
            b1, b2 = a1.detach(), a2.detach()
        if not self.gradient_form:
            return value, terms
        surrogate = gradient_surrogate(a1, grad(a1, b2)) + gradient_surrogate(a2, grad(a2, b1))
        return with_value(surrogate, value), terms

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        if self.target is not None:
            self.momentum.fill_(self.target.update(self._online(), progress))
