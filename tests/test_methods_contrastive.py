"""SimCLR (+ abs / sq), MoCo v2 and MoCo v3: losses, exact analytic gradients, the queue,
shuffle-BN, multi-process equality and exact resume. (Short real runs: test_methods_all.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from distributed import assert_steps_match, one_and_two_processes
from helpers import ROOT, subprocess_env
from method_checks import (
    loss_and_gradient,
    rel_err,
    resumed_state_is_bit_exact,
    tiny_method,
    tiny_views,
)
from torch import nn

from pretrain.methods import METHODS
from pretrain.methods.contrastive import SIMILARITIES, contrastive_loss, info_nce, info_nce_grad
from pretrain.methods.moco import shuffle_bn_forward
from pretrain.methods.simclr import simclr_pairs
from pretrain.queue import KeyQueue

CONTRASTIVE = ("simclr", "simclr_abs", "simclr_sq", "mocov2", "mocov3")
RTOL = 1e-5


def unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def layout(kind: str, gen: torch.Generator, n: int = 6, dim: int = 5):
    """(anchors, keys, pos, exclude, keys_are_anchors) as each method arranges them."""
    if kind in ("simclr", "simclr_momentum"):
        u = unit(2 * n, dim, gen=gen)
        keys = u if kind == "simclr" else unit(2 * n, dim, gen=gen)
        pos, exclude = simclr_pairs(n, 0, 2 * n, u.device)
        return u, keys, pos, exclude, kind == "simclr"
    if kind == "mocov2":  # [q·k₊, q·queue]: the other keys of the batch are not candidates
        queue_size = 11
        keys = unit(n + queue_size, dim, gen=gen)
        exclude = torch.zeros(n, n + queue_size, dtype=torch.bool)
        exclude[:, :n] = ~torch.eye(n, dtype=torch.bool)
        return unit(n, dim, gen=gen), keys, torch.arange(n), exclude, False
    if kind == "mocov3":  # rank 1 of 2: own keys are the second half of the gathered batch
        return unit(n, dim, gen=gen), unit(2 * n, dim, gen=gen), torch.arange(n) + n, None, False
    raise ValueError(kind)


CASES = [(k, s) for k in ("simclr", "simclr_momentum") for s in SIMILARITIES] + [
    ("mocov2", "dot"),
    ("mocov3", "dot"),
]


@pytest.mark.parametrize("kind,similarity", CASES)
def test_analytic_gradient_equals_autograd(kind, similarity):
    gen = torch.Generator().manual_seed(CASES.index((kind, similarity)))
    u, keys, pos, exclude, shared = layout(kind, gen)
    tau = 0.2
    u = u.clone().requires_grad_()
    k = u if shared else keys.clone().requires_grad_()
    info_nce(u, k, pos, tau, similarity, exclude).backward()
    g_u, g_k = info_nce_grad(u.detach(), k.detach(), pos, tau, similarity, exclude)
    if shared:  # SimCLR: the anchors are the keys; the full gradient has both terms
        assert rel_err(g_u + g_k, u.grad) < RTOL
    else:
        assert rel_err(g_u, u.grad) < RTOL
        assert rel_err(g_k, k.grad) < RTOL


def test_moco_gradient_matches_unigrad_formula():
    """∂L/∂u_i = (1/Nτ)[−k_i + Σ_{v ∈ {k_i} ∪ Q} s_v v], s = softmax(u_i·v/τ)
    (docs/methods.md#infonce)."""
    gen = torch.Generator().manual_seed(1)
    n, tau = 6, 0.2
    u, keys, pos, exclude, _ = layout("mocov2", gen, n=n)
    queue = keys[n:]
    expected = torch.stack(
        [
            (
                -keys[i]
                + (torch.cat([keys[i : i + 1], queue]) @ u[i] / tau).softmax(0)
                @ torch.cat([keys[i : i + 1], queue])
            )
            / (n * tau)
            for i in range(n)
        ]
    )
    assert rel_err(info_nce_grad(u, keys, pos, tau, exclude=exclude)[0], expected) < RTOL


def test_simclr_full_gradient_matches_formula():
    """∂L/∂u_i = (1/2Nτ)[−2u_p(i) + Σ_{k≠i} P_ik u_k + Σ_{a≠i} P_ai u_a]
    (docs/methods.md#infonce)."""
    gen = torch.Generator().manual_seed(2)
    n, tau = 5, 0.1
    u, _, pos, exclude, _ = layout("simclr", gen, n=n)
    p = (u @ u.T / tau).masked_fill(exclude, float("-inf")).softmax(1)
    expected = (-2 * u[pos] + p @ u + p.T @ u) / (2 * n * tau)
    g_u, g_k = info_nce_grad(u, u, pos, tau, exclude=exclude)
    assert rel_err(g_u + g_k, expected) < RTOL
    assert rel_err(g_u, expected) > 0.1  # UniGrad's anchor-only term is a different gradient


@pytest.mark.parametrize("kind,similarity", CASES)
def test_exact_form_backward_equals_original(kind, similarity):
    """Through the ℓ2 normalisation into z: same value, same gradient, in both loss forms."""
    gen = torch.Generator().manual_seed(3)
    u0, keys0, pos, exclude, shared = layout(kind, gen)
    z0 = u0 * (1 + torch.rand(u0.shape[0], 1, generator=gen, dtype=torch.float64))
    results = []
    for form in ("original", "exact"):
        z = z0.clone().requires_grad_()
        u = F.normalize(z, dim=1)
        keys = u if shared else keys0
        loss, logs = contrastive_loss(form, u, keys, pos, 0.2, similarity, exclude)
        loss.backward()
        results.append((loss.detach(), z.grad, logs))
    (l_o, g_o, logs_o), (l_g, g_g, logs_g) = results
    assert torch.allclose(l_o, l_g, rtol=1e-12)
    assert rel_err(g_g, g_o) < RTOL
    assert set(logs_o) == {"pos_sim", "pos_top1"}
    assert torch.equal(logs_o["pos_sim"], logs_g["pos_sim"])


def test_duality_variants_shape_only_the_negatives():
    """SimCLR-abs/-sq: φ(s) = |s|, s² on negatives; the positive keeps its plain cosine."""
    gen = torch.Generator().manual_seed(4)
    n = 6
    v1 = unit(n, 5, gen=gen)
    v2 = F.normalize(v1 + 0.1 * torch.randn(n, 5, generator=gen, dtype=torch.float64), dim=1)
    pos, exclude = simclr_pairs(n, 0, 2 * n, v1.device)
    u, flipped = torch.cat([v1, v2]), torch.cat([v1, -v2])  # flipping a view: every φ(s) stays
    for sim in ("abs", "sq"):
        same = info_nce(u, u, pos, 0.2, sim, exclude)
        flip = info_nce(flipped, flipped, pos, 0.2, sim, exclude)
        assert flip > same + 5  # only the positives changed: anti-aligned ones are penalised
        assert not torch.allclose(same, info_nce(u, u, pos, 0.2, "dot", exclude))


def test_simclr_pairs_split_over_processes_average_to_global_loss():
    """Per-rank losses over local anchors, averaged as DDP does, equal the global-batch loss."""
    gen = torch.Generator().manual_seed(5)
    world, n = 2, 3
    v1, v2 = unit(world * n, 4, gen=gen), unit(world * n, 4, gen=gen)
    pos, exclude = simclr_pairs(world * n, 0, 2 * world * n, v1.device)
    global_loss = info_nce(torch.cat([v1, v2]), torch.cat([v1, v2]), pos, 0.1, "sq", exclude)
    gathered = torch.cat(
        [torch.cat([v1[r * n : (r + 1) * n], v2[r * n : (r + 1) * n]]) for r in range(world)]
    )
    per_rank = []
    for r in range(world):
        local = gathered[r * 2 * n : (r + 1) * 2 * n]
        pos_r, exclude_r = simclr_pairs(n, r, 2 * world * n, v1.device)
        per_rank.append(info_nce(local, gathered, pos_r, 0.1, "sq", exclude_r))
    assert torch.allclose(sum(per_rank) / world, global_loss, rtol=1e-12)


# ---- the methods, on method_checks' tiny float64 backbone -------------------------------------

SMALL = {
    "simclr": {"proj_hidden_dim": 16, "out_dim": 8},
    "mocov2": {"proj_hidden_dim": 16, "out_dim": 8, "queue_size": 24},
    "mocov3": {"proj_hidden_dim": 16, "out_dim": 8, "pred_hidden_dim": 16},
}


def small_method(name: str, **fields):
    return tiny_method(name, **{**SMALL[name.split("_")[0]], **fields})


METHOD_CASES = [(name, {"momentum_encoder": m}) for name in CONTRASTIVE for m in (False, True)] + [
    ("mocov2", {"symmetric": True})
]


@pytest.mark.parametrize("name,fields", METHOD_CASES, ids=str)
def test_exact_form_gives_the_original_parameter_gradients(name, fields):
    views = tiny_views()
    loss_o, grad_o = loss_and_gradient(small_method(name, loss_form="original", **fields), views)
    loss_g, grad_g = loss_and_gradient(small_method(name, loss_form="exact", **fields), views)
    assert torch.allclose(loss_o, loss_g, rtol=1e-12)
    assert grad_o.abs().max() > 0 and rel_err(grad_g, grad_o) < RTOL


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_forward_returns_scalar_logs_and_projector_embeddings(name):
    method = small_method(name)
    out = method(tiny_views())
    assert out["loss"].dim() == 0 and {"pos_sim", "pos_top1"} <= set(out["logs"])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out["logs"].values())
    assert [tuple(z.shape) for z in out["embeddings"]] == [(10, 8), (10, 8)]
    assert not any(z.requires_grad for z in out["embeddings"])


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_momentum_encoder_switch(name):
    """Off: no EMA copy at all (not an EMA at momentum 0). On: the copy follows the online
    encoder."""
    off = small_method(name, momentum_encoder=False, base_momentum=0.0)
    assert off.target is None and not any(k.startswith("target.") for k in off.state_dict())
    on = small_method(name, momentum_encoder=True, base_momentum=0.9, momentum_schedule="constant")
    before = on.target.net[1][0].weight.clone()
    with torch.no_grad():
        on.projector[0].weight.add_(1.0)
    on.after_optimizer_step(0.5)
    assert torch.allclose(on.target.net[1][0].weight, 0.9 * before + 0.1 * on.projector[0].weight)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"loss_form": "unified"}, "method.loss_form"),
        ({"temperature": 0.0}, "method.temperature"),
        ({"momentum_encoder": True, "base_momentum": 0.0}, "method.base_momentum"),
        ({"momentum_encoder": True, "base_momentum": 1.5}, "method.base_momentum"),
        ({"momentum_encoder": True, "momentum_schedule": "step"}, "method.momentum_schedule"),
    ],
)
@pytest.mark.parametrize("name", ("simclr", "mocov2", "mocov3"))
def test_unsupported_settings_name_the_field(name, fields, match):
    with pytest.raises(ValueError, match=match):
        small_method(name, **fields)


