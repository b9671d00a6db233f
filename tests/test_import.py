"""`sslbench import`: each source's checkpoint, laid out as its own saving code writes it, becomes
an artifact whose features equal the source model's own forward on the same images.

The source models are the real ones where they install (torchvision, timm); for the others the
containers and key names follow the source's code (sslbench/importers/formats.py cites it):
DINO's ViT is timm's ViT with DINO's arguments, MoCo v3's is timm's with 12 heads, and every
ResNet codebase wraps torchvision's ResNet.
"""

from __future__ import annotations

import argparse
import copy
import pickle

import pytest
import timm
import torch
import torchvision
from helpers import sslbench
from safetensors.torch import save_file
from torch import nn

from sslbench.artifact import load_backbone, read_manifest
from sslbench.importers import import_checkpoint, read_checkpoint
from sslbench.importers.importing import detect, flatten, present_paths
from transfer.export import export_backbone

TOL = 1e-5


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """The model with every parameter and BatchNorm statistic moved off its initial value (so
    equal features mean every tensor arrived), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=gen) * 0.05
                tensor.copy_(tensor.abs() + 0.5 if name.endswith("running_var") else tensor + noise)
    return model.eval()


def resnet(arch: str = "resnet50", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(getattr(torchvision.models, arch)(), seed)


def vit(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(timm.create_model(name, pretrained=False, **kwargs), seed)


def mlp(dims: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers)


class Wrap(nn.Module):
    """A container with named children, as the sources' method modules and DDP's `module`."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


@torch.no_grad()
def resnet_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward up to the pooled features (the fc slot bypassed)."""
    trunk = copy.copy(model)
    trunk.fc = nn.Identity()
    return trunk.eval()(x)


@torch.no_grad()
def vit_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own pre-logits feature: the final-normed CLS token."""
    return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def imported_features(run_dir, x: torch.Tensor) -> torch.Tensor:
    backbone, _ = load_backbone(run_dir)
    with torch.no_grad():
        return backbone.eval()(x)


def images(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def detected(path, arch: str, **arch_kwargs) -> str:
    """What `auto` makes of the file (without writing an artifact)."""
    from sslbench.backbones import build_backbone

    obj = read_checkpoint(path)
    fmt, _, _ = detect(
        flatten(obj), present_paths(obj), build_backbone(arch, **arch_kwargs), str(path)
    )
    return fmt.name


def check(run_dir, expected: torch.Tensor, x: torch.Tensor) -> dict:
    torch.testing.assert_close(imported_features(run_dir, x), expected, atol=TOL, rtol=0)
    return read_manifest(run_dir)


def test_torchvision_resnet18(tmp_path):
    model = resnet("resnet18")
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    report = import_checkpoint(
        "torchvision", tmp_path / "resnet18.pth", arch="resnet18", out=tmp_path / "run"
    )
    x = images(32)
    manifest = check(tmp_path / "run", resnet_features(model, x), x)
    assert report.dropped == {"classifier (fc)": 2} and report.method == "supervised"
    assert manifest["imported"] is True and manifest["method"] == "supervised"
    assert manifest["source"]["format"] == "torchvision"
    assert manifest["source"]["file"] == "resnet18.pth" and len(manifest["source"]["sha256"]) == 64
    assert manifest["normalize"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _moco_v2(tmp_path, arch="resnet50", legacy=False):
    """facebookresearch/moco main_moco.py: {'epoch', 'arch', 'state_dict': DDP(MoCo), 'optimizer'};
    MoCo v2's encoder has the MLP projection in its fc (fc.0, fc.2), the queue is a buffer."""
    query = resnet(arch)
    dim = query.fc.in_features
    query.fc = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 128))
    moco = Wrap(encoder_q=query, encoder_k=copy.deepcopy(query))
    moco.register_buffer("queue", torch.randn(128, 4096))
    moco.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    ddp = Wrap(module=moco)
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(
        {
            "epoch": 200,
            "arch": arch,
            "state_dict": ddp.state_dict(),
            "optimizer": torch.optim.SGD(ddp.parameters(), lr=0.03).state_dict(),
        },
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    return path, query


def test_moco_v2_resnet50(tmp_path):
    path, query = _moco_v2(tmp_path)
    report = import_checkpoint("moco", path, arch="resnet50", out=tmp_path / "run")
    x = images(32)
    manifest = check(tmp_path / "run", resnet_features(query, x), x)
    assert report.method == "mocov2" and report.namespace == "state_dict.module.encoder_q."
    assert manifest["source"]["dropped"] == {
        "momentum encoder": 322,
        "projector (state_dict.module.encoder_q.fc)": 4,
        "queue": 2,
    }
    assert detected(path, "resnet50") == "moco"


def test_moco_v2_legacy_file_as_released(tmp_path):
    """MoCo's released weights were written by torch 1.4, before the zip format."""
    path, query = _moco_v2(tmp_path, "resnet18", legacy=True)
    assert not path.read_bytes().startswith(b"PK")
    import_checkpoint("moco", path, arch="resnet18", out=tmp_path / "run")
    x = images(32)
    check(tmp_path / "run", resnet_features(query, x), x)


def _moco_v3(base: nn.Module, slot: str, dim: int) -> Wrap:
    """moco-v3 moco/builder.py: the encoder's fc (ResNet) / head (ViT) becomes the projector;
    a momentum encoder and a predictor beside it, inside DDP."""
    setattr(base, slot, mlp([dim, 64, 32]))
    moco = Wrap(
        base_encoder=base, momentum_encoder=copy.deepcopy(base), predictor=mlp([32, 64, 32])
    )
    return Wrap(module=moco)


def _save_moco_v3(ddp: nn.Module, path):
    torch.save(
        {
            "epoch": 300,
            "arch": "x",
            "state_dict": ddp.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 65536.0},
        },
        path,
    )


