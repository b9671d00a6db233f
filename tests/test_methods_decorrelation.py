"""Barlow Twins, VICReg (+ -exp, -ctr) and UniGrad: losses against the papers' formulas, exact
analytic gradients against autograd, both switches, multi-process equality and UniGrad's F
across a resume. (Short real runs: test_methods_all.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distributed import assert_steps_match, one_and_two_processes
from method_checks import (
    loss_and_gradient,
    rel_err,
    resumed_state_is_bit_exact,
    tiny_method,
    tiny_views,
)

from pretrain.methods.barlow_twins import barlow_twins_grad, barlow_twins_loss, standardise
from pretrain.methods.siamese import correlation
from pretrain.methods.unigrad import unigrad_grad, unigrad_loss
from pretrain.methods.vicreg import VARIANTS, VICRegCriterion, regularisers
from sslbench.optim import param_groups

RTOL = 1e-5
SMALL = {"proj_hidden_dim": 16, "out_dim": 8}
METHODS = ("barlow_twins", "vicreg", "vicreg_exp", "vicreg_ctr", "unigrad")


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def autograd_of(loss_fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(x), x)
    return grad


# ---- Barlow Twins ------------------------------------------------------------------------------


def test_standardise_is_batchnorm_without_affine():
    z = randn(9, 4, seed=0) * 3 + 1
    torch.testing.assert_close(standardise(z), torch.nn.BatchNorm1d(4, affine=False).double()(z))


def test_barlow_twins_loss_is_the_papers():
    a, b = standardise(randn(10, 5, seed=1)), standardise(randn(10, 5, seed=2))
    c = a.T @ b / 10
    expected = sum((1 - c[i, i]) ** 2 for i in range(5)) + 0.3 * sum(
        c[i, j] ** 2 for i in range(5) for j in range(5) if i != j
    )
    torch.testing.assert_close(barlow_twins_loss(a, b, 0.3)[0], expected)


@pytest.mark.parametrize("lambd", [0.0051, 0.7])
def test_barlow_twins_gradient_equals_autograd_and_unigrads_formula(lambd):
    """docs/methods.md#barlow-twins, diagonal term included:
    ∂L/∂ẑ1_b = (2/N)[−ẑ2_b + (λ/N)Σ_v(ẑ2_v·ẑ2_b)ẑ1_v + (1 − λ)diag(C)ẑ2_b]."""
    n = 10
    a, b = standardise(randn(n, 6, seed=3)), standardise(randn(n, 6, seed=4))
    expected = autograd_of(lambda x: barlow_twins_loss(x, b, lambd)[0], a)
    got = barlow_twins_grad(a, b, lambd)
    assert rel_err(got, expected) < RTOL
    diag_c = torch.diagonal(a.T @ b / n)
    formula = torch.stack(
        [
            (2 / n)
            * (
                -b[i]
                + (lambd / n) * sum((b[v] @ b[i]) * a[v] for v in range(n))
                + (1 - lambd) * diag_c * b[i]
            )
            for i in range(n)
        ]
    )
    assert rel_err(formula, expected) < RTOL


def test_barlow_twins_bias_lr_scale_reaches_the_optimizer_groups():
    method = tiny_method("barlow_twins", **SMALL)
    groups = param_groups(
        method,
        1e-6,
        True,
        method.param_group_overrides(),
        norm_bias_overrides=method.norm_bias_overrides(),
    )
    for group in groups:
        one_d = all(p.ndim <= 1 for p in group["params"])
        assert group["lr_scale"] == (0.024 if one_d else 1.0)
        assert group["weight_decay"] == (0.0 if one_d else 1e-6)


# ---- VICReg and its duality variants -------------------------------------------------------------


def official_vicreg(x, y, sim=25.0, std=25.0, cov=1.0):
    """`facebookresearch/vicreg` main_vicreg.py::VICReg.forward, transcribed (one process)."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim * repr_loss + std * std_loss + cov * cov_loss


def criterion(name: str, sim=25.0, std=25.0, cov=1.0, temperature=0.3) -> VICRegCriterion:
    exp, transpose = VARIANTS[name]
    return VICRegCriterion(sim, std, cov, temperature if exp else None, transpose)


def mixed_spread(n: int, d: int, seed: int) -> torch.Tensor:
    """Columns (and rows) with std both below and above 1, so the variance hinge is partly
    active."""
    return (
        randn(n, d, seed=seed)
        * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
        * torch.linspace(0.5, 1.8, n, dtype=torch.float64)[:, None]
    )


def test_vicreg_loss_is_the_official_code():
    x, y = mixed_spread(12, 7, 5), mixed_spread(12, 7, 6)
    torch.testing.assert_close(criterion("vicreg").loss(x, y)[0], official_vicreg(x, y))


