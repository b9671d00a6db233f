"""`sslbench export`: detectron2 and torchvision checkpoints of a backbone artifact."""

import pickle

import numpy as np
import pytest
import torch
import torchvision
from helpers import sslbench

from sslbench.artifact import load_backbone, save_backbone
from sslbench.backbones import build_backbone
from transfer.export import export_backbone

BN = ("weight", "bias", "running_mean", "running_var")


def expected_detectron2_resnet50_keys() -> list[str]:
    """detectron2's names for a ResNet-50, written from its naming rules: stem.conv1 (+ .norm),
    res2..res5 with [3, 4, 6, 3] blocks of conv1..conv3 (+ .norm), and a shortcut conv (+ .norm)
    in each stage's first block."""
    keys = ["stem.conv1.weight", *(f"stem.conv1.norm.{p}" for p in BN)]
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        for block in range(blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
            for conv in convs:
                prefix = f"res{stage}.{block}.{conv}"
                keys += [f"{prefix}.weight", *(f"{prefix}.norm.{p}" for p in BN)]
    return keys


def _artifact(tmp_path, arch="resnet50", **kwargs):
    torch.manual_seed(0)
    backbone = build_backbone(arch, **kwargs)
    with torch.no_grad():  # non-trivial BN statistics, so equality means something
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    run_dir = tmp_path / f"{arch}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}"
    save_backbone(run_dir, backbone, arch=arch, arch_kwargs=kwargs, method="random-init")
    return run_dir


def test_detectron2_export_has_detectron2_names_and_the_same_bits(tmp_path):
    run_dir = _artifact(tmp_path)
    proc = sslbench("export", "--to", "detectron2", "--backbone", str(run_dir), cwd=tmp_path)
    path = run_dir / "backbone.detectron2.pkl"
    assert proc.stdout.strip() == str(path)
    with open(path, "rb") as f:
        blob = pickle.load(f)  # our own file, written by the line above
    assert blob["matching_heuristics"] is True and blob["__author__"] == "sslbench"
    model = blob["model"]
    expected = expected_detectron2_resnet50_keys()
    assert len(expected) == 265
    assert sorted(model) == sorted(expected)
    source = load_backbone(run_dir)[0].state_dict()
    pairs = {
        "stem.conv1.weight": "conv1.weight",
        "stem.conv1.norm.running_var": "bn1.running_var",
        "res2.0.conv3.norm.weight": "layer1.0.bn3.weight",
        "res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
        "res5.0.shortcut.norm.running_mean": "layer4.0.downsample.1.running_mean",
        "res4.5.conv2.weight": "layer3.5.conv2.weight",
    }
    for ours, theirs in pairs.items():
        assert np.array_equal(model[ours], source[theirs].numpy())
    for name, value in model.items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32, name
    # and every exported array is bit-equal to some source tensor (nothing converted or rounded)
    source_bytes = {v.numpy().tobytes() for v in source.values()}
    assert all(v.tobytes() in source_bytes for v in model.values())


def test_resnet18_detectron2_names_use_two_convs_per_block(tmp_path):
    path = export_backbone(_artifact(tmp_path, "resnet18"), "detectron2", tmp_path / "r18.pkl")
    with open(path, "rb") as f:
        model = pickle.load(f)["model"]
    assert "res2.1.conv2.norm.running_mean" in model and "res2.0.conv3.weight" not in model
    assert "res2.0.shortcut.weight" not in model  # 64 -> 64 channels, stride 1: identity
    assert "res3.0.shortcut.norm.bias" in model
    assert len(model) == 5 + 4 * 2 * 10 + 3 * 5


def test_torchvision_export_loads_into_torchvision_resnet50(tmp_path):
    run_dir = _artifact(tmp_path)
    out = tmp_path / "tv.pth"
    sslbench(
        "export", "--to", "torchvision", "--backbone", str(run_dir), "--out", str(out), cwd=tmp_path
    )
    state = torch.load(out, weights_only=True)
    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    source = load_backbone(run_dir)[0].state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source[key]), key


@pytest.mark.parametrize(
    "fmt,kwargs,message",
    [
        ("detectron2", {"stem": "small"}, "'small' stem has no counterpart in detectron2"),
        ("torchvision", {"width": 16}, "torchvision's ResNets have width 64"),
    ],
)
def test_a_backbone_the_target_cannot_hold_is_refused(tmp_path, fmt, kwargs, message):
    run_dir = _artifact(tmp_path, "resnet18", **kwargs)
    proc = sslbench("export", "--to", fmt, "--backbone", str(run_dir), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(run_dir.glob("backbone.*.p*"))


def test_any_torchvision_resnet_exports_by_its_facts(tmp_path):
    """Depth is read from the manifest, not from a table of two names: a ResNet-34 loads into
    torchvision's resnet34, and its detectron2 names stop at two convs per block."""
    run_dir = _artifact(tmp_path, "resnet34")
    state = torch.load(
        export_backbone(run_dir, "torchvision", tmp_path / "tv.pth"), weights_only=True
    )
    missing, unexpected = torchvision.models.resnet34().load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    with open(export_backbone(run_dir, "detectron2", tmp_path / "r34.pkl"), "rb") as f:
        model = pickle.load(f)["model"]  # our own file
    assert "res4.5.conv2.norm.running_var" in model and "res4.0.conv3.weight" not in model


def test_a_vit_is_refused_by_both_exports(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32)
    save_backbone(
        tmp_path / "vit",
        backbone,
        arch="vit_tiny_patch16_224",
        arch_kwargs={"img_size": 32},
        method="dino",
    )
    for fmt in ("detectron2", "torchvision"):
        proc = sslbench(
            "export", "--to", fmt, "--backbone", str(tmp_path / "vit"), cwd=tmp_path, check=False
        )
        assert (
            proc.returncode == 1
            and "only ResNets are supported (this backbone is a vit)" in proc.stderr
        )