def test_moco_v3_resnet50(tmp_path):
    base = resnet("resnet50")
    x = images(32)
    expected = resnet_features(base, x)
    _save_moco_v3(_moco_v3(base, "fc", 2048), tmp_path / "r50.pth.tar")
    report = import_checkpoint(
        "moco", tmp_path / "r50.pth.tar", arch="resnet50", out=tmp_path / "run"
    )
    check(tmp_path / "run", expected, x)
    assert report.method == "mocov3" and report.variant == "MoCo v3"
    assert set(report.dropped) == {
        "momentum encoder",
        "predictor",
        "projector (state_dict.module.base_encoder.fc)",
    }


def test_moco_v3_vit_small_keeps_its_twelve_heads(tmp_path):
    """moco-v3's vit_small has 12 heads (timm's: 6); the weights cannot tell, the layout does."""
    base = vit("vit_small_patch16_224", num_heads=12, img_size=32)
    x = images(32)
    expected = vit_features(base, x)
    _save_moco_v3(_moco_v3(base, "head", 384), tmp_path / "vit-s.pth.tar")
    import_checkpoint(
        "moco",
        tmp_path / "vit-s.pth.tar",
        arch="vit_small_patch16_224",
        arch_kwargs={"img_size": 32},
        out=tmp_path / "run",
    )
    manifest = check(tmp_path / "run", expected, x)
    assert manifest["arch_kwargs"] == {"img_size": 32, "num_heads": 12}
    assert manifest["structure"]["num_heads"] == 12 and manifest["method"] == "mocov3"


def _dino(
    student_backbone: nn.Module, teacher_backbone: nn.Module, dim: int, ddp_teacher: bool
) -> dict:
    """facebookresearch/dino main_dino.py: MultiCropWrapper(backbone with fc and head set to
    Identity, DINOHead) for both; the student in DDP, the teacher too when it has BatchNorm."""

    def wrapped(backbone):
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        last_layer = Wrap()  # nn.utils.weight_norm's parameters, as DINOHead saves them
        last_layer.weight_g = nn.Parameter(torch.ones(96, 1))
        last_layer.weight_v = nn.Parameter(torch.randn(96, 32))
        return Wrap(backbone=backbone, head=Wrap(mlp=mlp([dim, 64, 32]), last_layer=last_layer))

    student = Wrap(module=wrapped(student_backbone))
    teacher = wrapped(teacher_backbone)
    teacher = Wrap(module=teacher) if ddp_teacher else teacher
    return {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=96),
        "dino_loss": {"center": torch.zeros(1, 96)},
    }


def test_dino_resnet50_takes_the_teacher(tmp_path):
    teacher, student = resnet("resnet50", seed=0), resnet("resnet50", seed=1)
    x = images(32)
    expected = resnet_features(teacher, x)
    checkpoint = _dino(student, teacher, 2048, ddp_teacher=True)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    report = import_checkpoint(
        "dino", tmp_path / "checkpoint.pth", arch="resnet50", out=tmp_path / "run"
    )
    check(tmp_path / "run", expected, x)
    assert report.namespace == "teacher.module.backbone." and report.method == "dino"
    head = [k for k in checkpoint["teacher"] if k.startswith("module.head.")]
    assert report.dropped == {
        "student": len(checkpoint["student"]),
        "DINO head": len(head),
        "DINO loss center": 1,
    }
    assert detected(tmp_path / "checkpoint.pth", "resnet50") == "dino"