def test_exponential_covariance_is_garrido_eq_11():
    """c_exp(K) = (1/d) Σ_i log Σ_{j≠i} exp(C(K)_ij / τ)."""
    x, tau = mixed_spread(12, 5, 7), 0.4
    c = torch.cov(x.T)
    expected = (
        sum(math.log(sum(math.exp(c[i, j] / tau) for j in range(5) if j != i)) for i in range(5))
        / 5
    )
    assert regularisers(x, tau)[1].item() == pytest.approx(expected, rel=1e-12)


def test_vicreg_ctr_applies_variance_and_covariance_to_the_transpose():
    """Garrido Eq. 13: invariance on K; v and c_exp on the dimension-centred Kᵀ (Table 1)."""
    x, y, tau = mixed_spread(12, 7, 8), mixed_spread(12, 7, 9), 0.3
    (vx, cx), (vy, cy) = (regularisers((k - k.mean(0)).T, tau) for k in (x, y))
    expected = 25 * F.mse_loss(x, y) + 25 * (vx + vy) / 2 + (cx + cy)
    torch.testing.assert_close(criterion("vicreg_ctr").loss(x, y)[0], expected)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vicreg_gradient_equals_autograd(name):
    crit = criterion(name, sim=3.0, std=5.0, cov=2.0)
    x, y = mixed_spread(12, 7, 10), mixed_spread(12, 7, 11)
    expected = autograd_of(lambda k: crit.loss(k, y)[0], x)
    assert rel_err(crit.grad(x, y), expected) < RTOL


def test_vicreg_gradient_is_the_unified_formula():
    """∂L/∂x_b = 2λ(x_b − y_b)/(ND) + 4ν/(D(N−1))·OffDiag(Cov)x̃_b − μ/(2D(N−1))·Σ_j
    1[s_j<1](x̃_bj/s_j)e_j (docs/methods.md#vicreg-vicreg-exp-and-vicreg-ctr)."""
    lam, mu, nu = 3.0, 5.0, 2.0
    x, y = mixed_spread(12, 7, 12), mixed_spread(12, 7, 13)
    n, d = x.shape
    xc = x - x.mean(0)
    cov = xc.T @ xc / (n - 1)
    s = torch.sqrt(torch.diagonal(cov) + 1e-4)
    assert 0 < (s < 1).sum() < d  # the hinge is active for some dimensions only
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    formula = (
        2 * lam * (x - y) / (n * d)
        + 4 * nu / (d * (n - 1)) * xc @ off_diagonal
        - mu / (2 * d * (n - 1)) * xc * ((s < 1).double() / s)
    )
    assert rel_err(formula, criterion("vicreg", lam, mu, nu).grad(x, y)) < RTOL


# ---- UniGrad -------------------------------------------------------------------------------------


def test_unigrad_gradient_equals_autograd_of_the_explicit_loss():
    u, t = F.normalize(randn(9, 6, seed=14), dim=1), F.normalize(randn(9, 6, seed=15), dim=1)
    corr = correlation(F.normalize(randn(9, 6, seed=16), dim=1), t)
    expected = autograd_of(lambda k: unigrad_loss(k, t, corr, 100.0), u)
    assert rel_err(unigrad_grad(u, t, corr, 100.0), expected) < RTOL
    # The explicit loss equals −cos + (λ/2)Σ_v ρ_v cos²(u, v) over F's eigenpairs (README).
    rho, vecs = torch.linalg.eigh(corr)
    alt = (-(u * t).sum(1) + 50.0 * ((u @ vecs) ** 2 * rho).sum(1)).mean()
    torch.testing.assert_close(unigrad_loss(u, t, corr, 100.0), alt)


@pytest.mark.parametrize("momentum", [True, False])
def test_unigrad_correlation_is_an_ema_of_target_features_updated_before_use(momentum):
    method = tiny_method("unigrad", momentum_encoder=momentum, rho=0.9, **SMALL)
    assert {"correlation_ema", "correlation_updates"} <= set(method.state_dict())
    views = [tiny_views(seed=s) for s in (1, 2)]
    expected = None
    for step, v in enumerate(views):
        with torch.no_grad():
            online = torch.nn.Sequential(method.backbone, method.projector)
            branch = method.target.net if momentum else online
            t1, t2 = (F.normalize(branch(x), dim=1) for x in v)
        tmp = correlation(t1, t2)
        expected = tmp if step == 0 else 0.9 * expected + 0.1 * tmp
        out = method(v)
        torch.testing.assert_close(method.correlation_ema, expected)
        # F in the loss is the updated one: the logged negative term uses it.
        u1, u2 = (F.normalize(method.projector(method.backbone(x)), dim=1) for x in v)
        negative = 0.25 * 100 * sum(((u @ expected) * u).sum(1).mean() for u in (u1, u2))
        torch.testing.assert_close(out["logs"]["negative_term"], negative.detach())
    assert method.correlation_updates.item() == 2


