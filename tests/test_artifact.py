"""The backbone artifact: round trip, and refusal of tampered, mismatched or pickled inputs."""

import json
import os
import pickle

import pytest
import torch

from sslbench.artifact import (
    ArtifactError,
    input_normalization,
    load_backbone,
    read_manifest,
    save_backbone,
)
from sslbench.backbones import build_backbone
from sslbench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _save(run_dir, arch="resnet18", stem="small"):
    torch.manual_seed(0)
    model = build_backbone(arch, stem=stem)
    save_backbone(
        run_dir,
        model,
        arch=arch,
        arch_kwargs={"stem": stem},
        method="test",
        config={"x": 1},
        seed=0,
    )
    return model


def test_round_trip_rebuilds_from_manifest_alone(tmp_path):
    model = _save(tmp_path)
    loaded, manifest = load_backbone(tmp_path)
    assert manifest["feature_dim"] == 512 and manifest["arch"] == "resnet18"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_tampered_weights_are_refused(tmp_path):
    _save(tmp_path)
    weights = tmp_path / "backbone.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_backbone(tmp_path)


def test_wrong_architecture_is_refused(tmp_path):
    _save(tmp_path)
    manifest = json.loads((tmp_path / "backbone.json").read_text())
    manifest["arch"] = "resnet50"
    (tmp_path / "backbone.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="architecture mismatch"):
        load_backbone(tmp_path)


def test_task_requiring_another_architecture_is_refused(tmp_path):
    _save(tmp_path)
    with pytest.raises(ArtifactError, match="needs resnet50"):
        load_backbone(tmp_path, expected_arch="resnet50")


def test_missing_or_unfinished_run_dir(tmp_path):
    with pytest.raises(ArtifactError, match="expected a run directory"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="did pretraining complete"):
        read_manifest(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"method": _RunsCode()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_round_trip(tmp_path):
    state = {"step": 7, "method": {"w": torch.arange(3.0)}, "config_hash": "abc"}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["method"]["w"], torch.arange(3.0))


def test_format_1_manifest_still_loads_with_facts_and_imagenet_normalisation(tmp_path):
    """A manifest written before "structure" and "normalize" existed (format version 1)."""
    model = _save(tmp_path, "resnet50")
    written = json.loads((tmp_path / "backbone.json").read_text())
    old = {k: v for k, v in written.items() if k not in ("structure", "normalize")}
    (tmp_path / "backbone.json").write_text(json.dumps({**old, "format_version": 1}))
    loaded, manifest = load_backbone(tmp_path)
    assert manifest["structure"] == written["structure"]
    assert manifest["structure"]["stages"][3] == {"module": "layer4", "channels": 2048, "stride": 8}
    assert manifest["normalize"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert input_normalization(old) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_vit_round_trip_keeps_its_readout_and_normalisation(tmp_path):
    torch.manual_seed(0)
    kwargs = {"pool": "avg", "img_size": 32, "patch_size": 8}
    model = build_backbone("vit_tiny_patch16_224", **kwargs).eval()
    save_backbone(
        tmp_path,
        model,
        arch="vit_tiny_patch16_224",
        arch_kwargs=kwargs,
        method="dino",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    loaded, manifest = load_backbone(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert manifest["structure"]["pool"] == "avg" and manifest["feature_dim"] == 192
    assert input_normalization(manifest) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_unknown_architecture_is_named(tmp_path):
    _save(tmp_path)
    manifest = json.loads((tmp_path / "backbone.json").read_text())
    manifest["arch"] = "timm:resnet5O"
    (tmp_path / "backbone.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unknown timm model 'resnet5O'"):
        read_manifest(tmp_path)