def test_dino_vit_tiny_teacher(tmp_path):
    teacher = vit("vit_tiny_patch16_224", seed=0)
    student = vit("vit_tiny_patch16_224", seed=1)
    x = images(224)
    expected = vit_features(teacher, x)
    torch.save(_dino(student, teacher, 192, ddp_teacher=False), tmp_path / "checkpoint.pth")
    report = import_checkpoint(
        "dino", tmp_path / "checkpoint.pth", arch="vit_tiny_patch16_224", out=tmp_path / "run"
    )
    check(tmp_path / "run", expected, x)
    assert report.namespace == "teacher.backbone."


def test_solo_learn_resnet50(tmp_path):
    """solo-learn: a Lightning checkpoint of BaseMomentumMethod (solo/methods/base.py)."""
    backbone = resnet("resnet50")
    backbone.fc = nn.Identity()  # solo-learn's BaseMethod does this
    x = images(32)
    expected = backbone(x).detach()
    method = Wrap(
        backbone=backbone,
        projector=mlp([2048, 64, 32]),
        predictor=mlp([32, 64, 32]),
        classifier=nn.Linear(2048, 10),
        momentum_backbone=copy.deepcopy(backbone),
        momentum_projector=mlp([2048, 64, 32]),
    )
    torch.save(
        {
            "epoch": 399,
            "global_step": 1000,
            "pytorch-lightning_version": "2.0.2",
            "state_dict": method.state_dict(),
            "loops": {},
            "callbacks": {},
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [],
        },
        tmp_path / "byol.ckpt",
    )
    with pytest.raises(ValueError, match="give --method"):
        import_checkpoint(
            "solo-learn", tmp_path / "byol.ckpt", arch="resnet50", out=tmp_path / "run"
        )
    report = import_checkpoint(
        "solo-learn", tmp_path / "byol.ckpt", arch="resnet50", out=tmp_path / "run", method="byol"
    )
    check(tmp_path / "run", expected, x)
    assert not report.method_inferred and report.dropped["online classifier"] == 2
    assert detected(tmp_path / "byol.ckpt", "resnet50") == "solo-learn"


def test_vissl_resnet50(tmp_path):
    """vissl: the consolidated checkpoint of log_hooks.py / checkpoint.py; the ResNe(X)t trunk's
    `_feature_blocks` ModuleDict holds torchvision's modules under their names."""
    model = resnet("resnet50")
    x = images(32)
    expected = resnet_features(model, x)
    blocks = nn.ModuleDict(
        {
            name: getattr(model, name)
            for name in (
                "conv1",
                "bn1",
                "relu",
                "maxpool",
                "layer1",
                "layer2",
                "layer3",
                "layer4",
                "avgpool",
            )
        }
    )
    trunk = Wrap(_feature_blocks=blocks).state_dict()
    heads = nn.ModuleList([Wrap(clf=mlp([2048, 64, 32]))]).state_dict()
    checkpoint = {
        "phase_idx": 9,
        "iteration": 500,
        "loss": {},
        "iteration_num": 500,
        "train_phase_idx": 4,
        "type": "consolidated",
        "classy_state_dict": {
            "train": True,
            "base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {}},
            "optimizer": {},
            "phase_idx": 9,
            "num_updates": 500,
        },
    }
    torch.save(checkpoint, tmp_path / "model_final_checkpoint_phase99.torch")
    report = import_checkpoint(
        "vissl",
        tmp_path / "model_final_checkpoint_phase99.torch",
        arch="resnet50",
        out=tmp_path / "run",
        method="simclr",
    )
    check(tmp_path / "run", expected, x)
    assert report.dropped == {"heads": len(heads)}
    assert detected(tmp_path / "model_final_checkpoint_phase99.torch", "resnet50") == "vissl"