def test_unigrad_exact_form_is_the_reference_codes_surrogate():
    """loss = ½(mean⟨sg(g1), u1⟩ + mean⟨sg(g2), u2⟩), g1 = −ū2 + λu1F (`loss_unigrad`)."""
    method = tiny_method("unigrad", loss_form="exact", **SMALL)
    views = tiny_views()
    _, grad = loss_and_gradient(method, views)
    reference = tiny_method("unigrad", **SMALL)
    reference.zero_grad()
    z1, z2 = (reference.projector(reference.backbone(v)) for v in views)
    with torch.no_grad():
        t1, t2 = (F.normalize(reference.target(v), dim=1) for v in views)
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    corr = correlation(t1, t2)
    g1, g2 = -t2 + 100 * u1 @ corr, -t1 + 100 * u2 @ corr
    (0.5 * ((g1.detach() * u1).sum(-1).mean() + (g2.detach() * u2).sum(-1).mean())).backward()
    ref = torch.cat([p.grad.flatten() for p in reference.parameters() if p.requires_grad])
    assert rel_err(grad, ref) < RTOL


# ---- every method: the two switches --------------------------------------------------------


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_exact_form_gives_the_original_parameter_gradients(name, momentum):
    views = tiny_views()
    loss, grad = loss_and_gradient(tiny_method(name, momentum_encoder=momentum, **SMALL), views)
    loss_g, grad_g = loss_and_gradient(
        tiny_method(name, loss_form="exact", momentum_encoder=momentum, **SMALL), views
    )
    torch.testing.assert_close(loss_g, loss, rtol=0, atol=0)
    assert rel_err(grad_g, grad) < RTOL


@pytest.mark.parametrize("name", METHODS)
def test_momentum_encoder_switch_changes_only_the_target(name):
    """Off: no EMA copy at all. On, at init (EMA copy = online): the same gradient."""
    views = tiny_views()
    off = tiny_method(name, momentum_encoder=False, **SMALL)
    assert off.target is None and "momentum" not in off(views)["logs"]
    on = tiny_method(name, momentum_encoder=True, **SMALL)
    logs = on(views)["logs"]
    assert "momentum" in logs and all(v.ndim == 0 for v in logs.values())
    assert rel_err(loss_and_gradient(on, views)[1], loss_and_gradient(off, views)[1]) < RTOL


@pytest.mark.parametrize(
    "name, fields, field",
    [
        ("barlow_twins", {"loss_form": "unified"}, "method.loss_form"),
        ("barlow_twins", {"lambd": -1.0}, "method.lambd"),
        ("vicreg_exp", {"temperature": 0.0}, "method.temperature"),
        ("vicreg_ctr", {"momentum_encoder": True, "base_momentum": 0.0}, "method.base_momentum"),
        ("unigrad", {"rho": 1.0}, "method.rho"),
    ],
)
def test_unsupported_settings_name_the_field(name, fields, field):
    with pytest.raises(ValueError, match=field):
        tiny_method(name, **dict(SMALL, **fields))


# ---- several processes ---------------------------------------------------------------------

DIST_SMALL = ["method.proj_hidden_dim=32", "method.out_dim=16"]
DIST_CASES = {
    "barlow_twins": ["method.name=barlow_twins", *DIST_SMALL],
    "vicreg": ["method.name=vicreg", *DIST_SMALL],
    "vicreg_ctr-exact-momentum": [
        "method.name=vicreg_ctr",
        *DIST_SMALL,
        "method.loss_form=exact",
        "method.momentum_encoder=true",
    ],
    "unigrad": ["method.name=unigrad", *DIST_SMALL],
}


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    """Each case's step as one process and as two, in float64: these losses' large gradients
    (λ = 25, 100; lr 0.5) amplify float32 round-off past any tight tolerance, while in float64
    one and two processes agree to ~1e-12."""
    steps = one_and_two_processes(
        tmp_path_factory.mktemp("dist"), list(DIST_CASES.values()), "--float64"
    )
    return dict(zip(DIST_CASES, steps))


@pytest.mark.distributed
@pytest.mark.parametrize("case", DIST_CASES)
def test_two_processes_match_one(two_process_steps, case):
    assert_steps_match(*two_process_steps[case], rtol=1e-8, atol=1e-10)


# ---- real pretraining runs -----------------------------------------------------------------


@pytest.mark.integration
def test_unigrad_correlation_survives_sigkill_and_resume(shapes_root, tmp_path):
    state = resumed_state_is_bit_exact("unigrad", shapes_root, tmp_path)
    assert int(state["correlation_updates"]) == 16 and state["correlation_ema"].abs().sum() > 0
