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


def with_value(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`surrogate`'s gradient carrying `value`'s number, so both loss forms log the same curve.

    surrogate − sg(surrogate) is exactly 0 in floating point, so the result equals `value` bit
    for bit while its gradient is the surrogate's.
    """
    return value.detach() + (surrogate - surrogate.detach())
