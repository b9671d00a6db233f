"""Checks shared by the method test files: every registered method's test settings, a tiny
float64 model, its parameter gradient, and a short real pretraining run scored by kNN against
random init."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import ROOT, PairedKnn, paired_knn, pretrain_killed_at, sslbench, tiny_data_overrides
from torch import nn

from pretrain.methods import build_method, method_config_class

# Every registered method's head sizes for the tiny float64 model (tests/test_methods_all.py
# asserts the keys are exactly METHODS.names(), so a new method cannot skip the common checks).
_HEAD = {"proj_hidden_dim": 16, "out_dim": 8}
_PREDICTOR = {**_HEAD, "pred_hidden_dim": 6}
SMALL = {
    "simclr": _HEAD,
    "simclr_abs": _HEAD,
    "simclr_sq": _HEAD,
    "mocov2": {**_HEAD, "queue_size": 24},
    "mocov3": {**_HEAD, "pred_hidden_dim": 16},
    "byol": _PREDICTOR,
    "simsiam": _PREDICTOR,
    "barlow_twins": _HEAD,
    "vicreg": _HEAD,
    "vicreg_exp": _HEAD,
    "vicreg_ctr": _HEAD,
    "unigrad": _HEAD,
}
UNIGRAD_RECIPE = ROOT / "configs" / "pretrain" / "unigrad_form" / "synthetic_r18.yaml"


class TinyBackbone(nn.Module):
    """A linear map of 3×4×4 images: a backbone with `feature_dim`, cheap enough for float64."""

    feature_dim = 12

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, self.feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_method(name: str, **fields) -> nn.Module:
    """`name` on TinyBackbone in float64, initialised from seed 0 (so two builds are equal)."""
    torch.manual_seed(0)
    cfg = method_config_class(name)(**fields)
    return build_method(TinyBackbone(), cfg).double()


def tiny_views(batch: int = 10, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2)]


def loss_and_gradient(
    method: nn.Module, views: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the gradient of every trainable parameter, flattened into one vector."""
    method.zero_grad(set_to_none=True)
    out = method(views)
    out["loss"].backward()
    grads = [
        p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
        for p in method.parameters()
        if p.requires_grad
    ]
    return out["loss"].detach(), torch.cat(grads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# Short real runs: each recipe (a width-16 ResNet-18 on 16 px crops) at batch 64 for 30 epochs of
# the 512 tiny training images, 240 steps (the recipes: 20-30 epochs of 1,600 images at batch 128).
SHORT_RUN = ["backbone.width=16", "data.image_size=16", "optim.batch_size=64", "train.epochs=30"]


def recipe_of(name: str, loss_form: str = "original") -> Path:
    """Method `name`'s own CPU recipe, or the unigrad family's CPU recipe (method.name=name)."""
    if loss_form == "unigrad":
        return UNIGRAD_RECIPE
    return ROOT / "configs" / "pretrain" / f"{name}_synthetic_r18.yaml"


def pretrain_and_score(
    name: str, shapes_root: Path, knn_root: Path, out: Path, *extra: str, recipe: Path | None = None
) -> tuple[PairedKnn, dict]:
    """Pretrain method `name` briefly on `shapes_root` (its own CPU recipe unless `recipe` is
    given); its kNN against the same network at its random init on `knn_root` (KNN_SHAPES), and
    the final collapse diagnostics of its manifest."""
    from pretrain.config import load_pretrain_config
    from pretrain.engine import pretrain
    from sslbench.artifact import load_backbone
    from sslbench.backbones import build_backbone

    cfg = load_pretrain_config(
        [recipe or recipe_of(name)],
        [
            *tiny_data_overrides(shapes_root),
            *SHORT_RUN,
            f"run.output_dir={out}",
            f"run.name={name}",
            f"method.name={name}",
            *extra,
        ],
    )
    backbone, manifest = load_backbone(pretrain(cfg))
    assert manifest["method"] == name
    torch.manual_seed(manifest["seed"])  # the engine seeds this way before building the backbone
    random_init = build_backbone(manifest["arch"], **manifest["arch_kwargs"])
    knn = paired_knn(backbone, random_init, knn_root, image_size=cfg.data.image_size)
    diagnostics = manifest["diagnostics"]
    print(
        f"{name} {' '.join(extra)}: {knn}, l2_std*sqrt(d) "
        f"{diagnostics['l2_std_x_sqrt_d']:.3f}, m_o {diagnostics['m_o']:.3f}"
    )
    return knn, diagnostics


def assert_learns_without_collapse(
    name: str, shapes_root: Path, knn_root: Path, out: Path, *extra: str, recipe: Path | None = None
) -> None:
    """The smoke claim for every method: a short run beats its own random init on kNN top-1,
    significantly on 1,600 paired test images (sign test z > 2), and its embeddings keep their
    spread (SimSiam's ℓ2-output std, Zhang et al.'s centre norm)."""
    knn, diagnostics = pretrain_and_score(name, shapes_root, knn_root, out, *extra, recipe=recipe)
    assert knn.trained > knn.random and knn.z > 2, f"{name} {extra}: {knn}"
    assert diagnostics["l2_std_x_sqrt_d"] > 0.2 and diagnostics["m_o"] < 0.9, diagnostics


def resumed_state_is_bit_exact(
    name: str, shapes_root: Path, out: Path, *extra: str, recipe: Path | None = None
) -> dict:
    """Run method `name` (its own CPU recipe unless `recipe` is given) straight through and again
    SIGKILLed after its step-5 checkpoint and resumed; assert the two end in the same resume
    state and weights; return that state."""
    common = [
        str(recipe or recipe_of(name)),
        *tiny_data_overrides(shapes_root),
        *SHORT_RUN,
        "optim.batch_size=32",
        "train.epochs=1",
        "train.checkpoint_every=5",
        f"run.output_dir={out}",
        f"method.name={name}",
        *extra,
    ]
    sslbench("pretrain", *common, "run.name=straight", cwd=out)
    killed = [*common, "run.name=killed"]
    pretrain_killed_at(killed, out, out / "killed" / "checkpoint.pt", min_step=5)
    assert not (out / "killed" / "backbone.json").exists()
    sslbench("pretrain", *killed, "--resume", cwd=out)
    a, b = (
        torch.load(out / run / "checkpoint.pt", weights_only=True) for run in ("straight", "killed")
    )
    assert a["step"] == b["step"] == 512 // 32
    assert a["method"].keys() == b["method"].keys()
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    assert (out / "straight" / "backbone.safetensors").read_bytes() == (
        out / "killed" / "backbone.safetensors"
    ).read_bytes()
    return a["method"]
