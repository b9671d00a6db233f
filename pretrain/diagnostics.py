"""Collapse and representation diagnostics of a batch of embeddings z (N samples × D dims).

SimSiam's std of l2-normalised outputs, Zhang et al.'s centre/residual split, the singular-value
spectrum and its effective rank (Roy & Vetterli), and Garrido et al.'s sample- and
dimension-contrastive criteria (docs/methods.md#collapse-diagnostics). Everything is computed in
float64 on detached copies, so a diagnostic never touches the graph and float32 round-off does
not masquerade as signal; scalars come back as Python floats.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from sslbench.io import atomic_path


def _float64(z: torch.Tensor) -> torch.Tensor:
    if z.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(z.shape)}")
    return z.detach().to(torch.float64)


def _l2_normalised(z: torch.Tensor) -> torch.Tensor:
    return F.normalize(_float64(z), dim=1)


def l2_std(z: torch.Tensor) -> float:
    """SimSiam's collapse monitor: per-channel std of z/||z|| over samples, mean over channels.

    ≈ 1/sqrt(D) when the embeddings spread over the sphere, 0 when they collapse to one point.
    The std is the population one (correction 0): defined for any N, and it differs from
    torch.std's default (N − 1) by a factor sqrt((N−1)/N), under 0.1% for N ≥ 512.
    """
    return _l2_normalised(z).std(dim=0, correction=0).mean().item()


def centre_residual(z: torch.Tensor) -> tuple[float, float]:
    """Zhang et al.'s split of normalised z into centre o and residuals r_i: (||o||, mean ||r_i||).

    Collapse drives m_o → 1 and m_r → 0. Since ||z'_i|| = 1, ||o||² + mean ||r_i||² = 1 exactly.
    """
    u = _l2_normalised(z)
    centre = u.mean(dim=0)
    return centre.norm().item(), (u - centre).norm(dim=1).mean().item()


def singular_values(z: torch.Tensor) -> torch.Tensor:
    """Singular values (float64, descending) of the batch-centred embedding matrix."""
    z = _float64(z)
    return torch.linalg.svdvals(z - z.mean(dim=0))


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred z (Roy & Vetterli 2007).

    Singular values no larger than eps(z.dtype)·||z||_F are dropped: rounding z to its dtype alone
    can produce them (Weyl), so a collapsed float32 batch would otherwise look high-rank. A batch
    with no spread left has effective rank 0.
    """
    svals = singular_values(z)
    svals = svals[svals > torch.finfo(z.dtype).eps * _float64(z).norm()]
    if svals.numel() == 0:
        return 0.0
    p = svals / svals.sum()
    return torch.exp(-(p * p.log()).sum()).item()


def _off_diagonal_sq_norm(gram: torch.Tensor) -> float:
    return (gram - torch.diag_embed(gram.diagonal())).square().sum().item()


def sample_contrastive(K: torch.Tensor) -> float:
    """Garrido et al.'s L_c = ||KᵀK − diag(KᵀK)||_F² for K of shape (dims, samples)."""
    K = _float64(K)
    return _off_diagonal_sq_norm(K.T @ K)


def dimension_contrastive(K: torch.Tensor) -> float:
    """Garrido et al.'s L_nc = ||KKᵀ − diag(KKᵀ)||_F² for K of shape (dims, samples)."""
    K = _float64(K)
    return _off_diagonal_sq_norm(K @ K.T)


def garrido_criteria(z: torch.Tensor) -> tuple[float, float]:
    """(L_c, L_nc) of K = z'ᵀ, with each embedding (column of K) l2-normalised.

    Only the smaller Gram matrix is formed; the other criterion follows from Theorem 3.3,
    L_nc + Σ_j ||K_j,·||⁴ = L_c + Σ_i ||K_·,i||⁴ (a D×D Gram of an 8192-d projector is 512 MB).
    """
    K = _l2_normalised(z).T
    dims, samples = K.shape
    row_term = K.square().sum(dim=1).square().sum().item()  # Σ_j ||K_j,·||⁴
    col_term = K.square().sum(dim=0).square().sum().item()  # Σ_i ||K_·,i||⁴ (= N here)
    if samples <= dims:
        l_c = sample_contrastive(K)
        return l_c, l_c + col_term - row_term
    l_nc = dimension_contrastive(K)
    return l_nc + row_term - col_term, l_nc


def positive_cosine(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean cosine similarity of the two views of each sample (UniGrad's pos_sim)."""
    return (_l2_normalised(z1) * _l2_normalised(z2)).sum(dim=1).mean().item()


def collapse_diagnostics(z1: torch.Tensor, z2: torch.Tensor | None = None) -> dict[str, float]:
    """Every diagnostic of the view-1 embeddings z1, plus the positive cosine when z2 is given.

    Statistics use one view only: pooling both would count each image twice, as a correlated pair.
    """
    std = l2_std(z1)
    m_o, m_r = centre_residual(z1)
    l_c, l_nc = garrido_criteria(z1)
    out = {
        "l2_std": std,
        "l2_std_x_sqrt_d": std * math.sqrt(z1.shape[1]),
        "m_o": m_o,
        "m_r": m_r,
        "effective_rank": effective_rank(z1),
        "L_c": l_c,
        "L_nc": l_nc,
    }
    if z2 is not None:
        out["pos_cos"] = positive_cosine(z1, z2)
    return out


def plot_spectrum(svals_by_label: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Log-scale singular-value spectra, one line per label, written atomically as a PNG.

    A flat spectrum means the embedding uses every dimension; a sharp drop, dimensional collapse.
    Zero singular values have no place on a log axis and are left out.
    """
    from matplotlib.figure import Figure  # saved through Agg; no pyplot global state

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, svals in svals_by_label.items():
        svals = torch.as_tensor(svals, dtype=torch.float64).cpu()
        positive = svals[svals > 0]
        ax.plot(range(1, positive.numel() + 1), positive.numpy(), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index k (descending)")
    ax.set_ylabel("singular value σ_k of centred embeddings")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
