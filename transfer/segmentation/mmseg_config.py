"""A recipe as an mmengine config: the model, data, schedule and runtime sections mmseg reads.

Plain dicts (no mmseg import), so a recipe's translation can be read and tested on its own; the
run dumps it to the work directory as mmengine's config file. Protocol values fixed by the
artifact rather than the recipe: RGB input normalised with the mean/std its manifest records,
and the backbone. A ResNet is mmseg's `ResNet` in 'pytorch' style (stride in the 3x3 conv, like
torchvision's), whose parameter names are torchvision's, so the weights load with no renaming;
its depth, widths and stem come from the manifest's facts. A ViT is mmseg's `VisionTransformer`
with the artifact's final norm on its last block (final_norm), patch-projection bias, width,
depth, heads, MLP width and LayerNorm eps, read from the network the manifest builds, and
position embeddings for the crop size; a MultiLevelNeck turns the chosen blocks' patch tokens
into maps at four strides, as mmseg's ViT recipes do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from sslbench.artifact import ArtifactError, backbone_facts, describe_arch, input_normalization
from sslbench.backbones import build_backbone
from sslbench.config import ConfigError
from sslbench.transforms import pixel_stats

# mmseg's ResNet for the imagenet stem (7x7/2 conv + max-pool); our subclass for the small one.
BACKBONE_TYPES = {"imagenet": "ResNet", "small": "SmallStemResNet"}
DATASET_TYPES = {
    "voc12aug": "PascalVOCDataset",
    "cityscapes": "CityscapesDataset",
    "ade20k": "ADE20KDataset",
    "synthetic-shapes": "SyntheticShapesDataset",
}
SEG_IGNORE = 255  # label of padding and of pixels no class covers (IoUMetric's ignore_index)


def backbone_config(
    manifest: dict, model: DictConfig, crop_size: Sequence[int], norm_cfg: dict
) -> dict[str, Any]:
    """mmseg's backbone holding exactly the artifact's network, or an ArtifactError saying why
    not: a ResNet (`model.dilated`) or a ViT (`model.vit`, position embeddings for `crop_size`)."""
    family = backbone_facts(manifest).family
    if family == "resnet":
        return resnet_config(manifest, model.dilated, norm_cfg)
    if family == "vit":
        return vit_config(manifest, model.vit, crop_size)
    raise ArtifactError(
        f"backbone {describe_arch(manifest)}: segmentation transfer takes ResNets "
        f"and ViTs; this is a {family}"
    )


def resnet_config(manifest: dict, dilated: bool, norm_cfg: dict) -> dict[str, Any]:
    """mmseg's ResNet holding exactly the artifact's network, or an ArtifactError saying why not.

    Dilated: stages 3 and 4 keep stride 8 with dilations 2 and 4, the first block of each at
    half the dilation (contract_dilation, as torchvision's replace_stride_with_dilation does).
    """
    facts, what = backbone_facts(manifest), describe_arch(manifest)
    r = facts.structure
    if r["width_per_group"] != 64:
        raise ArtifactError(
            f"backbone {what}: mmseg's ResNet has no wide bottleneck "
            f"(width_per_group {r['width_per_group']})"
        )
    return {
        "type": BACKBONE_TYPES[r["stem"]],
        "depth": r["depth"],
        "stem_channels": r["stem_channels"],
        "base_channels": r["stem_channels"],
        "num_stages": 4,
        "out_indices": (0, 1, 2, 3),
        "strides": (1, 2, 1, 1) if dilated else (1, 2, 2, 2),
        "dilations": (1, 1, 2, 4) if dilated else (1, 1, 1, 1),
        "contract_dilation": True,
        "style": "pytorch",
        "norm_cfg": norm_cfg,
        "norm_eval": False,
    }


def vit_config(manifest: dict, vit: DictConfig, crop_size: Sequence[int]) -> dict[str, Any]:
    """mmseg's VisionTransformer computing what the artifact's timm ViT computes, or an
    ArtifactError naming what it cannot hold. What the manifest's facts leave out (MLP width,
    biases, LayerNorm eps, activation) is read from the network built on the meta device."""
    what = describe_arch(manifest)
    with torch.device("meta"):  # shapes and settings, no memory
        net = build_backbone(manifest["arch"], **manifest["arch_kwargs"])
    block, width = net.blocks[0], net.embed_dim
    act, hidden = block.mlp.act, block.mlp.fc1.out_features
    patch = tuple(net.patch_embed.patch_size)
    needs = {
        "one CLS token and no register tokens": net.num_prefix_tokens == 1
        and net.cls_token is not None,
        "a position embedding that includes the CLS token": not net.no_embed_class,
        "exact GELU": type(act) is nn.GELU and act.approximate == "none",
        "LayerNorm": isinstance(net.norm, nn.LayerNorm),
        "square patches": patch[0] == patch[1],
        "an MLP width that is a whole multiple of the embedding width": hidden % width == 0,
    }
    lacking = [need for need, met in needs.items() if not met]
    if lacking:
        raise ArtifactError(
            f"backbone {what}: mmseg's VisionTransformer needs {', '.join(lacking)}"
        )
    depth = len(net.blocks)
    if list(vit.out_indices)[-1] >= depth:
        raise ConfigError(
            f"model.vit.out_indices={list(vit.out_indices)}: backbone {what} has "
            f"blocks 0..{depth - 1}"
        )
    return {
        "type": "VisionTransformer",
        "img_size": tuple(crop_size),
        "patch_size": patch[0],
        "in_channels": 3,
        "embed_dims": width,
        "num_layers": depth,
        "num_heads": block.attn.num_heads,
        "mlp_ratio": hidden // width,
        "out_indices": tuple(vit.out_indices),
        "qkv_bias": block.attn.qkv.bias is not None,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "drop_path_rate": vit.drop_path,
        "with_cls_token": True,
        "norm_cfg": {"type": "LN", "eps": net.norm.eps},
        "act_cfg": {"type": "GELU"},
        "patch_bias": net.patch_embed.proj.bias is not None,
        "final_norm": True,
        "interpolate_mode": "bicubic",
        "norm_eval": False,
    }


def stage_channels(manifest: dict) -> list[int]:
    return [stage.channels for stage in backbone_facts(manifest).stages]


def map_channels(manifest: dict, model: DictConfig) -> list[int]:
    """The channels of each map the heads read: a ResNet's four stages, or one embedding-wide
    map per ViT block in model.vit.out_indices (the neck keeps the width)."""
    facts = backbone_facts(manifest)
    if facts.family == "vit":
        return [facts.structure["embed_dim"]] * len(model.vit.out_indices)
    return stage_channels(manifest)


def neck_config(manifest: dict, model: DictConfig) -> dict[str, Any] | None:
    """A ViT's MultiLevelNeck: each block's map through a 1x1 conv, resized by its scale (4, 2,
    1, 0.5: strides 4 to 32 from 16-pixel patches) and a 3x3 conv; a ResNet needs none."""
    if backbone_facts(manifest).family != "vit":
        return None
    channels = map_channels(manifest, model)
    return {
        "type": "MultiLevelNeck",
        "in_channels": channels,
        "out_channels": channels[0],
        "scales": list(model.vit.neck_scales),
    }


def model_config(cfg: DictConfig, manifest: dict, num_classes: int, norm: str) -> dict[str, Any]:
    """EncoderDecoder with the recipe's decode head (FCN on the last map, or UPerNet on all)
    and auxiliary FCN head (on map model.auxiliary_index)."""
    m = cfg.model
    norm_cfg = {"type": norm, "requires_grad": True}
    channels = map_channels(manifest, m)
    last = len(channels) - 1
    if m.auxiliary and m.auxiliary_index > last:
        raise ConfigError(
            f"model.auxiliary_index={m.auxiliary_index}: the backbone gives maps 0..{last}"
        )
    common = {
        "dropout_ratio": m.dropout,
        "num_classes": num_classes,
        "norm_cfg": norm_cfg,
        "align_corners": m.align_corners,
    }
    if m.head == "fcn":
        decode = {
            "type": "FCNHead",
            "in_channels": channels[last],
            "in_index": last,
            "channels": m.channels,
            "num_convs": m.num_convs,
            "concat_input": m.concat_input,
        }
    else:
        decode = {
            "type": "UPerHead",
            "in_channels": channels,
            "in_index": list(range(len(channels))),
            "pool_scales": tuple(m.pool_scales),
            "channels": m.channels,
        }
    decode.update(common, loss_decode=_cross_entropy(1.0))
    mean, std = pixel_stats(*input_normalization(manifest))
    model = {
        "type": "EncoderDecoder",
        "data_preprocessor": {
            "type": "SegDataPreProcessor",
            "mean": mean,
            "std": std,
            "bgr_to_rgb": True,
            "pad_val": 0,
            "seg_pad_val": SEG_IGNORE,
            "size": tuple(cfg.input.crop_size),
        },
        "backbone": backbone_config(manifest, m, cfg.input.crop_size, norm_cfg),
        "decode_head": decode,
        "train_cfg": {},
        "test_cfg": _test_cfg(cfg),
    }
    neck = neck_config(manifest, m)
    if neck is not None:
        model["neck"] = neck
    if m.auxiliary:
        model["auxiliary_head"] = {
            "type": "FCNHead",
            "in_channels": channels[m.auxiliary_index],
            "in_index": m.auxiliary_index,
            "channels": m.auxiliary_channels,
            "num_convs": 1,
            "concat_input": False,
            **common,
            "loss_decode": _cross_entropy(m.auxiliary_weight),
        }
    return model


def _cross_entropy(weight: float) -> dict[str, Any]:
    return {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": weight}


def _test_cfg(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.model
    if m.test_mode == "whole":
        return {"mode": "whole"}
    return {
        "mode": "slide",
        "crop_size": tuple(m.test_crop or cfg.input.crop_size),
        "stride": tuple(m.test_stride),
    }


def pipelines(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """(train, test) transforms: mmseg's random resize, crop, flip and photometric distortion;
    at test time one resize, with the labels kept at full resolution (predictions are resized
    back to them)."""
    i = cfg.input
    train = [
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations"},
        {
            "type": "RandomResize",
            "scale": tuple(i.scale),
            "ratio_range": tuple(i.ratio_range),
            "keep_ratio": True,
        },
        {"type": "RandomCrop", "crop_size": tuple(i.crop_size), "cat_max_ratio": i.cat_max_ratio},
        {"type": "RandomFlip", "prob": i.flip},
    ]
    if i.photometric:
        train.append({"type": "PhotoMetricDistortion"})
    train.append({"type": "PackSegInputs"})
    test = [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": tuple(i.test_scale), "keep_ratio": True},
        {"type": "LoadAnnotations"},
        {"type": "PackSegInputs"},
    ]
    return train, test


def datasets(
    data: DictConfig, root: Path, train_pipeline: list, test_pipeline: list
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, test) dataset configs of mmseg's layout for `data.name`, rooted at `root`."""
    kind = DATASET_TYPES[data.name]

    def dataset(img: str, seg: str, pipeline: list, ann_file: str = "") -> dict[str, Any]:
        return {
            "type": kind,
            "data_root": str(root),
            "ann_file": ann_file,
            "data_prefix": {"img_path": img, "seg_map_path": seg},
            "pipeline": pipeline,
        }

    if data.name == "voc12aug":
        lists = "ImageSets/Segmentation"
        train = dataset("JPEGImages", "SegmentationClass", train_pipeline, f"{lists}/train.txt")
        if data.aug:
            aug = dataset("JPEGImages", "SegmentationClassAug", train_pipeline, f"{lists}/aug.txt")
            train = {"type": "ConcatDataset", "datasets": [train, aug]}
        return train, dataset("JPEGImages", "SegmentationClass", test_pipeline, f"{lists}/val.txt")
    dirs = {
        "cityscapes": ("leftImg8bit/{}", "gtFine/{}"),
        "ade20k": ("images/{}", "annotations/{}"),
        "synthetic-shapes": ("{}", "labels/{}"),
    }[data.name]
    return (
        dataset(*(d.format(data.train_split) for d in dirs), train_pipeline),
        dataset(*(d.format(data.test_split) for d in dirs), test_pipeline),
    )


