"""UniGrad's unified forms (`method.loss_form: unigrad`, docs/methods.md "Loss forms").

For every registered method: the gradient its unigrad form injects into the projector outputs
equals a float64 implementation of the official code's formula written here from the formula
(fundamentalvision/UniGrad project/pretrainer.py; VICReg's is this project's derivation), and
has the unified shape −(positive) + λ Σ_v w_v v, with the weights w recovered from the gradient
by least squares over the bank. A method without a form refuses `loss_form: unigrad`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_checks import SMALL, rel_err, tiny_method, tiny_views

from pretrain.methods import METHODS
from pretrain.methods.barlow_twins import BarlowTwinsConfig
from pretrain.methods.moco import MoCoV2Config, MoCoV3Config
from pretrain.methods.simclr import SimCLRConfig
from pretrain.methods.simsiam import SimSiamConfig
from pretrain.methods.unigrad import UniGradConfig
from pretrain.methods.vicreg import VICRegConfig
from pretrain.unified import UNIFIED_FORMS

# The official code's constants (configs/*.py); VICReg's λ_u = 2νD/λ is ours (vicreg.py).
TAU, BT_LAMBDA, UNIGRAD_LAMBDA, RHO, EPS, EIG_MIN = 0.2, 50.0, 100.0, 0.99, 0.3, 1e-4
VICREG_SIM, VICREG_COV = 25.0, 1.0
RTOL = 1e-6


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def randn_unit(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return unit(torch.randn(n, d, generator=gen, dtype=torch.float64))


# ---- the formulas, float64, one sample at a time -------------------------------------------------


def contrastive(u, positive, bank, history):
    """loss_simclr_grad_mm: (−positive + Σ_v softmax_v(u·v/τ) v)/τ, bank V = [ū1; ū2]."""
    out = torch.empty_like(u)
    for b in range(len(u)):
        logits = np.array([float(u[b] @ v) / TAU for v in bank])
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        out[b] = (-positive[b] + sum(float(w) * v for w, v in zip(weights, bank))) / TAU
    return out


def ema_correlation(history):
    """F after the steps' targets: tmp_F = (ū1ᵀū1 + ū2ᵀū2)/2B; F = tmp_F, then ρF + (1 − ρ)tmp_F."""
    corr = None
    for t1, t2 in history:
        tmp = sum(torch.outer(v, v) for v in torch.cat([t1, t2])) / (2 * len(t1))
        corr = tmp if corr is None else RHO * corr + (1 - RHO) * tmp
    return corr


def directpred_matrices(corr):
    """W = U diag(max(√(s/s_max) + ε, 1e-4)) Vᵀ from the SVD of F, F̂ = F/s_max + ε²I."""
    u, s, vt = np.linalg.svd(corr.numpy())
    w = u @ np.diag(np.maximum(np.sqrt(s / s.max()) + EPS, EIG_MIN)) @ vt
    return torch.from_numpy(w), corr / float(s.max()) + EPS**2 * torch.eye(
        len(corr), dtype=corr.dtype
    )


def directpred(u, positive, bank, history):
    """loss_byol_directpred_grad: (1/‖Wu‖)(−W·positive + λF̂u), λ = ⟨Wu, positive⟩/⟨F̂u, u⟩."""
    w, f_hat = directpred_matrices(ema_correlation(history))
    out = torch.empty_like(u)
    for b in range(len(u)):
        wu, fu = w.T @ u[b], f_hat.T @ u[b]  # the code's row vectors times the matrix
        lam = (wu @ positive[b]) / (fu @ u[b])
        out[b] = (-(w.T @ positive[b]) + lam * fu) / wu.norm()
    return out


def barlow_twins(u, positive, bank, history):
    """loss_barlow_twins_grad_mm: 2(−ū2_b + (λ/N) Σ_v (ū2_b·ū2_v) u1_v); bank = (ū2s, u1s)."""
    targets, online = bank
    n = len(targets)
    return torch.stack(
        [
            2
            * (
                -positive[b]
                + BT_LAMBDA / n * sum(float(positive[b] @ targets[v]) * online[v] for v in range(n))
            )
            for b in range(len(u))
        ]
    )


def vicreg(u, positive, bank, history):
    """Ours: −ū2 + λ_u F1 u1, F1 = (1/N)Σ_v ū1_v ū1_vᵀ, λ_u = 2νD/λ."""
    lambd = 2 * VICREG_COV * u.shape[1] / VICREG_SIM
    f1 = sum(torch.outer(v, v) for v in bank) / len(bank)
    return torch.stack([-positive[b] + lambd * f1 @ u[b] for b in range(len(u))])


