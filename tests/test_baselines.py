"""The board's baselines as pretraining runs (pretrain/baselines.py): random-init writes the
engine's initial weights untrained, supervised trains with cross-entropy on the labels; both
are pipeline entries of every shipped embedded pipeline and of imagenet_r50, and neither is an
SSL method (the tests parametrised over METHODS would otherwise run them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import ROOT, paired_knn, sslbench, tiny_data_overrides
from method_checks import TinyBackbone

from pretrain.baselines import BASELINES, Supervised, SupervisedConfig, classification_views
from pretrain.config import load_pretrain_config
from pretrain.methods import METHODS
from sslbench.artifact import load_backbone
from sslbench.backbones import build_backbone
from sslbench.config import ConfigError

RECIPES = ROOT / "configs" / "pretrain"
BASELINE_RECIPES = sorted([*RECIPES.glob("random_init_*.yaml"), *RECIPES.glob("supervised_*.yaml")])


def test_baselines_are_not_ssl_methods():
    assert BASELINES.names() == ["random-init", "supervised"]
    assert not set(BASELINES.names()) & set(METHODS.names())


# Each baseline recipe and an SSL recipe of the same scale: the network and data must agree.
TWINS = {
    "random_init_synthetic_r18": "simsiam_synthetic_r18",
    "supervised_synthetic_r18": "simsiam_synthetic_r18",
    "random_init_imagenet_r50": "simsiam_imagenet_r50",
    "supervised_imagenet_r50": "simsiam_imagenet_r50",
}


def test_every_baseline_recipe_has_an_ssl_twin():
    assert sorted(TWINS) == sorted(p.stem for p in BASELINE_RECIPES)


@pytest.mark.parametrize("recipe, twin", TWINS.items())
def test_a_baseline_recipe_trains_its_twins_network_on_its_data(recipe, twin):
    cfg = load_pretrain_config([RECIPES / f"{recipe}.yaml"])
    ssl = load_pretrain_config([RECIPES / f"{twin}.yaml"])
    assert cfg.method.name == ("random-init" if recipe.startswith("random") else "supervised")
    assert cfg.backbone == ssl.backbone
    assert (cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.options) == (
        ssl.data.name,
        ssl.data.root,
        ssl.data.image_size,
        ssl.data.options,
    )
    if recipe == "supervised_synthetic_r18":  # the SSL recipes' augmentation and step budget
        assert (cfg.augment, cfg.optim.batch_size, cfg.train.epochs) == (
            ssl.augment,
            ssl.optim.batch_size,
            20,
        )
    if recipe == "supervised_imagenet_r50":  # torchvision's classification reference
        assert cfg.augment.pipeline == "classification" and cfg.train.epochs == 100
        assert (
            cfg.optim.name,
            cfg.optim.base_lr,
            cfg.optim.batch_size,
            cfg.optim.momentum,
            cfg.optim.weight_decay,
        ) == ("sgd", 0.1, 256, 0.9, 1e-4)


def test_baseline_configs_refuse_what_they_cannot_be():
    random_init = RECIPES / "random_init_synthetic_r18.yaml"
    with pytest.raises(
        ConfigError,
        match=r"random-init trains nothing: it needs train.epochs=0 "
        r"\(got 3\)",
    ):
        load_pretrain_config([random_init], ["train.epochs=3"])
    simsiam = RECIPES / "simsiam_synthetic_r18.yaml"
    with pytest.raises(ConfigError, match="only method.name=supervised trains on"):
        load_pretrain_config([simsiam], ["augment.pipeline=classification"])
    with pytest.raises(
        ConfigError,
        match=r"'supervisd' \(did you mean 'supervised'\?\).*"
        r"baselines: random-init, supervised",
    ):
        load_pretrain_config([random_init], ["method.name=supervisd"])


def test_supervised_loss_is_cross_entropy_over_every_view():
    torch.manual_seed(0)
    method = Supervised(TinyBackbone(), SupervisedConfig(), num_classes=5).double()
    views = [torch.randn(7, 3, 4, 4, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    out = method(views, labels)
    # Independently: the negative log-likelihood of each label under a softmax, by logsumexp.
    nll = []
    for v in views:
        logits = method.classifier(method.backbone(v))
        nll.append((logits.logsumexp(1) - logits[torch.arange(7), labels]).mean())
    assert torch.allclose(out["loss"], torch.stack(nll).mean(), rtol=1e-12)
    assert torch.allclose(
        out["loss"],
        F.cross_entropy(method.classifier(method.backbone(torch.cat(views))), labels.repeat(2)),
        rtol=1e-12,
    )  # equal-sized views
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    z1, z2 = out["embeddings"]
    assert z1.shape == z2.shape == (7, TinyBackbone.feature_dim)
    one = method(views[:1], labels)
    assert one["embeddings"][1] is None  # one view: no positive pair to compare


def test_classification_views_are_one_seeded_crop_and_flip():
    from PIL import Image

    image = Image.new("RGB", (40, 30))
    image.paste((250, 10, 10), (0, 0, 20, 30))  # left half red: a flip is visible
    views = classification_views(16)
    first = views(image, seed=3)
    assert len(first) == 1 and first[0].shape == (3, 16, 16)
    assert torch.equal(views(image, seed=3)[0], first[0])
    assert any(not torch.equal(views(image, seed=s)[0], first[0]) for s in range(4, 10))


@pytest.mark.integration
def test_random_init_writes_the_engines_initial_weights(shapes_root, tmp_path):
    recipe = str(RECIPES / "random_init_synthetic_r18.yaml")
    sslbench(
        "pretrain",
        recipe,
        *tiny_data_overrides(shapes_root),
        "run.seed=3",
        f"run.output_dir={tmp_path}",
        "run.name=floor",
        cwd=tmp_path,
    )
    backbone, manifest = load_backbone(tmp_path / "floor")
    assert manifest["method"] == "random-init"
    assert manifest["epochs"] == manifest["steps"] == 0
    torch.manual_seed(3)  # what the engine does before it builds the network
    initial = build_backbone(manifest["arch"], **manifest["arch_kwargs"]).state_dict()
    assert initial.keys() == backbone.state_dict().keys()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, initial[key]), key


@pytest.mark.integration
def test_supervised_trains_on_the_labels_and_beats_random_init(
    shapes_root, knn_shapes_root, tmp_path
):
    recipe = str(RECIPES / "supervised_synthetic_r18.yaml")
    sslbench(
        "pretrain",
        recipe,
        *tiny_data_overrides(shapes_root),
        "optim.batch_size=64",
        "train.epochs=10",
        f"run.output_dir={tmp_path}",
        "run.name=ceiling",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "ceiling"
    backbone, manifest = load_backbone(run_dir)
    assert manifest["method"] == "supervised" and manifest["steps"] == 10 * (512 // 64)
    assert (run_dir / "spectrum.png").is_file() and "pos_cos" in manifest["diagnostics"]
    rows = (run_dir / "train.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "loss", "top1"]
    torch.manual_seed(0)
    random_init = build_backbone(manifest["arch"], **manifest["arch_kwargs"])
    knn = paired_knn(backbone, random_init, knn_shapes_root)
    print(knn)
    assert knn.trained > knn.random and knn.z > 2, knn


@pytest.mark.parametrize("pipeline", ["default", "quick", "imagenet_r50"])
def test_shipped_pipelines_carry_both_baselines(pipeline):
    entries = yaml.safe_load((ROOT / "configs" / "pipeline" / f"{pipeline}.yaml").read_text())
    recipes = entries["pretrain"]["recipes"]
    scale = "imagenet_r50" if pipeline == "imagenet_r50" else "synthetic_r18"
    assert recipes["random_init"]["config"] == f"configs/pretrain/random_init_{scale}.yaml"
    assert recipes["supervised"]["config"] == f"configs/pretrain/supervised_{scale}.yaml"
    # the floor trains no step, whatever the pipeline gives every recipe
    assert recipes["random_init"]["overrides"]["train"]["epochs"] == 0
