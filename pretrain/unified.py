"""The three loss forms (`method.loss_form`) and the surrogate that injects a gradient.

- `original`: back-propagate through the method's own loss.
- `exact`: inject that loss's gradient, written in closed form, through ⟨sg(g), u⟩. By design and
  by test it equals autograd of the original loss, so it differs from `original` only by
  floating-point noise; it checks the closed forms, it is not another method.
- `unigrad`: the paper's unified form (Tao et al., "Exploring the Equivalence of Siamese
  Self-Supervised Learning via a Unified Gradient Framework", CVPR 2022): on ℓ2-normalised
  projector outputs u and target features ū, every method's per-sample gradient has the shape
        g = −(positive) + λ Σ_v w_v v,
  with the simplified weights of the official code (fundamentalvision/UniGrad,
  project/pretrainer.py). It is a different function from the original loss. It also fixes the
  head the paper compares under: the projector [Linear-BN-ReLU]×(L−1)-Linear without output BN,
  no predictor and no queue. docs/methods.md, "Loss forms", has the forms method by method.

Both injected forms apply g through a surrogate whose gradient with respect to u is exactly g;
backward then carries it through the ℓ2 normalisation into the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_FORMS = ("original", "exact", "unigrad")


@dataclass(frozen=True)
class UnifiedForm:
    """Where a method's `unigrad` form comes from.

    `derived`: the paper gives no form for the method; the one implemented is this project's
    derivation (stated in the method's docstring and docs/methods.md), marked on the board.
    """

    family: str  # contrastive | asymmetric | decorrelation | unigrad (the paper's Fig. 1 rows)
    source: str
    derived: bool = False


_CODE = "fundamentalvision/UniGrad project/pretrainer.py::"
# Every method with a unigrad form. The duality variants (simclr_abs, simclr_sq, vicreg_exp,
# vicreg_ctr) have none: UniGrad treats none of them, and no simplification of theirs keeps the
# change that defines them (φ on the negatives, the LogSumExp covariance).
UNIFIED_FORMS = {
    "simclr": UnifiedForm("contrastive", _CODE + "loss_simclr_grad_mm"),
    "mocov2": UnifiedForm(
        "contrastive", _CODE + "loss_simclr_grad_mm (one form for MoCo and SimCLR, no memory bank)"
    ),
    "mocov3": UnifiedForm(
        "contrastive", _CODE + "loss_simclr_grad_mm (one form for MoCo and SimCLR, no memory bank)"
    ),
    "byol": UnifiedForm("asymmetric", _CODE + "loss_byol_directpred_grad"),
    "simsiam": UnifiedForm(
        "asymmetric", _CODE + "loss_byol_directpred_grad (one form for BYOL and SimSiam)"
    ),
    "barlow_twins": UnifiedForm("decorrelation", _CODE + "loss_barlow_twins_grad_mm"),
    "vicreg": UnifiedForm(
        "decorrelation",
        "derived here (pretrain/methods/vicreg.py, "
        "docs/methods.md): the official code has no VICReg form",
        derived=True,
    ),
    "unigrad": UnifiedForm("unigrad", _CODE + "loss_unigrad"),
}


def check_loss_form(method: str, loss_form: str) -> None:
    """Raise a ValueError naming `method.loss_form` unless `loss_form` is valid for `method`."""
    if loss_form == "gradient":
        raise ValueError(
            "method.loss_form: 'gradient' was split in two; use 'exact' (the exact "
            "gradient of the original loss, what 'gradient' was) or 'unigrad' (the "
            "paper's unified form)"
        )
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"method.loss_form: {loss_form!r} is not one of {', '.join(LOSS_FORMS)}")
    if loss_form == "unigrad" and method not in UNIFIED_FORMS:
        raise ValueError(
            f"method.loss_form: {method} has no unigrad form (methods with one: "
            f"{', '.join(UNIFIED_FORMS)}); use 'original' or 'exact'"
        )


def gradient_surrogate(u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to `u` equals `grad` (which is detached)."""
    if u.shape != grad.shape:
        raise ValueError(
            f"gradient of shape {tuple(grad.shape)} for features of shape {tuple(u.shape)}"
        )
    return (u * grad.detach()).sum()


def with_value(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`surrogate`'s gradient carrying `value`'s number, so both loss forms log the same curve.

    surrogate − sg(surrogate) is exactly 0 in floating point, so the result equals `value` bit
    for bit while its gradient is the surrogate's.
    """
    return value.detach() + (surrogate - surrogate.detach())
