"""BYOL and SimSiam: the predictor branch's exact gradient in UniGrad's notation, the loss-form
and momentum-encoder switches. (Short real runs: test_methods_all.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_checks import loss_and_gradient, rel_err, tiny_method, tiny_views

from pretrain.methods.byol import BYOL, BYOLConfig
from pretrain.methods.simsiam import negative_cosine, negative_cosine_grad
from pretrain.momentum import momentum_at
from pretrain.unified import gradient_surrogate

RTOL = 1e-5
SMALL = {"proj_hidden_dim": 16, "out_dim": 8, "pred_hidden_dim": 6}
METHODS = ("simsiam", "byol")


def test_negative_cosine_gradient_equals_autograd():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(negative_cosine(p, t), p)
    assert rel_err(negative_cosine_grad(p, t), expected) < RTOL


def test_linear_predictor_gradient_is_unigrads_formula():
    """∂(−cos(Wu1, ū2))/∂u1 = (1/‖Wu1‖)[−Wᵀū2 + λWᵀWu1], λ = Wu1·ū2/‖Wu1‖²
    (docs/methods.md#simsiam); the gradient injected at the predictor output p = Wu1 gives it (and
    W's gradient) via backward."""
    gen = torch.Generator().manual_seed(1)
    n, d = 6, 5
    u1 = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    u2 = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    w = torch.randn(d, d, generator=gen, dtype=torch.float64, requires_grad=True)
    expected_u, expected_w = torch.autograd.grad(negative_cosine(u1 @ w.T, u2), (u1, w))

    with torch.no_grad():
        p = u1 @ w.T
        norm = p.norm(dim=1, keepdim=True)
        lam = (p * u2).sum(dim=1, keepdim=True) / norm.square()
        formula = (-u2 @ w + lam * (u1 @ w.T @ w)) / (norm * n)
    assert rel_err(formula, expected_u) < RTOL

    p = u1 @ w.T
    got_u, got_w = torch.autograd.grad(gradient_surrogate(p, negative_cosine_grad(p, u2)), (u1, w))
    assert rel_err(got_u, expected_u) < RTOL and rel_err(got_w, expected_w) < RTOL


def test_byol_loss_is_two_minus_two_cosine_over_both_directions():
    gen = torch.Generator().manual_seed(2)
    q1, q2, t1, t2 = (torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(4))
    mse = lambda q, t: (F.normalize(q, dim=1) - F.normalize(t, dim=1)).square().sum(1).mean()  # noqa: E731
    got = BYOL.combine(negative_cosine(q1, t2), negative_cosine(q2, t1))
    torch.testing.assert_close(got, mse(q1, t2) + mse(q2, t1))


def test_byol_defaults_are_the_papers():
    cfg = BYOLConfig()
    assert (cfg.momentum_encoder, cfg.base_momentum, cfg.momentum_schedule) == (
        True,
        0.99,
        "cosine",
    )
    assert (cfg.proj_hidden_dim, cfg.out_dim, cfg.pred_hidden_dim, cfg.proj_layers) == (
        4096,
        256,
        4096,
        2,
    )
    assert not cfg.proj_last_bn and cfg.stop_gradient


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_exact_form_gives_the_original_parameter_gradients(name, momentum):
    views = tiny_views()
    fields = dict(SMALL, momentum_encoder=momentum)
    loss, grad = loss_and_gradient(tiny_method(name, loss_form="original", **fields), views)
    loss_g, grad_g = loss_and_gradient(tiny_method(name, loss_form="exact", **fields), views)
    torch.testing.assert_close(loss_g, loss, rtol=0, atol=0)  # the exact form logs L itself
    assert rel_err(grad_g, grad) < RTOL


@pytest.mark.parametrize("name", METHODS)
def test_momentum_encoder_switch(name):
    views = tiny_views()
    off = tiny_method(name, momentum_encoder=False, **SMALL)
    assert off.target is None and not any(k.startswith("target.") for k in off.state_dict())
    on = tiny_method(name, momentum_encoder=True, base_momentum=0.9, **SMALL)
    # At init the EMA copy equals the online branch: only the target differs, so the gradients
    # agree.
    assert rel_err(loss_and_gradient(on, views)[1], loss_and_gradient(off, views)[1]) < RTOL
    before = [p.clone() for p in on.target.parameters()]
    with torch.no_grad():
        for p in on.parameters():
            if p.requires_grad:
                p.add_(1.0)
    on.after_optimizer_step(0.25)
    m = momentum_at(0.9, 0.25, "cosine")
    online = list(on.backbone.parameters()) + list(on.projector.parameters())
    for old, new, src in zip(before, on.target.parameters(), online):
        torch.testing.assert_close(new, m * old + (1 - m) * src)
    logs = on(views)["logs"]
    assert logs["momentum"].ndim == 0 and logs["momentum"].item() == pytest.approx(m)
    assert all(v.ndim == 0 for v in logs.values())


def test_simsiam_stop_gradient_ablation_sends_gradient_through_the_target():
    views = tiny_views()
    _, with_sg = loss_and_gradient(tiny_method("simsiam", **SMALL), views)
    _, without_sg = loss_and_gradient(tiny_method("simsiam", stop_gradient=False, **SMALL), views)
    assert rel_err(without_sg, with_sg) > 1e-3


def test_fixed_predictor_lr_group():
    assert tiny_method("simsiam", **SMALL).param_group_overrides() == {
        "predictor.": {"fixed_lr": True}
    }
    assert tiny_method("byol", **SMALL).param_group_overrides() == {}


@pytest.mark.parametrize(
    "name, fields, field",
    [
        ("simsiam", {"stop_gradient": False, "momentum_encoder": True}, "method.stop_gradient"),
        ("simsiam", {"stop_gradient": False, "loss_form": "exact"}, "method.stop_gradient"),
        ("byol", {"loss_form": "grad"}, "method.loss_form"),
        ("byol", {"base_momentum": 0.0}, "method.base_momentum"),
        ("byol", {"momentum_schedule": "linear"}, "method.momentum_schedule"),
    ],
)
def test_unsupported_settings_name_the_field(name, fields, field):
    with pytest.raises(ValueError, match=field):
        tiny_method(name, **dict(SMALL, **fields))
