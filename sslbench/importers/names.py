"""Other codebases' names for the tensors of torchvision's ResNet and timm's ViT.

detectron2 (stem.conv1, res2..res5, convK.norm, shortcut) is one table read both ways, so the
exporter (transfer/export.py) and the importer are exact inverses by construction. lightly's
tutorials wrap torchvision's children in nn.Sequential, which numbers them instead of naming.
mmpretrain's VisionTransformer is timm's ViT under other names (its layers' ln1/attn/ln2/ffn,
mmcv's FFN and PatchEmbed, the final norm `ln1`); its ResNet already has torchvision's names.
"""

from __future__ import annotations

import re

_FIELDS = {
    "layer": r"(?P<layer>[1-4])",
    "res": r"(?P<res>[2-5])",
    "block": r"(?P<block>\d+)",
    "k": r"(?P<k>\d)",
    "rest": r"(?P<rest>.+)",
    "bn": r"(?P<bn>weight|bias|running_mean|running_var|num_batches_tracked)",
}
# (torchvision name, detectron2 name); detectron2's res{N} is torchvision's layer{N-1}. MoCo's
# convert-pretrain-to-detectron2.py puts "stem." before every key outside the stages, its
# projection head (fc) included; detectron2 ignores it, and here it is the classifier slot.
DETECTRON2_RULES = (
    ("conv1.weight", "stem.conv1.weight"),
    ("fc.{rest}", "stem.fc.{rest}"),
    ("bn1.{bn}", "stem.conv1.norm.{bn}"),
    ("layer{layer}.{block}.conv{k}.weight", "res{res}.{block}.conv{k}.weight"),
    ("layer{layer}.{block}.bn{k}.{bn}", "res{res}.{block}.conv{k}.norm.{bn}"),
    ("layer{layer}.{block}.downsample.0.weight", "res{res}.{block}.shortcut.weight"),
    ("layer{layer}.{block}.downsample.1.{bn}", "res{res}.{block}.shortcut.norm.{bn}"),
)
# torchvision.models.resnet's children in order: what nn.Sequential(*resnet.children()) numbers
RESNET_CHILDREN = (
    "conv1",
    "bn1",
    "relu",
    "maxpool",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "avgpool",
    "fc",
)


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(_FIELDS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


_TO_D2 = [(_pattern(tv), d2) for tv, d2 in DETECTRON2_RULES]
_FROM_D2 = [(_pattern(d2), tv) for tv, d2 in DETECTRON2_RULES]


def _translate(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            values = match.groupdict()
            if "layer" in values:
                values["res"] = str(int(values["layer"]) + 1)
            elif "res" in values:
                values["layer"] = str(int(values["res"]) - 1)
            return template.format(**values)
    return None


def to_detectron2(key: str) -> str | None:
    """detectron2's name for a torchvision ResNet key; None if it has none."""
    return _translate(key, _TO_D2)


def from_detectron2(key: str) -> str | None:
    """The torchvision ResNet name of a detectron2 backbone key; None if it has none."""
    return _translate(key, _FROM_D2)


# (mmpretrain name, timm name) of a ViT with a class token, no layer scale and no pre-norm
# (mmpretrain/models/backbones/vision_transformer.py); a variant with either keeps tensors no
# rule names, which the importer reports as not part of the architecture.
MMPRETRAIN_VIT_RULES = [
    (re.compile(src), dst)
    for src, dst in (
        (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (r"layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (r"layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"ln1\.(weight|bias)", r"norm.\1"),
    )
]


def from_mmpretrain(key: str) -> str:
    """timm's name of an mmpretrain ViT key; other keys (its ResNet's, cls_token, pos_embed) are
    returned as they are."""
    for pattern, template in MMPRETRAIN_VIT_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(template, key)
    return key


def from_sequential(key: str) -> str:
    """torchvision's name of a key of nn.Sequential(*resnet.children()[:-1]) ("4.0.conv1.weight"
    -> "layer1.0.conv1.weight"); other keys are returned as they are."""
    index, dot, rest = key.partition(".")
    if dot and index.isdigit() and int(index) < len(RESNET_CHILDREN):
        return f"{RESNET_CHILDREN[int(index)]}.{rest}"
    return key