def runner_config(
    cfg: DictConfig,
    manifest: dict,
    *,
    num_classes: int,
    root: Path,
    work_dir: Path,
    norm: str,
    world_size: int,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """Every section mmengine's Runner takes, as its config file would hold them; resume_from:
    the checkpoint a killed run continues from (resume.latest_checkpoint)."""
    s, run = cfg.solver, cfg.run
    if s.batch_size % world_size:
        raise ValueError(
            f"solver.batch_size={s.batch_size} cannot be split over {world_size} processes"
        )
    train_pipeline, test_pipeline = pipelines(cfg)
    train_set, test_set = datasets(cfg.data, root, train_pipeline, test_pipeline)
    workers = {"num_workers": run.num_workers, "persistent_workers": run.num_workers > 0}
    return {
        "default_scope": "mmseg",
        "work_dir": str(work_dir),
        "model": model_config(cfg, manifest, num_classes, norm),
        "train_dataloader": {
            "batch_size": s.batch_size // world_size,
            **workers,
            "sampler": {"type": "InfiniteSampler", "shuffle": True},
            "dataset": train_set,
        },
        "val_dataloader": {
            "batch_size": 1,
            **workers,
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "dataset": test_set,
        },
        "val_evaluator": {
            "type": "PerClassIoUMetric",
            "iou_metrics": ["mIoU"],
            "ignore_index": SEG_IGNORE,
        },
        "optim_wrapper": optim_wrapper(s),
        "param_scheduler": schedule(s),
        "train_cfg": {
            "type": "IterBasedTrainLoop",
            "max_iters": s.max_iters,
            "val_interval": s.val_interval or s.max_iters,
        },
        "val_cfg": {"type": "ValLoop"},
        "default_hooks": {
            "timer": {"type": "IterTimerHook"},
            "logger": {
                "type": "LoggerHook",
                "interval": run.log_every,
                "log_metric_by_epoch": False,
            },
            "param_scheduler": {"type": "ParamSchedulerHook"},
            "checkpoint": _checkpoint_hook(run.checkpoint_every),
            "sampler_seed": {"type": "DistSamplerSeedHook"},
        },
        "log_processor": {"by_epoch": False},
        "visualizer": {
            "type": "Visualizer",
            "vis_backends": [{"type": "LocalVisBackend"}, {"type": "TensorboardVisBackend"}],
        },
        "env_cfg": {
            "cudnn_benchmark": True,
            "mp_cfg": {"mp_start_method": "fork", "opencv_num_threads": 0},
            "dist_cfg": {"backend": "nccl"},
        },
        "randomness": {"seed": run.seed},
        "load_from": resume_from,
        "resume": resume_from is not None,
        "launcher": "pytorch" if world_size > 1 else "none",
        "log_level": "INFO",
    }


def optim_wrapper(s: DictConfig) -> dict[str, Any]:
    """SGD or AdamW, with no weight decay on parameters whose names hold a solver.no_decay key."""
    if s.optimizer == "sgd":
        optimizer = {
            "type": "SGD",
            "lr": s.lr,
            "momentum": s.momentum,
            "weight_decay": s.weight_decay,
        }
    else:
        optimizer = {
            "type": "AdamW",
            "lr": s.lr,
            "betas": tuple(s.betas),
            "weight_decay": s.weight_decay,
        }
    wrapper = {"type": "OptimWrapper", "clip_grad": None, "optimizer": optimizer}
    if s.no_decay:
        wrapper["paramwise_cfg"] = {"custom_keys": {k: {"decay_mult": 0.0} for k in s.no_decay}}
    return wrapper


def schedule(s: DictConfig) -> list[dict[str, Any]]:
    """PolyLR to solver.max_iters, after a LinearLR warm-up when solver.warmup_iters > 0."""
    poly = {
        "type": "PolyLR",
        "eta_min": s.min_lr,
        "power": s.poly_power,
        "begin": s.warmup_iters,
        "end": s.max_iters,
        "by_epoch": False,
    }
    if not s.warmup_iters:
        return [poly]
    return [
        {
            "type": "LinearLR",
            "start_factor": s.warmup_factor,
            "by_epoch": False,
            "begin": 0,
            "end": s.warmup_iters,
        },
        poly,
    ]


def _checkpoint_hook(every: int) -> dict[str, Any] | None:
    """mmengine checkpoints every `every` iterations and at the end: what a killed run resumes
    from. Two are kept: mmengine removes the oldest before it writes the next, in place."""
    if every < 0:
        raise ValueError(f"run.checkpoint_every must be >= 0 (0: no checkpoints), got {every}")
    if every == 0:
        return None
    return {
        "type": "CheckpointHook",
        "interval": every,
        "by_epoch": False,
        "max_keep_ckpts": 2,
        "save_last": True,
    }


def required_paths(data: DictConfig, root: Path) -> Sequence[Path]:
    """What must exist under `root` for `data`'s layout (synthetic-shapes is generated)."""
    if data.name == "voc12aug":
        lists = root / "ImageSets" / "Segmentation"
        paths = [
            root / "JPEGImages",
            root / "SegmentationClass",
            lists / "train.txt",
            lists / "val.txt",
        ]
        return paths + ([root / "SegmentationClassAug", lists / "aug.txt"] if data.aug else [])
    if data.name == "cityscapes":
        return [
            root / d / s
            for d in ("leftImg8bit", "gtFine")
            for s in (data.train_split, data.test_split)
        ]
    if data.name == "ade20k":
        return [
            root / d / s
            for d in ("images", "annotations")
            for s in (data.train_split, data.test_split)
        ]
    return []
