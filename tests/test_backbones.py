import pytest
import torch
import torchvision

from sslbench.artifact import load_backbone, save_backbone
from sslbench.backbones import build_backbone


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_default_width_is_torchvision_resnet(arch):
    """Same parameter names and shapes as torchvision's model, so its weights load as they are."""
    ours = build_backbone(arch).state_dict()
    ref = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items()
           if not k.startswith("fc.")}
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
    save_backbone(tmp_path, net, arch="resnet50", arch_kwargs={"stem": "small", "width": 8},
                  method="none")
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
