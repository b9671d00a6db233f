"""Projector and predictor MLPs: one builder for every method's head.

A head is `layers` Linear layers; every layer but the last is Linear-BN-ReLU. The last layer is a
plain Linear, optionally followed by BN (SimSiam, MoCo v3: affine=False). Bias is dropped where
a BN follows, since the BN's shift makes it redundant.
"""

from __future__ import annotations

from torch import nn


def build_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    layers: int = 2,
    *,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    hidden_bn: bool = True,
    last_bias: bool = True,
) -> nn.Sequential:
    if layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got layers={layers}")
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        if hidden_bn:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim, bias=last_bias and not last_bn))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*modules)