def unigrad(u, positive, bank, history):
    """loss_unigrad: −ū2 + λ F u1, F the correlation EMA."""
    corr = ema_correlation(history)
    return torch.stack([-positive[b] + UNIGRAD_LAMBDA * corr @ u[b] for b in range(len(u))])


FORMULAS = {
    "simclr": contrastive,
    "mocov2": contrastive,
    "mocov3": contrastive,
    "byol": directpred,
    "simsiam": directpred,
    "barlow_twins": barlow_twins,
    "vicreg": vicreg,
    "unigrad": unigrad,
}


def formula_gradients(name, u1, u2, t1, t2, history):
    """g1, g2 of `name`'s form: g1 pairs u1 with ū2, g2 u2 with ū1 (the symmetric code)."""
    formula = FORMULAS[name]
    if formula is contrastive:
        banks = torch.cat([t1, t2]), torch.cat([t1, t2])
    elif formula is barlow_twins:
        banks = (t2, u1), (t1, u2)
    elif formula is vicreg:
        banks = t1, t2
    else:  # F from `history`
        banks = None, None
    return formula(u1, t2, banks[0], history), formula(u2, t1, banks[1], history)


def test_every_form_has_a_formula_here():
    assert set(FORMULAS) == set(UNIFIED_FORMS)
    assert set(UNIFIED_FORMS) <= set(METHODS.names())
    assert [n for n, f in UNIFIED_FORMS.items() if f.derived] == ["vicreg"]


def test_constants_default_to_the_official_code():
    for cfg in (SimCLRConfig(), MoCoV2Config(), MoCoV3Config()):
        assert cfg.unigrad.temperature == TAU
    form = SimSiamConfig().unigrad
    assert (form.rho, form.eps, form.eig_min) == (RHO, EPS, EIG_MIN)
    assert BarlowTwinsConfig().unigrad.lambd == BT_LAMBDA
    assert (UniGradConfig().lambd, UniGradConfig().rho) == (UNIGRAD_LAMBDA, RHO)
    cfg = VICRegConfig()
    assert cfg.unigrad.lambd is None and (cfg.sim_coeff, cfg.cov_coeff) == (VICREG_SIM, VICREG_COV)


# ---- the gradient reaching the features ---------------------------------------------------------


def projector_outputs_and_grads(method, views):
    """One step's online projector outputs z1, z2 and the gradients backward brings them."""
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = method.projector.register_forward_hook(keep)
    try:
        method(views)["loss"].backward()
    finally:
        handle.remove()
    return [z.detach() for z in captured], [z.grad for z in captured]


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("name", METHODS.names())
def test_injected_gradient_is_the_formula(name, momentum):
    """∂L̃/∂z = (I − uuᵀ)g/(2B‖z‖) for the code's L̃ = ½(mean⟨sg(g1), u1⟩ + mean⟨sg(g2), u2⟩),
    over two steps (F is an EMA updated before use); with a momentum encoder whose weights
    differ from the online ones, so a mix-up of targets and online features shows."""
    fields = dict(SMALL[name], loss_form="unigrad", momentum_encoder=momentum)
    if name not in UNIFIED_FORMS:
        with pytest.raises(ValueError, match="method.loss_form: .* has no unigrad form"):
            tiny_method(name, **fields)
        return
    method = tiny_method(name, **fields)
    if momentum:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for p in method.target.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    history = []
    for seed in (1, 2):
        views = tiny_views(seed=seed)
        (z1, z2), grads = projector_outputs_and_grads(method, views)
        with torch.no_grad():
            t1, t2 = (unit(method.target(v)) for v in views) if momentum else (unit(z1), unit(z2))
        u1, u2 = unit(z1), unit(z2)
        history.append((t1, t2))
        expected = formula_gradients(name, u1, u2, t1, t2, history)
        for z, u, g, got in zip((z1, z2), (u1, u2), expected, grads):
            tangent = g - (g * u).sum(dim=1, keepdim=True) * u
            assert rel_err(got, tangent / (2 * len(z) * z.norm(dim=1, keepdim=True))) <= RTOL


# ---- the unified shape --------------------------------------------------------------------------