def test_mocov2_queue_smaller_than_the_batch_is_an_error():
    with pytest.raises(ValueError, match="method.queue_size"):
        small_method("mocov2")(tiny_views(batch=30))


def test_registry_and_recipes_select_every_method_by_name():
    from pretrain.config import load_pretrain_config

    assert set(CONTRASTIVE) <= set(METHODS.names())
    recipes = {
        **{f"{n}_synthetic_r18": n for n in CONTRASTIVE},
        **{f"{n}_imagenet_r50": n for n in ("simclr", "mocov2", "mocov3")},
    }
    cfgs = {}
    for recipe, name in recipes.items():
        cfgs[recipe] = load_pretrain_config([ROOT / "configs" / "pretrain" / f"{recipe}.yaml"])
        assert cfgs[recipe].method.name == name, recipe
    simclr, mocov2, mocov3 = (
        cfgs[f"{n}_imagenet_r50"].method for n in ("simclr", "mocov2", "mocov3")
    )
    assert (simclr.temperature, simclr.out_dim, simclr.momentum_encoder) == (0.1, 128, False)
    assert (mocov2.queue_size, mocov2.base_momentum, mocov2.temperature) == (65536, 0.999, 0.2)
    assert not mocov2.symmetric
    assert not cfgs["mocov2_imagenet_r50"].train.sync_bn  # shuffle-BN
    assert (mocov3.temperature, mocov3.base_momentum, mocov3.momentum_schedule) == (
        1.0,
        0.99,
        "cosine",
    )


