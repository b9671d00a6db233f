"""What SimCLR, MoCo v2 and MoCo v3 share: one InfoNCE loss, its exact analytic gradient, and
UniGrad's contrastive form. (The online branch and the optional momentum target are siamese.py's
SiameseMethod, shared with the rest of the family.)

Each method is an InfoNCE of ℓ2-normalised anchors u_i against candidate keys k_j, with one
positive p(i) per anchor and, optionally, candidates masked out of the denominator:

    s_ij = u_i·k_j,   l_ij = s_ij/τ if j = p(i), else φ(s_ij)/τ,
    ℓ_i  = −l_{i,p(i)} + log Σ_{j not masked} exp(l_ij),     L = (1/n) Σ_i ℓ_i  (n local anchors).

φ is the identity in SimCLR and MoCo. Garrido et al. (2023, §3) introduce SimCLR-abs and
SimCLR-sq, "which respectively use square or absolute values of cosine similarities"; their exact
loss (supplementary D) was not available, so we apply φ(s) = |s| or s² to the negative pairs only
and keep the positive pair's plain cosine. That is the reading their argument needs: the
repulsive term then penalises |s| or s² of off-diagonal Gram entries, making negatives orthogonal
rather than opposite (the sample-contrastive criterion L_c), while a positive stays attracted to
+1 instead of ±1.

The exact gradient (for φ = identity): with P_ij = softmax_j(l_ij) and
W_ij = (P_ij − δ_{j,p(i)})·φ'(s_ij)/(nτ), where φ' = 1 at the positive,

    ∂L/∂u_i = Σ_j W_ij k_j,        ∂L/∂k_j = Σ_i W_ij u_i.

For MoCo this is (1/nτ)[−k_i + Σ_v s_v v]. For SimCLR, where the keys are the anchors themselves,
summing both terms gives the full gradient (1/2Nτ)[−2u_p(i) + Σ_{k≠i} P_ik u_k + Σ_{a≠i} P_ai u_a];
UniGrad's code keeps only the first; the exact form keeps both, so it equals autograd of the
original loss.

The unigrad form (`loss_simclr_grad_mm` in fundamentalvision/UniGrad project/pretrainer.py, one
form for MoCo and SimCLR: their rows of the paper's table are equal, and no config of the code
uses a memory bank): with V the gathered ℓ2-normalised targets of both views of the global batch
(2B vectors; the anchor's own target and its positive included, nothing masked),

    g1 = (−ū2 + Σ_{v∈V} s_v v) / τ,   s_v = softmax_v(u1·v / τ),   τ = 0.2 (`moco_t`),

and g2 alike with the views swapped: λ = 1 and a global scale 1/τ. MoCo's queue is not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench import distributed as D

from ..unified import gradient_surrogate, with_value
from .base import MethodConfig
from .siamese import SiameseMethod, require

SIMILARITIES = ("dot", "abs", "sq")


def _negative_similarity(s: torch.Tensor, similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(s) and φ'(s) for the negative pairs."""
    if similarity == "dot":
        return s, torch.ones_like(s)
    if similarity == "abs":
        return s.abs(), s.sign()
    if similarity == "sq":
        return s * s, 2 * s
    raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")


def _logits_and_slope(
    u: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    similarity: str,
    exclude: torch.Tensor | None,
):
    s = u @ keys.T
    phi, slope = _negative_similarity(s, similarity)
    # a comparison, not F.one_hot, which reads the indices back to check their range (a sync)
    is_pos = pos[:, None] == torch.arange(keys.shape[0], device=pos.device)
    logits = torch.where(is_pos, s, phi) / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return logits, torch.where(is_pos, torch.ones_like(slope), slope), is_pos


def info_nce_logits(
    u: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    similarity: str = "dot",
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """l_ij for anchors u (n×D) and keys (M×D); pos (n,) indexes keys; exclude (n×M) masks."""
    return _logits_and_slope(u, keys, pos, temperature, similarity, exclude)[0]


def info_nce(
    u: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    similarity: str = "dot",
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = mean_i ℓ_i, the original loss."""
    return F.cross_entropy(info_nce_logits(u, keys, pos, temperature, similarity, exclude), pos)


@torch.no_grad()
def info_nce_grad(
    u: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    similarity: str = "dot",
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂u, ∂L/∂keys) in closed form; see the module docstring."""
    logits, slope, is_pos = _logits_and_slope(u, keys, pos, temperature, similarity, exclude)
    w = (logits.softmax(dim=1) - is_pos.to(u.dtype)) * slope / (temperature * u.shape[0])
    return w @ keys, w.T @ u


def contrastive_loss(
    loss_form: str,
    u: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    similarity: str = "dot",
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """InfoNCE in the original or exact form, and its logs; the value is the loss L in both.

    "original" back-propagates through L. "exact" injects info_nce_grad through
    gradient_surrogate: into the anchors, and into the keys too where they carry a graph (SimCLR
    without momentum encoder), so autograd sees the same gradient as from the original form.
    Computed outside autocast: logits divided by a small τ need float32.
    """
    with (
        torch.autocast(u.device.type, enabled=False),
        torch.set_grad_enabled(torch.is_grad_enabled() and loss_form == "original"),
    ):
        logits = info_nce_logits(u, keys, pos, temperature, similarity, exclude)
        loss = F.cross_entropy(logits, pos)
    if loss_form == "exact":
        g_u, g_keys = info_nce_grad(u, keys, pos, temperature, similarity, exclude)
        surrogate = gradient_surrogate(u, g_u)
        if keys.requires_grad:
            surrogate = surrogate + gradient_surrogate(keys, g_keys)
        loss = with_value(surrogate, loss)
    logits = logits.detach()
    rows = torch.arange(len(pos), device=pos.device)
    logs = {
        "pos_sim": (logits[rows, pos] * temperature).mean(),
        "pos_top1": (logits.argmax(dim=1) == pos).float().mean(),
    }
    return loss, logs


@dataclass
class ContrastiveForm:
    """The unigrad form's constant (`method.unigrad.*`), the official code's default."""

    temperature: float = 0.2  # τ: `moco_t` of configs/simclr_grad_mm.py


@torch.no_grad()
def contrastive_unigrad(
    u: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """g = (−positive + softmax(u·bankᵀ/τ)·bank)/τ, one row per anchor u."""
    weights = (u @ bank.T / temperature).softmax(dim=1)
    return (-positive + weights @ bank) / temperature


def mean_logs(*logs: dict) -> dict:
    return {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}


class ContrastiveMethod(SiameseMethod):
    """A SiameseMethod (online backbone + projector, optional EMA target) with an InfoNCE loss."""

    def __init__(self, backbone: nn.Module, cfg: MethodConfig):
        require(cfg.temperature > 0, "temperature", f"must be positive, got {cfg.temperature}")
        require(
            cfg.unigrad.temperature > 0,
            "unigrad.temperature",
            f"must be positive, got {cfg.unigrad.temperature}",
        )
        super().__init__(backbone, cfg)

    def unigrad_gradients(self, u1, u2, t1, t2):
        bank = D.gather_no_grad(torch.cat([t1, t2]))
        tau = self.cfg.unigrad.temperature
        return contrastive_unigrad(u1, t2, bank, tau), contrastive_unigrad(u2, t1, bank, tau)

    def infonce(
        self,
        u: torch.Tensor,
        keys: torch.Tensor,
        pos: torch.Tensor,
        similarity: str = "dot",
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        loss, logs = contrastive_loss(
            self.cfg.loss_form, u, keys, pos, self.cfg.temperature, similarity, exclude
        )
        return loss, {**logs, **self.momentum_logs()}
