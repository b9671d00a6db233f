"""Vision Transformers, and any other timm model as "timm:NAME", built with num_classes=0.

A ViT's feature is the final-normed CLS token by default, as DINO and MoCo v3 evaluate it, or
with pool="avg" the mean of the final-normed patch tokens. Both keep timm's parameter names
(the final norm stays `norm`, not `fc_norm`), which are also the names DINO's, MoCo v3's and
solo-learn's ViTs use, so their checkpoints load without renaming. `dynamic_img_size` (on by
default) resamples the position embedding when images are not `img_size`, as DINO's
`interpolate_pos_encoding` does, so a 224-pixel ViT also reads 32-pixel images.

MoCo v3's ViT recipe (moco-v3 vits.py) needs two more arguments: `freeze_patch_embed` keeps
the random patch projection fixed (its --stop-grad-conv1), `sincos_pos_embed` fixes the
position embedding to its 2-D sine-cosine table. Both are construction arguments, so the
manifest records them like any other.

timm is imported when a ViT is built, not when sslbench starts.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ..registry import closest
from .base import BACKBONES, NAMESPACES, BackboneFacts, Stage

POOLS = ("token", "avg")
# Registered under their timm names; any other timm model is "timm:NAME".
VITS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
)


def sincos_table(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D position embedding of the patch tokens, (1, h*w, dim): sin and cos of
    each grid coordinate at dim/4 frequencies (its build_2d_sincos_position_embedding)."""
    if dim % 4:
        raise ValueError(
            f"a 2-D sin-cos position embedding needs a width divisible by 4, not {dim}"
        )
    h, w = grid
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


def timm_backbone(
    name: str,
    pool: str | None = None,
    freeze_patch_embed: bool = False,
    sincos_pos_embed: bool = False,
    **kwargs: Any,
) -> nn.Module:
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
    else:
        given = {
            "pool": pool,
            "freeze_patch_embed": freeze_patch_embed,
            "sincos_pos_embed": sincos_pos_embed,
        }
        vit_only = [f"{k}={v!r}" for k, v in given.items() if v]
        if vit_only:
            raise ValueError(
                f"{', '.join(vit_only)} applies to ViTs; timm model {name!r} is not one"
            )
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if sincos_pos_embed:
        with torch.no_grad():
            prefix = model.pos_embed.shape[1] - model.patch_embed.num_patches
            model.pos_embed[:, prefix:] = sincos_table(model.patch_embed.grid_size, model.embed_dim)
            model.pos_embed[:, :prefix] = 0  # the CLS token's entry, as MoCo v3 sets it
        model.pos_embed.requires_grad_(False)
    if freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    model.feature_dim = model.num_features
    stages = tuple(
        Stage(info["module"], info["num_chs"], info["reduction"]) for info in model.feature_info
    )
    structure = {"timm_name": name, "classifier": model.pretrained_cfg.get("classifier", "head")}
    family = "timm"
    if isinstance(model, VisionTransformer):
        family = "vit"
        structure.update(
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=model.blocks[0].attn.num_heads,
            patch_size=list(model.patch_embed.patch_size),
            img_size=list(model.patch_embed.img_size),
            pool=model.global_pool,
            num_prefix_tokens=model.num_prefix_tokens,
        )
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
