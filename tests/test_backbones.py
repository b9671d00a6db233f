import pytest
import timm
import torch
import torchvision
from method_checks import SMALL

from sslbench.artifact import load_backbone, save_backbone
from sslbench.backbones import build_backbone


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_default_width_is_torchvision_resnet(arch):
    """Same parameter names and shapes as torchvision's model, so its weights load as they are."""
    ours = build_backbone(arch).state_dict()
    ref = {
        k: v
        for k, v in getattr(torchvision.models, arch)().state_dict().items()
        if not k.startswith("fc.")
    }
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("stem,size,spatial", [("small", 16, 2), ("imagenet", 64, 2)])
def test_narrow_resnet_scales_every_stage(stem, size, spatial):
    net = build_backbone("resnet18", stem=stem, width=16)
    assert net.feature_dim == 128
    assert [net.conv1.out_channels, net.layer1[0].conv1.in_channels] == [16, 16]
    maps = net.forward_maps(torch.randn(2, 3, size, size))
    assert [m.shape[1] for m in maps.values()] == [16, 32, 64, 128]
    assert maps["layer4"].shape[-1] == spatial
    assert net(torch.randn(2, 3, size, size)).shape == (2, 128)


def test_width_travels_through_the_artifact(tmp_path):
    net = build_backbone("resnet50", stem="small", width=8)
    save_backbone(
        tmp_path, net, arch="resnet50", arch_kwargs={"stem": "small", "width": 8}, method="none"
    )
    loaded, manifest = load_backbone(tmp_path)
    assert manifest["feature_dim"] == loaded.feature_dim == 8 * 8 * 4
    x = torch.randn(2, 3, 16, 16)
    net.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_bad_width_and_stem_are_errors():
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0)
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="tiny")


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152", "wide_resnet50_2"])
def test_every_torchvision_resnet_keeps_torchvision_names_and_shapes(arch):
    ours = build_backbone(arch).state_dict()
    ref = {
        k: v
        for k, v in getattr(torchvision.models, arch)().state_dict().items()
        if not k.startswith("fc.")
    }
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize(
    "arch,kwargs,size",
    [
        ("resnet18", {"stem": "small", "width": 16}, 16),
        ("resnet50", {}, 64),
        ("wide_resnet50_2", {"width": 8}, 32),
    ],
)
def test_resnet_facts_are_what_its_stages_output(arch, kwargs, size):
    """Stage channels and strides as reported equal the shapes the stages produce."""
    net = build_backbone(arch, **kwargs).eval()
    with torch.no_grad():
        maps = net.forward_maps(torch.randn(1, 3, size, size))
    facts = net.facts
    assert [s.module for s in facts.stages] == list(maps)
    assert [(s.channels, size // s.stride) for s in facts.stages] == [
        (m.shape[1], m.shape[-1]) for m in maps.values()
    ]
    assert facts.feature_dim == net.feature_dim == maps["layer4"].shape[1]
    assert (
        facts.family == "resnet"
        and facts.structure["depth"]
        == {"resnet18": 18, "resnet50": 50, "wide_resnet50_2": 50}[arch]
    )


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_is_timms_vit_read_out_as_asked(pool):
    """Same names and shapes as timm's model (norm stays `norm` for both readouts), and the
    feature is timm's final-normed CLS token or the mean of its final-normed patch tokens."""
    net = build_backbone("vit_small_patch16_224", pool=pool, img_size=32).eval()
    ref = timm.create_model("vit_small_patch16_224", img_size=32, num_classes=0).eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        expected = tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(1)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
    facts = net.facts
    assert facts.family == "vit" and facts.feature_dim == 384 and facts.structure["pool"] == pool
    assert [(s.module, s.channels, s.stride) for s in facts.stages] == [
        (f"blocks.{i}", 384, 16) for i in range(12)
    ]
    assert facts.structure["num_heads"] == 6 and facts.structure["classifier"] == "head"


def test_tiny_vit_reads_small_images_of_any_size():
    """img_size/patch_size make a CPU-sized ViT; the position embedding resamples (as DINO's
    interpolate_pos_encoding does) for other sizes."""
    net = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4).eval()
    assert net.facts.stages[0].stride == 4 and net.state_dict()["pos_embed"].shape == (1, 65, 192)
    with torch.no_grad():
        assert (
            net(torch.randn(2, 3, 32, 32)).shape == net(torch.randn(2, 3, 16, 16)).shape == (2, 192)
        )


def test_any_timm_model_by_name():
    net = build_backbone("timm:convnext_atto")
    assert net.facts.family == "timm" and net.feature_dim == 320
    assert [(s.module, s.channels, s.stride) for s in net.facts.stages] == [
        (info["module"], info["num_chs"], info["reduction"]) for info in net.feature_info
    ]
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 320)
    with pytest.raises(KeyError, match="unknown timm model 'convnext_atoo' .*'convnext_atto'"):
        build_backbone("timm:convnext_atoo")
    with pytest.raises(ValueError, match="pool='avg' applies to ViTs"):
        build_backbone("timm:convnext_atto", pool="avg")
    with pytest.raises(KeyError, match="unknown backbone namespace 'tim'"):
        build_backbone("tim:convnext_atto")


