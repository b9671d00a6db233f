"""A timm ViT's weights under mmseg's VisionTransformer names, at the crop's patch grid.

timm (and DINO, MoCo v3, solo-learn, which keep its names) -> mmseg, block i:

    cls_token, pos_embed                 -> cls_token, pos_embed (resampled, below)
    patch_embed.proj.{weight,bias}       -> patch_embed.projection.{weight,bias}
    blocks.i.norm1 / norm2               -> layers.i.ln1 / ln2
    blocks.i.attn.qkv.{weight,bias}      -> layers.i.attn.attn.in_proj_{weight,bias}
    blocks.i.attn.proj                   -> layers.i.attn.attn.out_proj
    blocks.i.mlp.fc1 / fc2               -> layers.i.ffn.layers.0.0 / ffn.layers.1
    norm (the final norm)                -> ln1 (final_norm=True)

timm's fused qkv projection stacks q, k and v along its output rows, each split into heads
contiguously, which is torch's MultiheadAttention in_proj layout: the tensors move unchanged.
A tensor outside this table (layer scale, register tokens, a pre-norm, an attention-pool head)
has no place in mmseg's VisionTransformer and is refused by name.

The position embedding is resampled to the patch grid of the crop when the two differ, the way
mmseg's VisionTransformer resamples a pretrained one (its resize_pos_embed: the CLS entry kept,
the square grid of the others interpolated with the backbone's interpolate_mode, bicubic).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sslbench.artifact import ArtifactError

TOP = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.projection.weight",
    "patch_embed.proj.bias": "patch_embed.projection.bias",
    "norm.weight": "ln1.weight",
    "norm.bias": "ln1.bias",
}
BLOCK = {
    "norm1": "ln1",
    "norm2": "ln2",
    "attn.proj": "attn.attn.out_proj",
    "mlp.fc1": "ffn.layers.0.0",
    "mlp.fc2": "ffn.layers.1",
}
QKV = {"attn.qkv.weight": "attn.attn.in_proj_weight", "attn.qkv.bias": "attn.attn.in_proj_bias"}


def mmseg_name(key: str) -> str | None:
    """The mmseg VisionTransformer name of timm ViT tensor `key`; None if it has none."""
    if key in TOP:
        return TOP[key]
    head, index, rest = (key.split(".", 2) + ["", ""])[:3]
    if head != "blocks" or not index.isdigit():
        return None
    if rest in QKV:
        return f"layers.{index}.{QKV[rest]}"
    module, _, param = rest.rpartition(".")
    if module in BLOCK and param in ("weight", "bias"):
        return f"layers.{index}.{BLOCK[module]}.{param}"
    return None


def to_mmseg(
    state: dict[str, torch.Tensor], backbone: nn.Module, what: str
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """(`state` renamed for mmseg's VisionTransformer `backbone` and its position embedding
    resampled to the backbone's grid, what was resampled). Names outside the table are an
    ArtifactError; missing and mis-shaped tensors are left to the strict load that follows."""
    unknown = [k for k in state if mmseg_name(k) is None]
    if unknown:
        raise ArtifactError(
            f"cannot load {what}: {len(unknown)} tensors have no counterpart in "
            f"mmseg's VisionTransformer: {', '.join(unknown[:5])}"
        )
    out = {mmseg_name(k): v for k, v in state.items()}
    pos, target = out.get("pos_embed"), backbone.pos_embed.shape
    if pos is None or pos.shape == target or pos.ndim != 3 or pos.shape[2] != target[2]:
        return out, ()
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ArtifactError(
            f"cannot load {what}: pos_embed {tuple(pos.shape)} is not one CLS "
            "entry and a square grid, the only layout mmseg resamples"
        )
    grid = tuple(size // backbone.patch_size for size in backbone.img_size)
    out["pos_embed"] = backbone.resize_pos_embed(pos, grid, (side, side), backbone.interpolate_mode)
    return out, (
        f"pos_embed: {side}x{side} -> {grid[0]}x{grid[1]} patches ({backbone.interpolate_mode})",
    )
