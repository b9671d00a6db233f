"""The pretraining config schema: every key a recipe YAML may set, with its default."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig

from sslbench.config import ConfigError, build_config

from . import baselines
from .unified import check_loss_form


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "synthetic-shapes"
    root: Optional[str] = None
    image_size: int = 32
    num_workers: int = 1
    verify: bool = True  # open every image before training, so a corrupt file fails fast
    # Passed to the dataset builder; `data.options=null` drops a recipe's options (e.g. when
    # pointing a synthetic-shapes recipe at an image folder).
    options: Optional[Dict[str, Any]] = field(default_factory=dict)


@dataclass
class BackboneConfig:
    arch: str = "resnet18"
    # A ResNet's own arguments (other families ignore them):
    stem: str = "small"
    zero_init_residual: bool = False
    width: int = 64  # stem channels; 16 makes a 1/16-compute ResNet for CPU smoke runs
    # Any further constructor arguments, e.g. a ViT's img_size, patch_size, pool, num_heads,
    # freeze_patch_embed (sslbench/backbones/vit.py).
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    pipeline: str = "mocov2"
    crop_min_scale: Optional[float] = None
    blur: str = "auto"
    # Where the random ops run: cpu (PIL, in DataLoader workers) or accelerator (batched on the
    # training device, workers only decode to decode_size², default image_size); auto is the
    # accelerator when training on CUDA (pretrain/augment_batched.py).
    device: str = "auto"
    decode_size: Optional[int] = None


@dataclass
class OptimConfig:
    name: str = "sgd"
    base_lr: float = 0.05  # scaled by batch_size / 256
    batch_size: int = 512  # global, over all processes
    weight_decay: float = 1e-4
    momentum: float = 0.9
    exclude_norm_bias: bool = False
    lars_eta: float = 0.001
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    final_lr: float = 0.0
    clip_grad_norm: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: int = 100
    device: str = "auto"
    amp: bool = True  # bfloat16 autocast, on CUDA only
    sync_bn: bool = True  # normalise over the global batch when several processes run
    # torch.compile the method (with DDP, the wrapped model): faster steps after a compilation
    # at the first ones; numerics differ from eager by float round-off.
    compile: bool = False
    checkpoint_every: int = 200  # steps; the loss's finiteness is also checked before each save
    # steps between logged losses; a step never waits for the device, the loss's finiteness is
    # checked at these steps (a non-finite loss stops the run at the next log or checkpoint)
    log_every: int = 10
    diagnostics_batches: int = 4  # last batches of each epoch used for collapse diagnostics
    progress: bool = True


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: Any = None  # the method's (or baseline's) own dataclass, chosen by method.name
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_pretrain_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    cfg = build_config(
        PretrainConfig, paths, overrides, variants={"method": baselines.config_class}
    )
    baselines.check(cfg)
    try:  # before any data is read: a loss form the method lacks fails at once
        if cfg.method.name not in baselines.BASELINES:  # a baseline has no loss form
            check_loss_form(cfg.method.name, cfg.method.loss_form)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg
