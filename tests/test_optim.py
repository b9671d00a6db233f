"""Optimisers, parameter groups and schedules against hand-written references."""

import math

import pytest
import torch
import torchvision
from torch import nn

from sslbench.optim import LARS, build_optimizer, param_groups, scaled_lr, set_lr, warmup_cosine


class ThreeParams(nn.Module):
    """A decayed matrix, a zero-norm matrix (trust ratio falls back to 1) and an excluded bias."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))


def lars_reference(params, excluded, grads_per_step, lr, momentum, wd, eta):
    """The LARS update written out per parameter, in float64 Python scalars where possible."""
    params = [p.detach().clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            if not excluded[i]:
                g = g + wd * p
                p_norm, g_norm = p.norm().item(), g.norm().item()
                g = g * (eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0)
            mus[i] = momentum * mus[i] + g
            params[i] = p - lr * mus[i]
    return params


@pytest.mark.parametrize("steps", [1, 3])
def test_lars_matches_reference(steps):
    model = ThreeParams()
    start = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, weight_decay=0.1)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    optimizer = build_optimizer("lars", groups, lr=0.5, momentum=0.9, eta=0.02)
    assert isinstance(optimizer, LARS)
    gen = torch.Generator().manual_seed(1)
    grads_per_step = [
        [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
        for _ in range(steps)
    ]
    for grads in grads_per_step:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.step()
    expected = lars_reference(start, [False, False, True], grads_per_step, 0.5, 0.9, 0.1, 0.02)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    # The zero-norm matrix moved by the plain (decayed) gradient: the ratio fell back to 1.
    assert not torch.equal(model.zero.detach(), start[1])


def test_lars_skips_parameters_without_grad():
    model = ThreeParams()
    before = model.bias.detach().clone()
    optimizer = build_optimizer("lars", param_groups(model, 0.1), lr=0.5)
    model.weight.grad = torch.ones_like(model.weight)
    optimizer.step()
    assert torch.equal(model.bias.detach(), before)


def test_resnet_decays_only_conv_and_linear_weights():
    model = torchvision.models.resnet18()
    n_weights = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    optimizer = build_optimizer("sgd", param_groups(model, 1e-4), lr=0.1)
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    excluded = [p for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert len(decayed) == n_weights == 21
    assert all(p.ndim > 1 for p in decayed) and all(p.ndim <= 1 for p in excluded)
    assert len(decayed) + len(excluded) == len(list(model.parameters()))
    (everything,) = param_groups(model, 1e-4, exclude_norm_bias=False)
    assert everything["weight_decay"] == 1e-4 and not everything["lars_exclude"]


def test_overrides_and_no_duplicates():
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
            "predictor": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
        }
    )
    model["backbone"][0].bias.requires_grad_(False)
    shared = nn.Linear(4, 4)
    model["tied"] = shared
    model["tied_again"] = shared  # the same parameters reachable twice
    groups = param_groups(
        model,
        1e-4,
        overrides={"predictor.": {"fixed_lr": True}, "predictor.1.": {"lr_scale": 0.5}},
        norm_bias_overrides={"lr_scale": 0.024},
    )
    by_name = {g["name"]: g for g in groups}
    for g in groups:
        assert {"lr_scale", "fixed_lr", "lars_exclude", "weight_decay", "name"} <= g.keys()
    assert (
        by_name["predictor.weights"]["fixed_lr"] and by_name["predictor.weights"]["lr_scale"] == 1.0
    )
    assert by_name["predictor.1.weights"]["lr_scale"] == 0.5
    assert not by_name["predictor.1.weights"]["fixed_lr"], "the longest prefix wins"
    assert by_name["norm_bias"]["lr_scale"] == 0.024 and by_name["norm_bias"]["weight_decay"] == 0
    assert not by_name["weights"]["fixed_lr"] and by_name["weights"]["lr_scale"] == 1.0
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable


def test_unknown_optimizer():
    with pytest.raises(ValueError, match=r"'rmsprop'.*sgd, lars, adamw"):
        build_optimizer("rmsprop", param_groups(nn.Linear(2, 2), 0.0), lr=0.1)
    assert isinstance(
        build_optimizer("adamw", param_groups(nn.Linear(2, 2), 0.05), lr=1e-3), torch.optim.AdamW
    )


def test_scaled_lr():
    assert scaled_lr(0.05, 512) == pytest.approx(0.1)


def test_warmup_cosine():
    total, warmup, base, final, start = 110, 10, 0.4, 0.004, 0.001
    lr = [warmup_cosine(s, total, warmup, base, final, start) for s in range(total + 3)]
    assert lr[0] == start and lr[warmup] == base
    assert lr[5] == pytest.approx((start + base) / 2)
    assert lr[warmup + (total - warmup) // 2] == pytest.approx((base + final) / 2)
    assert lr[total] == lr[total + 2] == final
    assert lr[total - 1] == pytest.approx(
        final + (base - final) * (1 + math.cos(math.pi * 99 / 100)) / 2
    )
    assert all(a < b for a, b in zip(lr[:warmup], lr[1 : warmup + 1]))
    assert all(a > b for a, b in zip(lr[warmup:total], lr[warmup + 1 : total + 1]))
    assert warmup_cosine(0, 10, 0, base) == base
    with pytest.raises(ValueError):
        warmup_cosine(0, 10, 11, base)


def test_set_lr_fixed_and_scaled_groups():
    model = nn.ModuleDict({"backbone": nn.Linear(3, 3), "predictor": nn.Linear(3, 3)})
    groups = param_groups(
        model,
        1e-4,
        overrides={"predictor.": {"fixed_lr": True}},
        norm_bias_overrides={"lr_scale": 0.5},
    )
    optimizer = build_optimizer("sgd", groups, lr=0.2)

    def lrs():
        return {g["name"]: g["lr"] for g in optimizer.param_groups}

    assert lrs() == pytest.approx(
        {"weights": 0.2, "norm_bias": 0.1, "predictor.weights": 0.2, "predictor.norm_bias": 0.1}
    )
    set_lr(optimizer, 0.05, base_lr=0.2)
    assert lrs() == pytest.approx(
        {"weights": 0.05, "norm_bias": 0.025, "predictor.weights": 0.2, "predictor.norm_bias": 0.1}
    )
