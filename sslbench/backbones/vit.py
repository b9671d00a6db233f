"""Vision Transformers, and any other timm model as "timm:NAME", built with num_classes=0.

A ViT's feature is the final-normed CLS token by default, as DINO and MoCo v3 evaluate it, or
with pool="avg" the mean of the final-normed patch tokens. Both keep timm's parameter names
(the final norm stays `norm`, not `fc_norm`), which are also the names DINO's, MoCo v3's and
solo-learn's ViTs use, so their checkpoints load without renaming. `dynamic_img_size` (on by
default) resamples the position embedding when images are not `img_size`, as DINO's
`interpolate_pos_encoding` does, so a 224-pixel ViT also reads 32-pixel images.

timm is imported when a ViT is built, not when sslbench starts.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import nn

from ..registry import closest
from .base import BACKBONES, NAMESPACES, BackboneFacts, Stage

POOLS = ("token", "avg")
# Registered under their timm names; any other timm model is "timm:NAME".
VITS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
        "vit_large_patch16_224")


def timm_backbone(name: str, pool: str | None = None, **kwargs: Any) -> nn.Module:
    """timm's model `name` without its classifier, with the facts sslbench reads attached.

    kwargs go to timm.create_model (img_size, patch_size, num_heads, drop_path_rate, ...).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    is_vit = timm.models.is_model_in_modules(name, ["vision_transformer"])
    if is_vit:
        pool = pool or "token"
        if pool not in POOLS:
            raise ValueError(f"unknown ViT pool {pool!r}; expected one of {POOLS}")
        kwargs = {"dynamic_img_size": True, **kwargs, "global_pool": pool, "fc_norm": False}
    elif pool is not None:
        raise ValueError(f"pool={pool!r} applies to ViTs; timm model {name!r} pools its own way")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.feature_dim = model.num_features
    stages = tuple(Stage(info["module"], info["num_chs"], info["reduction"])
                   for info in model.feature_info)
    structure = {"timm_name": name, "classifier": model.pretrained_cfg.get("classifier", "head")}
    family = "timm"
    if isinstance(model, VisionTransformer):
        family = "vit"
        structure.update(
            embed_dim=model.embed_dim, depth=len(model.blocks),
            num_heads=model.blocks[0].attn.num_heads,
            patch_size=list(model.patch_embed.patch_size),
            img_size=list(model.patch_embed.img_size), pool=model.global_pool,
            num_prefix_tokens=model.num_prefix_tokens)
    model.facts = BackboneFacts(family, model.feature_dim, stages, structure)
    return model


def _timm_constructor(name: str) -> Callable[..., nn.Module]:
    """The constructor of "timm:NAME", or a KeyError naming the closest timm model."""
    import timm

    if not timm.is_model(name):
        raise KeyError(f"unknown timm model {name!r}{closest(name, timm.list_models())}")
    return partial(timm_backbone, name)


NAMESPACES["timm"] = _timm_constructor
for _name in VITS:
    BACKBONES.register(_name)(partial(timm_backbone, _name))