def recovered_weights(residual: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """w with residual = Σ_v w_v bank_v (least squares), asserting the fit is exact."""
    w = torch.linalg.lstsq(bank.T, residual.unsqueeze(1)).solution.squeeze(1)
    assert rel_err(bank.T @ w, residual) < 1e-10, "not a weighted sum of the bank"
    return w


D, B = 12, 2  # 2 steps × 2B target vectors (+ u) stay linearly independent in 12 dimensions


def shaped_method(name: str):
    return tiny_method(name, **dict(SMALL[name], out_dim=D, loss_form="unigrad"))


def two_steps(method):
    """The method's g1 at the second of two steps of random unit features, and those features."""
    steps = [[randn_unit(B, D, seed=10 * s + k) for k in range(4)] for s in range(2)]
    for u1, u2, t1, t2 in steps:
        g1, _ = method.unigrad_gradients(u1, u2, t1, t2)
    return g1, steps


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3"])
def test_contrastive_shape(name):
    """g1·τ = −ū2 + Σ_v w_v v over V = [ū1; ū2] with w a softmax of u1·v/τ: λ = 1, scale 1/τ."""
    g1, steps = two_steps(shaped_method(name))
    u1, _, t1, t2 = steps[-1]
    bank = torch.cat([t1, t2])
    for b in range(B):
        w = recovered_weights(TAU * g1[b] + t2[b], bank)
        assert (w > 0).all() and abs(float(w.sum()) - 1) < 1e-10
        log_ratio = torch.log(w) - bank @ u1[b] / TAU
        assert float(log_ratio.max() - log_ratio.min()) < 1e-8


def test_barlow_twins_shape():
    """g1/2 = −ū2 + λ Σ_v w_v u1_v with w_v = (ū2·ū2_v)/N: momentum view-2 weights, online
    view-1 vectors, λ = 50."""
    g1, steps = two_steps(shaped_method("barlow_twins"))
    u1, _, _, t2 = steps[-1]
    for b in range(B):
        w = recovered_weights((g1[b] / 2 + t2[b]) / BT_LAMBDA, u1)
        assert rel_err(w, t2 @ t2[b] / B) < 1e-10


def test_vicreg_shape():
    """Ours: g1 = −ū2 + λ_u Σ_v w_v ū1_v with w_v = (u1·ū1_v)/N and λ_u = 2νD/λ."""
    g1, steps = two_steps(shaped_method("vicreg"))
    u1, _, t1, t2 = steps[-1]
    lambd = 2 * VICREG_COV * D / VICREG_SIM
    for b in range(B):
        w = recovered_weights((g1[b] + t2[b]) / lambd, t1)
        assert rel_err(w, t1 @ u1[b] / B) < 1e-10


def ema_weights() -> torch.Tensor:
    """ρ_v of F = Σ_v ρ_v v vᵀ over the two steps' 2B targets each: ρ/2B, then (1 − ρ)/2B."""
    return torch.tensor([RHO] * 2 * B + [1 - RHO] * 2 * B, dtype=torch.float64) / (2 * B)


def history_bank(steps) -> torch.Tensor:
    return torch.cat([torch.cat([t1, t2]) for _, _, t1, t2 in steps])


def test_unigrad_shape():
    """g1 = −ū2 + λ Σ_v w_v v over every target seen, w_v = ρ_v (u1·v), λ = 100."""
    g1, steps = two_steps(shaped_method("unigrad"))
    u1, t2, bank = steps[-1][0], steps[-1][3], history_bank(steps)
    for b in range(B):
        w = recovered_weights((g1[b] + t2[b]) / UNIGRAD_LAMBDA, bank)
        assert rel_err(w / (bank @ u1[b]), ema_weights()) < 1e-8


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_directpred_shape(name):
    """‖Wu1‖g1 = −Wū2 + λ1 Σ_v w_v v + λ1ε² u1 with w_v = ρ_v (u1·v)/s_max: the EMA weights
    of F, scaled by the per-sample λ1 = ⟨Wu1, ū2⟩/⟨F̂u1, u1⟩ (the u1 term is removed by the
    normalisation's backward)."""
    g1, steps = two_steps(shaped_method(name))
    u1, t2, bank = steps[-1][0], steps[-1][3], history_bank(steps)
    corr = ema_correlation([(t1, t2_) for _, _, t1, t2_ in steps])
    w_p, f_hat = directpred_matrices(corr)
    s_max = float(torch.linalg.eigvalsh(corr).max())
    for b in range(B):
        lam = float((w_p @ u1[b]) @ t2[b]) / float(u1[b] @ f_hat @ u1[b])
        residual = (w_p @ u1[b]).norm() * g1[b] + w_p @ t2[b]
        w = recovered_weights(residual, torch.cat([bank, u1[b : b + 1]]))
        assert abs(float(w[-1]) - lam * EPS**2) < 1e-8 * abs(lam)
        assert rel_err(w[:-1] * s_max / (lam * (bank @ u1[b])), ema_weights()) < 1e-8