def moco_to_detectron2(state: dict[str, torch.Tensor]) -> dict:
    """What MoCo's detection/convert-pretrain-to-detectron2.py writes, by its own string rules:
    every key outside the stages gets "stem." (the projection head too), layerN -> res(N+1),
    bnK -> convK.norm, downsample.0/1 -> shortcut / shortcut.norm; counters kept."""
    model = {}
    for key, value in state.items():
        key = key.removeprefix("module.encoder_q.")
        if "layer" not in key:
            key = "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[key] = value.numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def test_detectron2_resnet50_as_moco_converts_it(tmp_path):
    path, query = _moco_v2(tmp_path)
    state = {
        k: v
        for k, v in torch.load(path, weights_only=True)["state_dict"].items()
        if k.startswith("module.encoder_q.")
    }
    with open(tmp_path / "moco.pkl", "wb") as f:
        pickle.dump(moco_to_detectron2(state), f)
    report = import_checkpoint(
        "detectron2", tmp_path / "moco.pkl", arch="resnet50", out=tmp_path / "run", method="mocov2"
    )
    x = images(32)
    check(tmp_path / "run", resnet_features(query, x), x)
    assert report.dropped == {"classifier (model.fc)": 4} and report.filled == 0
    assert detected(tmp_path / "moco.pkl", "resnet50") == "detectron2"


def test_export_to_detectron2_then_import_is_bit_identical(tmp_path):
    from sslbench.artifact import save_backbone
    from sslbench.backbones import build_backbone

    torch.manual_seed(0)
    source = perturbed(build_backbone("resnet50"))
    save_backbone(tmp_path / "src", source, arch="resnet50", arch_kwargs={}, method="simsiam")
    pkl = export_backbone(tmp_path / "src", "detectron2", tmp_path / "r50.pkl")
    report = import_checkpoint(
        "detectron2", pkl, arch="resnet50", out=tmp_path / "back", method="simsiam"
    )
    back = load_backbone(tmp_path / "back")[0].state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(back[key], value) and back[key].dtype == value.dtype, key
    counters = [k for k in back if k.endswith("num_batches_tracked")]
    assert report.filled == len(counters) == 53  # the exporter leaves them out; 0 both sides


def test_lightly_sequential_resnet18(tmp_path):
    """lightly's tutorials: backbone = nn.Sequential(*list(resnet.children())[:-1]) inside a
    model with a projection head; torch.save(model.state_dict())."""
    model = resnet("resnet18")
    x = images(32)
    expected = resnet_features(model, x)
    simclr = Wrap(
        backbone=nn.Sequential(*list(model.children())[:-1]),
        projection_head=Wrap(layers=mlp([512, 64, 32])),
    )
    torch.save(simclr.state_dict(), tmp_path / "simclr.pth")
    report = import_checkpoint(
        "lightly", tmp_path / "simclr.pth", arch="resnet18", out=tmp_path / "run", method="simclr"
    )
    check(tmp_path / "run", expected, x)
    assert report.dropped == {"projector": len(simclr.projection_head.state_dict())}
    assert detected(tmp_path / "simclr.pth", "resnet18") == "lightly"


def test_mmpretrain_resnet18(tmp_path):
    """mmengine's checkpoint of an mmpretrain self-supervisor: backbone (torchvision names in
    'pytorch' style), neck, head."""
    model = resnet("resnet18")
    x = images(32)
    expected = resnet_features(model, x)
    model.fc = nn.Identity()
    selfsup = Wrap(backbone=model, neck=Wrap(mlp=mlp([512, 64, 32])), head=Wrap())
    torch.save(
        {
            "meta": {
                "epoch": 200,
                "iter": 1000,
                "mmengine_version": "0.10.3",
                "seed": 0,
                "time": "20240101_000000",
            },
            "state_dict": selfsup.state_dict(),
            "message_hub": {"log_scalars": {}},
            "optimizer": {"state": {}, "param_groups": []},
        },
        tmp_path / "epoch_200.pth",
    )
    report = import_checkpoint(
        "mmselfsup",
        tmp_path / "epoch_200.pth",
        arch="resnet18",
        out=tmp_path / "run",
        method="mocov2",
    )
    check(tmp_path / "run", expected, x)
    assert report.fmt == "mmpretrain"
    assert report.dropped == {"neck (projector)": len(selfsup.neck.state_dict())}
    assert detected(tmp_path / "epoch_200.pth", "resnet18") == "mmpretrain"


