"""The unified-gradient form (UniGrad): inject an analytic gradient through a surrogate.

Every method of the family has ∂L/∂u = −(positive) + λ Σ_v w_v v for its ℓ2 features u. The
gradient form computes that expression in closed form and back-propagates it through
⟨sg(g), u⟩, whose gradient with respect to u is exactly g.
"""

from __future__ import annotations

import torch

LOSS_FORMS = ("original", "gradient")


def gradient_surrogate(u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to `u` equals `grad` (which is detached)."""
    if u.shape != grad.shape:
        raise ValueError(f"gradient of shape {tuple(grad.shape)} for features of shape {tuple(u.shape)}")
    return (u * grad.detach()).sum()
