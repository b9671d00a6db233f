"""BYOL (Grill et al., 2020): SimSiam's predictor branch with an EMA target, BYOL's heads and loss.

L = Σ over both directions of ‖q̂ − ẑ'‖² = 2 − 2cos(q_θ(z1), sg(z̄2))  (BYOL Eq. 2 and its
symmetrisation). The target follows τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 with τ_base = 0.99
(0.996 for 1000 epochs). Projector 2048→4096 (BN, ReLU)→256, predictor 256→4096 (BN, ReLU)→256.
The exact and unigrad forms and both switches are SimSiam's (see simsiam.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register_method
from .simsiam import SimSiam, SimSiamConfig


@dataclass
class BYOLConfig(SimSiamConfig):
    name: str = "byol"
    momentum_encoder: bool = True
    base_momentum: float = 0.99
    proj_hidden_dim: int = 4096
    proj_layers: int = 2
    proj_last_bn: bool = False
    out_dim: int = 256
    pred_hidden_dim: int = 4096
    fix_pred_lr: bool = False


@register_method("byol", BYOLConfig)
class BYOL(SimSiam):
    @staticmethod
    def combine(d12: torch.Tensor, d21: torch.Tensor) -> torch.Tensor:
        """(2 − 2cos) per direction, summed; D = −cos, so this is 4 + 2(D12 + D21)."""
        return (2.0 + 2.0 * d12) + (2.0 + 2.0 * d21)
