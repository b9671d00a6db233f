"""`sslbench import` refuses, with an error naming the thing, every file it cannot import
exactly, and runs nothing a file names."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torchvision
from helpers import sslbench

from sslbench.importers import CheckpointImportError, CheckpointReadError, import_checkpoint


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def r18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def moco_file(path, state=None, extra=None):
    """MoCo v2's layout (facebookresearch/moco) around a ResNet-18."""
    encoder = {f"module.encoder_q.{k}": v for k, v in (state or r18_state()).items()}
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {**encoder, **(extra or {})}}, path)
    return path


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "PWNED"
    if kind == "pickle":  # detectron2's .pkl goes through the restricted unpickler
        path = tmp_path / "model_final.pkl"
        path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": RunsCode(marker)}}))
    else:  # a torch.save file naming os.system among its objects
        path = tmp_path / "checkpoint.pth"
        torch.save({"state_dict": r18_state(), "args": RunsCode(marker)}, path)
    with pytest.raises(CheckpointReadError, match="refusing to .*system"):
        import_checkpoint("auto", path, arch="resnet18", out=tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_missing_tensor_is_named(tmp_path):
    state = r18_state()
    del state["layer3.1.bn2.running_var"]
    path = moco_file(tmp_path / "moco.pth.tar", state)
    with pytest.raises(
        CheckpointImportError,
        match=r"1 of resnet18's tensors .* state_dict\.module\.encoder_q\.layer3"
        r"\.1\.bn2\.running_var",
    ):
        import_checkpoint("moco", path, arch="resnet18", out=tmp_path / "run")


def test_wrong_arch_names_the_first_mismatching_tensor_and_both_shapes(tmp_path):
    torch.save(r18_state(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointImportError) as err:
        import_checkpoint(
            "torchvision", tmp_path / "resnet18.pth", arch="resnet50", out=tmp_path / "run"
        )
    assert (
        "layer1.0.conv1.weight has shape (64, 64, 3, 3), but resnet50 expects (64, 64, 1, 1)"
    ) in str(err.value)


def test_a_leftover_key_in_the_backbone_namespace_is_named(tmp_path):
    stray = "state_dict.module.encoder_q.layer4.2.conv1.weight"  # ResNet-18 has two blocks
    path = moco_file(
        tmp_path / "moco.pth.tar",
        extra={stray.removeprefix("state_dict."): torch.zeros(512, 512, 3, 3)},
    )
    with pytest.raises(CheckpointImportError, match=f"does not have: {stray}"):
        import_checkpoint("moco", path, arch="resnet18", out=tmp_path / "run")


def test_prefixes_are_removed_exactly(tmp_path):
    """str.lstrip("backbone.") would turn "backbone.conv1" into "v1"; a prefix that is not the
    namespace finds nothing."""
    state = {f"backbone.{k}": v for k, v in r18_state().items()}
    torch.save({"state_dict": state}, tmp_path / "x.ckpt")
    with pytest.raises(
        CheckpointImportError,
        match="100 of resnet18's tensors are not under 'state_dict.b', e.g. state_dict.bconv1",
    ):
        import_checkpoint(
            "solo-learn",
            tmp_path / "x.ckpt",
            arch="resnet18",
            out=tmp_path / "run",
            prefix="state_dict.b",
        )
    report = import_checkpoint(
        "auto",
        tmp_path / "x.ckpt",
        arch="resnet18",
        out=tmp_path / "run",
        prefix="state_dict.backbone.",
        method="simclr",
    )
    assert report.tensors == 120 and report.fmt == "prefix"


def test_unknown_format(tmp_path):
    torch.save(r18_state(), tmp_path / "r18.pth")
    with pytest.raises(
        CheckpointImportError,
        match="unknown checkpoint format 'moko' "
        r"\(did you mean 'moco'\?\)",
    ):
        import_checkpoint("moko", tmp_path / "r18.pth", arch="resnet18", out=tmp_path / "run")


def test_auto_on_an_ambiguous_file_lists_the_candidates(tmp_path):
    """MoCo's and DINO's layouts in one file, holding different weights."""
    moco = {f"module.encoder_q.{k}": v for k, v in r18_state(0).items()}
    dino = {f"backbone.{k}": v for k, v in r18_state(1).items()}
    torch.save({"state_dict": moco, "teacher": dino}, tmp_path / "both.pth")
    with pytest.raises(
        CheckpointImportError,
        match=r"ambiguous, it reads as moco \(state_dict\.module\.encoder_q\.\), "
        r"dino \(teacher\.backbone\.\)",
    ):
        import_checkpoint("auto", tmp_path / "both.pth", arch="resnet18", out=tmp_path / "run")


def test_a_format_with_no_backbone_where_it_keeps_one(tmp_path):
    torch.save(r18_state(), tmp_path / "resnet18.pth")
    with pytest.raises(
        CheckpointImportError, match="none of resnet18's tensors is where moco keeps a backbone"
    ):
        import_checkpoint("moco", tmp_path / "resnet18.pth", arch="resnet18", out=tmp_path / "run")


def test_resnet_only_formats_refuse_a_vit(tmp_path):
    torch.save({"model": {"stem.conv1.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(
        CheckpointImportError,
        match="the detectron2 format holds resnet backbones here; vit_tiny_patch16_224 is a vit",
    ):
        import_checkpoint(
            "detectron2",
            tmp_path / "x.pth",
            arch="vit_tiny_patch16_224",
            out=tmp_path / "run",
            prefix="model.",
        )


def test_an_existing_artifact_is_not_overwritten(tmp_path):
    torch.save(r18_state(), tmp_path / "resnet18.pth")
    import_checkpoint(
        "torchvision", tmp_path / "resnet18.pth", arch="resnet18", out=tmp_path / "run"
    )
    with pytest.raises(CheckpointImportError, match="already holds a backbone"):
        import_checkpoint(
            "torchvision", tmp_path / "resnet18.pth", arch="resnet18", out=tmp_path / "run"
        )


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    torch.save(r18_state(), tmp_path / "resnet18.pth")
    proc = sslbench(
        "import",
        "torchvision",
        str(tmp_path / "resnet18.pth"),
        "--arch",
        "resnet50",
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("sslbench import: error:") and "resnet50 expects" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_momentum_copy_is_not_mistaken_for_the_backbone(tmp_path):
    """The query encoder is imported, not the key encoder beside it."""
    query, key = r18_state(0), r18_state(1)
    extra = {f"module.encoder_k.{k}": v for k, v in key.items()}
    path = moco_file(tmp_path / "moco.pth.tar", copy.deepcopy(query), extra)
    import_checkpoint("moco", path, arch="resnet18", out=tmp_path / "run")
    from sslbench.artifact import load_backbone

    loaded = load_backbone(tmp_path / "run")[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in query.items() if not k.startswith("fc."))
