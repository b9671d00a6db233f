"""torchvision's ResNets with an ImageNet or a small-image stem, minus the classifier.

Parameter names are torchvision's (conv1, bn1, layer1..4), so torchvision's weights, the SSL
codebases built on them (MoCo, DINO, solo-learn, VISSL, lightly) and the exporters all share
one naming.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models import resnet

from .base import BACKBONES, BackboneFacts, Stage

STEMS = ("imagenet", "small")
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
# name -> (block, blocks per stage, width_per_group): torchvision's table
ARCHS = {
    "resnet18": (resnet.BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (resnet.BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (resnet.Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (resnet.Bottleneck, (3, 4, 23, 3), 64),
    "resnet152": (resnet.Bottleneck, (3, 8, 36, 3), 64),
    "wide_resnet50_2": (resnet.Bottleneck, (3, 4, 6, 3), 128),
}


class ResNetBackbone(resnet.ResNet):
    """A torchvision ResNet whose forward returns pooled features instead of logits.

    stem="small" replaces the 7x7/2 conv + max-pool with a 3x3/1 conv (CIFAR-style), so 32x32
    images keep a 4x4 map before pooling instead of 1x1.

    width is the stem's channel count (64 in every paper); each stage keeps torchvision's
    doubling. Narrower networks (e.g. 16: 1/16 of the compute) exist for CPU smoke runs only.
    width_per_group is torchvision's bottleneck width knob (128: wide_resnet50_2).
    """

    width = 64

    def __init__(
        self,
        block,
        layers,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
        width: int = 64,
        width_per_group: int = 64,
    ):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
        if width < 1:
            raise ValueError(f"backbone width must be a positive channel count, got {width}")
        self.width = width  # read by _make_layer during torchvision's constructor
        super().__init__(
            block,
            list(layers),
            zero_init_residual=zero_init_residual,
            width_per_group=width_per_group,
        )
        self.stem = stem
        if stem == "small":
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif width != 64:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        if width != 64:
            self.bn1 = nn.BatchNorm2d(width)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        del self.fc
        stem_stride = 4 if stem == "imagenet" else 1
        stages = tuple(
            Stage(name, width * 2**i * block.expansion, stem_stride * 2**i)
            for i, name in enumerate(STAGE_NAMES)
        )
        self.feature_dim = stages[-1].channels
        convs = 3 if block is resnet.Bottleneck else 2
        self.facts = BackboneFacts(
            "resnet",
            self.feature_dim,
            stages,
            {
                "classifier": "fc",
                "depth": convs * sum(layers) + 2,
                "layers": list(layers),
                "block": "bottleneck" if block is resnet.Bottleneck else "basic",
                "stem": stem,
                "stem_channels": width,
                "width_per_group": width_per_group,
            },
        )

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        """torchvision's stage builder with every stage's width scaled by width/64."""
        if planes == 64:  # the first stage takes the stem's output
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)

    def forward_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four stage outputs (for dense transfer tasks)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
            out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


for _name, (_block, _layers, _width_per_group) in ARCHS.items():
    BACKBONES.register(_name)(
        partial(ResNetBackbone, _block, _layers, width_per_group=_width_per_group)
    )
