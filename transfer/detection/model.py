"""Mask R-CNN / Faster R-CNN with a ResNet-FPN built on the artifact's backbone (torchvision).

The artifact's network is a torchvision ResNet, so the stages its facts list feed torchvision's
FPN directly (layer1..layer4 = detectron2's res2..res5). Detection with a ViT backbone is not
supported: `require_resnet` says so before anything is built. Norm choices follow detectron2's
names: FrozenBN (statistics and affine fixed, the torchvision default), BN (per-process batch
statistics) and SyncBN (statistics over all processes); `head_norm` puts BN or SyncBN in the
FPN, the 4conv1fc box head and the mask head, as in detectron2's SyncBN baselines.
"""

from __future__ import annotations

from typing import Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from sslbench import distributed as D
from sslbench.artifact import ArtifactError
from sslbench.backbones import BackboneFacts, ResNetBackbone
from sslbench.config import ConfigError
from sslbench.transforms import IMAGENET_MEAN, IMAGENET_STD

STAGES = ("layer1", "layer2", "layer3", "layer4")  # what FREEZE_AT counts, after the stem
TORCHVISION_NORMS = ("FrozenBN", "BN", "SyncBN")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below `module` by a FrozenBatchNorm2d holding its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


def freeze_stages(backbone: ResNetBackbone, freeze_at: int) -> None:
    """detectron2's FREEZE_AT: 1 freezes the stem, k > 1 also res2..res{k} (layer1..layer{k-1});
    frozen parts get no gradient and FrozenBN."""
    parts = [("conv1", "bn1"), *[(name,) for name in STAGES]][:freeze_at]
    for names in parts:
        for name in names:
            child = getattr(backbone, name)
            child.requires_grad_(False)
            setattr(backbone, name, freeze_batchnorm(child))


def require_resnet(facts: BackboneFacts, what: str) -> None:
    """Detection transfer builds on ResNets only; anything else is an ArtifactError saying so."""
    if facts.family != "resnet":
        raise ArtifactError(
            f"detection transfer with a {facts.family} backbone ({what}) is not "
            "supported: both backends build ResNet-FPN / C4 detectors"
        )


def build_detector(
    backbone: nn.Module,
    model_cfg: DictConfig,
    input_cfg: DictConfig,
    test_cfg: DictConfig,
    num_classes: int,
    device: torch.device,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> nn.Module:
    """The detector for `num_classes` object classes (plus background), on `device`; mean/std:
    the backbone's input normalisation (of [0, 1] RGB; torchvision's transform takes it so)."""
    m = model_cfg
    require_resnet(backbone.facts, type(backbone).__name__)
    if m.head != "fpn":
        raise ConfigError(
            f"model.head={m.head!r} needs the detectron2 backend (backend="
            "detectron2); the torchvision backend builds ResNet-FPN"
        )
    for key, value, allowed in (
        ("model.norm", m.norm, TORCHVISION_NORMS),
        ("model.head_norm", m.head_norm, ("", "BN", "SyncBN")),
    ):
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is detectron2-only; the torchvision backend takes "
                f"{', '.join(map(repr, allowed))} (its SyncBN already weighs "
                "processes by their sample count, as naiveSyncBN_N does)"
            )
    stages = backbone.facts.stages
    if len(m.anchor_sizes) != len(stages) + 1:
        raise ConfigError(
            f"model.anchor_sizes needs one size per FPN level (P2..P6): 5 values, "
            f"got {list(m.anchor_sizes)}"
        )
    if m.norm == "FrozenBN":
        freeze_batchnorm(backbone)
    freeze_stages(backbone, m.freeze_at)
    head_norm = nn.BatchNorm2d if m.head_norm else None
    body = BackboneWithFPN(
        backbone,
        {s.module: str(k) for k, s in enumerate(stages)},
        [s.channels for s in stages],
        m.fpn_channels,
        norm_layer=head_norm,
    )
    anchors = AnchorGenerator(
        tuple((int(s),) for s in m.anchor_sizes),
        (tuple(float(r) for r in m.aspect_ratios),) * len(m.anchor_sizes),
    )
    roi = 7  # torchvision's and detectron2's box pooler resolution
    if m.box_head == "4conv1fc":
        box_head = FastRCNNConvFCHead(
            (m.fpn_channels, roi, roi),
            [m.head_conv_dim] * 4,
            [m.box_head_dim],
            norm_layer=head_norm,
        )
    else:
        box_head = TwoMLPHead(m.fpn_channels * roi * roi, m.box_head_dim)
    kwargs = dict(
        min_size=tuple(input_cfg.min_size_train),
        max_size=input_cfg.max_size_train,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_topk_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_topk_test,
        rpn_post_nms_top_n_train=m.rpn_post_nms_topk_train,
        rpn_post_nms_top_n_test=m.rpn_post_nms_topk_test,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(m.box_head_dim, num_classes + 1),
        box_batch_size_per_image=m.roi_batch_size_per_image,
        box_positive_fraction=m.roi_positive_fraction,
        box_detections_per_img=test_cfg.detections_per_image,
    )
    if m.arch == "mask_rcnn":
        mask_head = MaskRCNNHeads(m.fpn_channels, [m.head_conv_dim] * 4, 1, norm_layer=head_norm)
        model = MaskRCNN(
            body,
            mask_head=mask_head,
            mask_predictor=MaskRCNNPredictor(m.head_conv_dim, m.head_conv_dim, num_classes + 1),
            **kwargs,
        )
    else:
        model = FasterRCNN(body, **kwargs)
    if m.norm == "SyncBN":
        model.backbone.body = D.convert_sync_batchnorm(model.backbone.body, device)
    if m.head_norm == "SyncBN":
        model.backbone.fpn = D.convert_sync_batchnorm(model.backbone.fpn, device)
        model.roi_heads = D.convert_sync_batchnorm(model.roi_heads, device)
    return model.to(device)


def use_test_sizes(model: nn.Module, input_cfg: DictConfig) -> None:
    """Resize test images like detectron2's MIN_SIZE_TEST / MAX_SIZE_TEST (torchvision's
    transform otherwise uses the last training size)."""
    model.transform.min_size = (input_cfg.min_size_test,)
    model.transform.max_size = input_cfg.max_size_test


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
