"""Collapse diagnostics against the identities and limiting cases they are defined by."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.diagnostics import (
    centre_residual,
    collapse_diagnostics,
    dimension_contrastive,
    effective_rank,
    garrido_criteria,
    l2_std,
    plot_spectrum,
    positive_cosine,
    sample_contrastive,
    singular_values,
)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dims,samples", [(7, 11), (13, 5)])
def test_garrido_theorem_3_3(dims, samples):
    K = randn(dims, samples) * 3
    rows4 = K.square().sum(dim=1).square().sum().item()
    cols4 = K.square().sum(dim=0).square().sum().item()
    lhs = dimension_contrastive(K) + rows4
    rhs = sample_contrastive(K) + cols4
    assert abs(lhs - rhs) / abs(rhs) < 1e-10


@pytest.mark.parametrize("dims,samples", [(16, 40), (40, 16)])
def test_garrido_criteria_and_l2_normalised_bounds(dims, samples):
    z = randn(samples, dims, seed=1) + 0.5  # a common offset, so the bounds are not trivially met
    K = F.normalize(z, dim=1).T
    l_c, l_nc = garrido_criteria(z)
    # Whichever Gram is formed, both criteria equal their definitions.
    assert l_c == pytest.approx(sample_contrastive(K), rel=1e-10)
    assert l_nc == pytest.approx(dimension_contrastive(K), rel=1e-10)
    n, m = samples, dims
    assert l_nc - n + n * n / m <= l_c <= l_nc - n + n * n


def test_garrido_bounds_are_attained():
    # Every embedding on one axis: the upper bound (L_nc = 0, L_c = N² − N).
    collapsed = torch.zeros(6, 4)
    collapsed[:, 0] = 1.0
    assert garrido_criteria(collapsed) == pytest.approx((30.0, 0.0))
    # Orthonormal embeddings, N = M: the lower bound (both criteria 0).
    assert garrido_criteria(torch.eye(5)) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_centre_residual_identity():
    z = randn(300, 10, seed=2) + 0.7
    m_o, m_r = centre_residual(z)
    u = F.normalize(z, dim=1)
    assert m_o**2 + (u - u.mean(dim=0)).square().sum(dim=1).mean().item() == pytest.approx(
        1, abs=1e-12
    )
    assert 0 < m_r and m_o**2 + m_r**2 <= 1  # Jensen: mean ||r|| <= sqrt(mean ||r||²)
    # Equal residual norms make the identity hold for m_r itself: z = a·e0 ± b·e1.
    a, b = 0.6, 0.8
    pair = torch.tensor([[a, b, 0.0], [a, -b, 0.0]]) * 5
    assert centre_residual(pair) == pytest.approx((a, b), abs=1e-12)


def test_healthy_gaussian_embeddings():
    dims = 64
    z = randn(4000, dims, seed=3, dtype=torch.float32)
    assert l2_std(z) == pytest.approx(1 / math.sqrt(dims), rel=0.05)
    diag = collapse_diagnostics(z, z + 0.1 * randn(4000, dims, seed=4, dtype=torch.float32))
    assert diag["l2_std_x_sqrt_d"] == pytest.approx(1, rel=0.05)
    assert diag["m_o"] < 0.05 and diag["m_r"] == pytest.approx(1, abs=0.01)
    assert diag["effective_rank"] == pytest.approx(dims, rel=0.05)
    assert 0.9 < diag["pos_cos"] < 1


def test_collapsed_embeddings():
    z = randn(1, 32, seed=5, dtype=torch.float32).expand(256, 32)
    diag = collapse_diagnostics(z, z)
    assert diag["l2_std"] == pytest.approx(0, abs=1e-12)
    assert diag["m_o"] == pytest.approx(1, abs=1e-12) and diag["m_r"] == pytest.approx(0, abs=1e-12)
    assert diag["effective_rank"] == 0.0, "round-off must not read as spread"
    assert diag["pos_cos"] == pytest.approx(1, abs=1e-12)
    assert diag["L_c"] == pytest.approx(256 * 255, rel=1e-12), "every pair has cosine 1"
    assert set(diag) == {
        "l2_std",
        "l2_std_x_sqrt_d",
        "m_o",
        "m_r",
        "effective_rank",
        "L_c",
        "L_nc",
        "pos_cos",
    }
    assert "pos_cos" not in collapse_diagnostics(z)


def test_effective_rank_of_known_spectra():
    samples, dims, rank = 50, 20, 8
    # Centred, mutually orthogonal columns of equal norm: all `rank` singular values are equal.
    basis, _ = torch.linalg.qr(randn(samples, rank, seed=6) - randn(samples, rank, seed=6).mean(0))
    rotation, _ = torch.linalg.qr(randn(dims, rank, seed=7))
    isotropic = 3.0 * basis @ rotation.T
    assert effective_rank(isotropic) == pytest.approx(rank, rel=1e-9)
    rank_one = randn(samples, 1, seed=8) @ randn(1, dims, seed=9)
    assert effective_rank(rank_one) == pytest.approx(1, rel=1e-9)


def test_singular_values_are_of_the_centred_matrix():
    z = randn(30, 12, seed=10) + 4.0
    svals = singular_values(z)
    assert svals.dtype == torch.float64 and svals.shape == (12,)
    assert torch.all(svals[:-1] >= svals[1:])
    torch.testing.assert_close(svals, torch.linalg.svdvals(z - z.mean(0)))


def test_positive_cosine():
    z = randn(20, 5, seed=11)
    assert positive_cosine(z, 2 * z) == pytest.approx(1, abs=1e-12)
    assert positive_cosine(z, -z) == pytest.approx(-1, abs=1e-12)


def test_rejects_non_matrix_input():
    with pytest.raises(ValueError, match="2-D matrix"):
        l2_std(torch.zeros(3, 4, 5))


def test_plot_spectrum_writes_png(tmp_path):
    path = tmp_path / "plots" / "spectrum.png"
    plot_spectrum(
        {"healthy": singular_values(randn(40, 16)), "collapsed": torch.tensor([1.0, 1e-3, 0.0])},
        path,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100
    assert [p.name for p in path.parent.iterdir()] == ["spectrum.png"], "no temporary file left"
