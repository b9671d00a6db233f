"""Backbones: torchvision ResNets with an ImageNet or a small-image stem, minus the classifier.

Every backbone maps images to a flat feature vector and exposes `feature_dim`. Parameter names
are torchvision's (conv1, bn1, layer1..4), so exporters and importers can rely on them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet

from .registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
STEMS = ("imagenet", "small")


class ResNetBackbone(resnet.ResNet):
    """A torchvision ResNet whose forward returns pooled features instead of logits.

    stem="small" replaces the 7x7/2 conv + max-pool with a 3x3/1 conv (CIFAR-style), so 32x32
    images keep a 4x4 map before pooling instead of 1x1.

    width is the stem's channel count (64 in every paper); each stage keeps torchvision's
    doubling. Narrower networks (e.g. 16: 1/16 of the compute) exist for CPU smoke runs only.
    """

    width = 64

    def __init__(self, block, layers, stem: str = "imagenet", zero_init_residual: bool = False,
                 width: int = 64):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
        if width < 1:
            raise ValueError(f"backbone width must be a positive channel count, got {width}")
        self.width = width  # read by _make_layer during torchvision's constructor
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        self.stem = stem
        if stem == "small":
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif width != 64:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        if width != 64:
            self.bn1 = nn.BatchNorm2d(width)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = 8 * width * block.expansion  # the last stage's channels
        del self.fc

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        """torchvision's stage builder with every stage's width scaled by width/64."""
        if planes == 64:  # the first stage takes the stem's output
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)

    def forward_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four stage outputs (for dense transfer tasks)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


@BACKBONES.register("resnet18")
def resnet18(stem: str = "imagenet", zero_init_residual: bool = False, width: int = 64) -> ResNetBackbone:
    return ResNetBackbone(resnet.BasicBlock, [2, 2, 2, 2], stem, zero_init_residual, width)


@BACKBONES.register("resnet50")
def resnet50(stem: str = "imagenet", zero_init_residual: bool = False, width: int = 64) -> ResNetBackbone:
    return ResNetBackbone(resnet.Bottleneck, [3, 4, 6, 3], stem, zero_init_residual, width)


def build_backbone(arch: str, **kwargs) -> nn.Module:
    """Build a registered backbone; it has a `feature_dim` attribute."""
    return BACKBONES.get(arch)(**kwargs)