def test_dense_tasks_read_the_facts():
    """Depth, widths and stage channels come from the manifest's facts, for any ResNet; a ViT
    is refused by detection with a clear error, not a crash; segmentation refuses a family it
    has no mmseg backbone for, and a ViT mmseg's VisionTransformer cannot hold."""
    from omegaconf import OmegaConf

    from sslbench.artifact import ArtifactError
    from transfer.detection.detectron2_backend import resnet_options
    from transfer.detection.model import build_detector
    from transfer.segmentation.mmseg_config import (
        backbone_config,
        resnet_config,
        stage_channels,
        vit_config,
    )

    wide = {"arch": "wide_resnet50_2", "arch_kwargs": {}}
    assert resnet_options(wide, "c4") == {
        "MODEL.RESNETS.DEPTH": 50,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.NUM_GROUPS": 1,
        "MODEL.RESNETS.WIDTH_PER_GROUP": 128,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    }
    r34 = {"arch": "resnet34", "arch_kwargs": {"stem": "small", "width": 16}}
    assert stage_channels(r34) == [16, 32, 64, 128]
    config = resnet_config(r34, dilated=False, norm_cfg={"type": "BN"})
    assert (config["type"], config["depth"], config["stem_channels"]) == ("SmallStemResNet", 34, 16)
    vit = {"arch": "vit_tiny_patch16_224", "arch_kwargs": {"img_size": 32}}
    with pytest.raises(
        ArtifactError, match="detection transfer with a vit backbone .* is not supported"
    ):
        resnet_options(vit, "fpn")
    convnext = {"arch": "timm:convnext_atto", "arch_kwargs": {}}
    with pytest.raises(ArtifactError, match="takes ResNets and ViTs; this is a timm"):
        backbone_config(convnext, OmegaConf.create({}), (32, 32), norm_cfg={})
    no_cls = {**vit["arch_kwargs"], "class_token": False, "pool": "avg", "no_embed_class": True}
    with pytest.raises(
        ArtifactError,
        match="VisionTransformer needs one CLS token .* position "
        "embedding that includes the CLS token",
    ):
        vit_config({"arch": vit["arch"], "arch_kwargs": no_cls}, None, (32, 32))
    model_cfg = OmegaConf.create({"head": "fpn"})
    with pytest.raises(ArtifactError, match="is not supported"):
        build_detector(
            build_backbone("vit_tiny_patch16_224", img_size=32),
            model_cfg,
            None,
            None,
            2,
            torch.device("cpu"),
        )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_pretraining_method_trains_a_vit(name):
    """One step of each registered method on a tiny ViT with MoCo v3's frozen random patch
    projection and fixed sin-cos positions: a finite loss, gradients in every block, none in
    what is frozen."""
    from pretrain.methods import build_method, method_config_class

    torch.manual_seed(0)
    backbone = build_backbone(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=4,
        depth=2,
        embed_dim=32,
        num_heads=2,
        freeze_patch_embed=True,
        sincos_pos_embed=True,
    )
    method = build_method(backbone, method_config_class(name)(**SMALL[name])).train()
    out = method([torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)])
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for i in range(2):
        assert backbone.blocks[i].attn.qkv.weight.grad.abs().sum() > 0
    frozen = [backbone.pos_embed, *backbone.patch_embed.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


@pytest.mark.integration
def test_tiny_vit_recipe_pretrains_through_the_cli(shapes_root, tmp_path):
    """The CPU ViT recipe as a user runs it (one epoch here): the artifact records the ViT's
    construction arguments and rebuilds to the same network."""
    from helpers import ROOT, sslbench, tiny_data_overrides

    recipe = ROOT / "configs" / "pretrain" / "mocov3_synthetic_vit_tiny.yaml"
    sslbench(
        "pretrain",
        str(recipe),
        *tiny_data_overrides(shapes_root),
        "train.epochs=1",
        "optim.warmup_epochs=0",
        f"run.output_dir={tmp_path}",
        "run.name=vit",
        cwd=tmp_path,
    )
    backbone, manifest = load_backbone(tmp_path / "vit")
    assert manifest["arch"] == "vit_tiny_patch16_224" and manifest["method"] == "mocov3"
    assert manifest["arch_kwargs"] == {
        "img_size": 16,
        "patch_size": 4,
        "depth": 4,
        "embed_dim": 96,
        "num_heads": 3,
        "freeze_patch_embed": True,
        "sincos_pos_embed": True,
    }
    assert manifest["structure"]["family"] == "vit" and manifest["feature_dim"] == 96
    assert not backbone.patch_embed.proj.weight.requires_grad


def test_sincos_position_embedding_is_moco_v3s_table():
    """Written the way moco-v3's build_2d_sincos_position_embedding computes it (einsum over a
    meshgrid of (w, h) coordinates), for a non-square grid; the CLS entry is zero and fixed."""
    net = build_backbone(
        "vit_tiny_patch16_224", img_size=(8, 12), patch_size=4, sincos_pos_embed=True
    )
    h, w, dim = 2, 3, 192
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    assert torch.equal(net.pos_embed[0, 1:], table)
    assert torch.equal(net.pos_embed[0, 0], torch.zeros(dim)) and not net.pos_embed.requires_grad