class MMPretrainViT(nn.Module):
    """mmpretrain's VisionTransformer (out_type "cls_token", final_norm, no layer scale), written
    from its code with its module names: mmcv's PatchEmbed `projection`, layers of ln1 / attn
    (qkv, proj) / ln2 / mmcv's FFN (layers.0.0 and layers.1), the final norm `ln1`."""

    def __init__(
        self, dims: int = 192, depth: int = 2, heads: int = 3, patch: int = 8, grid: int = 4
    ):
        super().__init__()
        self.heads = heads
        self.patch_embed = Wrap(projection=nn.Conv2d(3, dims, patch, patch))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dims) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dims) * 0.02)
        self.layers = nn.ModuleList(
            Wrap(
                ln1=nn.LayerNorm(dims, eps=1e-6),
                attn=Wrap(qkv=nn.Linear(dims, 3 * dims), proj=nn.Linear(dims, dims)),
                ln2=nn.LayerNorm(dims, eps=1e-6),
                ffn=Wrap(
                    layers=nn.Sequential(
                        nn.Sequential(nn.Linear(dims, 4 * dims), nn.GELU(), nn.Dropout(0.0)),
                        nn.Linear(4 * dims, dims),
                        nn.Dropout(0.0),
                    )
                ),
            )
            for _ in range(depth)
        )
        self.ln1 = nn.LayerNorm(dims, eps=1e-6)

    def attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5
        return attn.proj((weights.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.projection(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = x + self.attention(layer.attn, layer.ln1(x))
            x = x + layer.ffn.layers(layer.ln2(x))
        return self.ln1(x)[:, 0]


def test_mmpretrain_vit_is_renamed_to_timms(tmp_path):
    torch.manual_seed(0)
    backbone = perturbed(MMPretrainViT())
    x = images(32)
    with torch.no_grad():
        expected = backbone(x)
    selfsup = Wrap(backbone=backbone, neck=Wrap(mlp=mlp([192, 64, 32])))
    torch.save(
        {"meta": {"epoch": 100}, "state_dict": selfsup.state_dict()}, tmp_path / "epoch_100.pth"
    )
    report = import_checkpoint(
        "mmpretrain",
        tmp_path / "epoch_100.pth",
        arch="vit_tiny_patch16_224",
        arch_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
        out=tmp_path / "run",
        method="mocov3",
    )
    check(tmp_path / "run", expected, x)
    assert report.tensors == len(backbone.state_dict())


@pytest.mark.parametrize("layout", ["plain", "safetensors", "train-checkpoint"])
def test_timm_vit(tmp_path, layout):
    """timm: the hub's bare state dict / safetensors, or train.py's checkpoint, whose EMA copy
    timm's own load_state_dict prefers."""
    model = vit("vit_tiny_patch16_224", img_size=32)
    x = images(32)
    if layout == "plain":
        path = tmp_path / "model.pth"
        torch.save(model.state_dict(), path)
    elif layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        ema = perturbed(copy.deepcopy(model), seed=5)
        path = tmp_path / "last.pth.tar"
        torch.save(
            {
                "epoch": 9,
                "arch": "vit_tiny_patch16_224",
                "state_dict": model.state_dict(),
                "optimizer": {"state": {}, "param_groups": []},
                "version": 2,
                "args": argparse.Namespace(model="vit_tiny_patch16_224"),
                "metric": 1.0,
                "state_dict_ema": ema.state_dict(),
            },
            path,
        )
        model = ema
    report = import_checkpoint(
        "timm",
        path,
        arch="vit_tiny_patch16_224",
        arch_kwargs={"img_size": 32},
        out=tmp_path / "run",
        method="supervised",
    )
    check(tmp_path / "run", vit_features(model, x), x)
    assert report.dropped[f"classifier ({report.namespace}head)"] == 2
    if layout == "train-checkpoint":
        assert report.namespace == "state_dict_ema." and report.dropped["state_dict"] == 152


def test_auto_on_a_bare_resnet_names_the_equal_readings_and_needs_the_method(tmp_path):
    torch.save(resnet("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="give --method"):
        import_checkpoint("auto", tmp_path / "r18.pth", arch="resnet18", out=tmp_path / "run")
    report = import_checkpoint(
        "auto", tmp_path / "r18.pth", arch="resnet18", out=tmp_path / "run", method="supervised"
    )
    assert report.fmt == "torchvision" and "timm" in report.auto and "dino" in report.auto


def test_cli_prints_what_it_kept_and_dropped(tmp_path):
    path, _ = _moco_v2(tmp_path, "resnet18")
    proc = sslbench(
        "import",
        "auto",
        str(path),
        "--arch",
        "resnet18",
        "--out",
        str(tmp_path / "run"),
        "--mean",
        "0",
        "0",
        "0",
        "--std",
        "1",
        "1",
        "1",
        cwd=tmp_path,
    )
    assert "format: moco (MoCo v1/v2)" in proc.stdout and "method: mocov2 (inferred)" in proc.stdout
    assert "momentum encoder (124)" in proc.stdout and "queue (2)" in proc.stdout
    manifest = read_manifest(tmp_path / "run")
    assert manifest["normalize"] == {"mean": [0, 0, 0], "std": [1, 1, 1]}
    assert manifest["feature_dim"] == 512 and manifest["source"]["method"] == "inferred"