# ---- the queue -----------------------------------------------------------------------------------


def test_queue_is_fifo_and_in_the_state_dict():
    torch.manual_seed(0)
    q = KeyQueue(5, 3)
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    q.push(a)
    assert torch.equal(q.keys[:3], a) and q.fill().item() == pytest.approx(0.6)
    q.push(b)  # wraps: slots 3, 4, 0
    assert torch.equal(q.keys[3:], b[:2]) and torch.equal(q.keys[0], b[2])
    assert torch.equal(q.keys[1:3], a[1:])
    assert q.fill().item() == 1.0 and int(q.pushed) == 6
    restored = KeyQueue(5, 3)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.keys, q.keys) and int(restored.pushed) == 6


def test_mocov2_enqueues_the_keys_after_the_loss():
    method = small_method("mocov2", symmetric=True, queue_size=30)
    before = method.queue.keys.clone()
    out = method(tiny_views())
    assert int(method.queue.pushed) == 20 and not torch.equal(method.queue.keys[:20], before[:20])
    assert torch.equal(method.queue.keys[20:], before[20:])
    # the loss used the queue as it was: recomputing with the old queue gives the same value
    method.queue.keys.copy_(before)
    method.queue.pushed.zero_()
    assert torch.allclose(method(tiny_views())["loss"], out["loss"], rtol=1e-12)


