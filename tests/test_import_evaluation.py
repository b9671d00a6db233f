"""An imported checkpoint is a normal artifact: every classification evaluator runs on it
unchanged, a ViT included, with the normalisation and readout its manifest records."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import ROOT, TINY_SHAPES, sslbench
from safetensors import safe_open
from safetensors.torch import save_file

from sslbench.results import load_records

TINY_VIT = [
    "--arch",
    "vit_tiny_patch16_224",
    "--arch-arg",
    "img_size=16",
    "--arch-arg",
    "patch_size=4",
]


def overrides(root) -> list[str]:
    opts = ", ".join(f"{k}: {v}" for k, v in TINY_SHAPES.items())
    return [
        f"data.root={root}",
        f"data.options={{{opts}}}",
        "data.image_size=16",
        "run.progress=false",
        "run.threads=1",
    ]


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A timm ViT-Tiny for 16-pixel images with 4-pixel patches, as timm's hub stores it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.integration
def test_every_classification_evaluator_runs_on_an_imported_vit(timm_file, shapes_root, tmp_path):
    sslbench(
        "import",
        "timm",
        str(timm_file),
        *TINY_VIT,
        "--method",
        "supervised",
        "--mean",
        "0.5",
        "0.5",
        "0.5",
        "--std",
        "0.25",
        "0.25",
        "0.25",
        "--out",
        str(tmp_path / "vit"),
        cwd=tmp_path,
    )
    out = tmp_path / "results"
    args = ["--backbone", str(tmp_path / "vit"), "--out", str(out), *overrides(shapes_root)]
    sslbench("eval", "knn", *args, cwd=tmp_path)
    sslbench("eval", "linear", *args, cwd=tmp_path)
    sslbench(
        "eval",
        "linear",
        *args,
        "probe.name=standard",
        "probe.epochs=1",
        "probe.batch_size=64",
        cwd=tmp_path,
    )
    sslbench("eval", "semisup", *args, "semisup.epochs=1", "semisup.fraction=0.25", cwd=tmp_path)
    records, errors = load_records(out)
    assert errors == [] and len(records) == 4
    for record in records:
        assert record.protocol["readout"] == {"pool": "token"}
        assert record.backbone.arch == "vit_tiny_patch16_224"
        assert record.backbone.method == "supervised" and 0 <= record.metrics["top1"] <= 100
    # The features were extracted with the manifest's normalisation, not ImageNet's.
    cached = sorted((out / ".feature_cache").glob("*.safetensors"))
    assert cached
    for path in cached:
        with safe_open(str(path), "pt") as f:
            key = json.loads(f.metadata()["key"])
        assert "Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))" in key["transform"]
        assert key["readout"] == {"pool": "token"}


@pytest.mark.integration
def test_the_same_weights_read_out_otherwise_are_another_protocol(timm_file, shapes_root, tmp_path):
    """CLS token and patch mean of one checkpoint: two records, two feature-cache entries."""
    out = tmp_path / "results"
    for pool in ("token", "avg"):
        run_dir = tmp_path / pool
        sslbench(
            "import",
            "timm",
            str(timm_file),
            *TINY_VIT,
            "--arch-arg",
            f"pool={pool}",
            "--method",
            "supervised",
            "--out",
            str(run_dir),
            cwd=tmp_path,
        )
        sslbench(
            "eval",
            "knn",
            "--config",
            str(ROOT / "configs/eval/knn.yaml"),
            "--backbone",
            str(run_dir),
            "--out",
            str(out),
            *overrides(shapes_root),
            cwd=tmp_path,
        )
    records, errors = load_records(out)
    assert errors == [] and len(records) == 2
    by_pool = {r.protocol["readout"]["pool"]: r for r in records}
    assert by_pool["token"].backbone.weights_sha256 == by_pool["avg"].backbone.weights_sha256
    assert by_pool["token"].protocol_id != by_pool["avg"].protocol_id
    assert len(list((out / ".feature_cache").glob("*.safetensors"))) == 6  # 3 splits x 2