# ---- shuffle-BN ----------------------------------------------------------------------------------


def test_shuffle_bn_is_a_no_op_on_one_process():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = torch.randn(8, 4)
    assert torch.equal(shuffle_bn_forward(encoder, x, seed=3), encoder(x))


SHUFFLE_WORKER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from sslbench import distributed as D
    from pretrain.methods.moco import shuffle_bn_forward
    env = D.init_distributed("cpu")
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = torch.randn(8, 4)
    local = x[env.rank * 4:(env.rank + 1) * 4]
    out = D.gather_no_grad(shuffle_bn_forward(encoder, local, seed=3))
    if env.is_main:
        torch.save({"x": x, "out": out, "state": encoder.state_dict()}, sys.argv[1])
    D.shutdown()
""")


@pytest.mark.distributed
def test_shuffle_bn_normalises_keys_over_a_shuffled_sub_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SHUFFLE_WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path / "out.pt"),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    expected = torch.empty(8, 4)
    with torch.no_grad():
        for chunk in perm.split(4):  # each process normalises its share of the permuted batch
            expected[chunk] = encoder(res["x"][chunk])
        unshuffled = torch.cat([encoder(c) for c in res["x"].split(4)])
    torch.testing.assert_close(res["out"], expected)
    assert not torch.allclose(res["out"], unshuffled, atol=1e-3)


# ---- several processes ---------------------------------------------------------------------

DIST_SMALL = {
    family: [f"method.{k}={v * 2}" for k, v in fields.items()] for family, fields in SMALL.items()
}
DIST_CASES = {
    "simclr": ["method.name=simclr", *DIST_SMALL["simclr"]],
    "simclr-exact": ["method.name=simclr", *DIST_SMALL["simclr"], "method.loss_form=exact"],
    "mocov2-symmetric": ["method.name=mocov2", *DIST_SMALL["mocov2"], "method.symmetric=true"],
    "mocov3-exact": ["method.name=mocov3", *DIST_SMALL["mocov3"], "method.loss_form=exact"],
}


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    """Each case's step as one process and as two, in float64: at τ ≤ 0.2 float32 round-off
    alone moves these gradients by ~1e-3 relative."""
    steps = one_and_two_processes(
        tmp_path_factory.mktemp("dist"), list(DIST_CASES.values()), "--float64"
    )
    return dict(zip(DIST_CASES, steps))


@pytest.mark.distributed
@pytest.mark.parametrize("case", DIST_CASES)
def test_two_processes_match_one(two_process_steps, case):
    assert_steps_match(*two_process_steps[case], rtol=1e-7, atol=1e-9)


# ---- real pretraining runs -------------------------------------------------------------------


@pytest.mark.integration
def test_mocov2_queue_survives_sigkill_and_resume(shapes_root, tmp_path):
    # 16 steps of 32 keys into a queue of 80: it wraps, mid-batch, several times
    state = resumed_state_is_bit_exact("mocov2", shapes_root, tmp_path, "method.queue_size=80")
    assert int(state["queue.pushed"]) == 16 * 32
