"""The board's reference rows, pretrained like any recipe: `random-init` and `supervised`.

`random-init` (the floor) is the architecture as the engine initialises it, trained for no step
(the config must say `train.epochs: 0`), so its artifact holds exactly the weights every SSL run
of the same seed starts from. `supervised` (the ceiling) trains the same backbone with a linear
classifier and cross-entropy on the training split's labels, with the recipe's data, optimiser,
schedule and step budget. By default it sees what an SSL method sees, both views of the recipe's
augmentation (`augment.pipeline`), each a labelled example; `augment.pipeline: classification`
gives it instead torchvision's classification training preset, one view per image
(RandomResizedCrop, scale 0.08-1, then a horizontal flip), made in the DataLoader workers as
torchvision's reference makes it, wherever `augment.device` puts the SSL pipelines.

They are methods of the engine, selected by `method.name`, but kept out of the SSL method
registry (pretrain/methods/) so that everything parametrised over the SSL methods stays so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchvision import transforms as T

from sslbench.config import ConfigError
from sslbench.registry import Registry, closest
from sslbench.transforms import IMAGENET_MEAN, IMAGENET_STD

from .augment import FLIP_P, MultiViewTransform
from .methods import METHODS, Method

CLASSIFICATION = "classification"  # augment.pipeline of torchvision's classification preset


@dataclass
class RandomInitConfig:
    name: str = "random-init"


@dataclass
class SupervisedConfig:
    name: str = "supervised"


class Supervised(Method):
    """The backbone and a linear classifier, trained with cross-entropy on every view."""

    def __init__(self, backbone: nn.Module, cfg: SupervisedConfig, num_classes: int):
        super().__init__(backbone, cfg)
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict:
        """The loss (mean over views), training top-1, and the backbone features of the first
        two views (None for the second when there is one view) for collapse diagnostics."""
        features = [self.backbone(v) for v in views]
        logits = [self.classifier(f) for f in features]
        loss = torch.stack([F.cross_entropy(z, labels) for z in logits]).mean()
        top1 = torch.stack([(z.argmax(1) == labels).float().mean() for z in logits]).mean()
        second = features[1].detach() if len(features) > 1 else None
        return {
            "loss": loss,
            "logs": {"top1": top1.detach()},
            "embeddings": (features[0].detach(), second),
        }


def _random_init(backbone: nn.Module, cfg: RandomInitConfig, num_classes: int) -> Method:
    """The bare backbone: no head, nothing to train."""
    return Method(backbone, cfg)


@dataclass(frozen=True)
class BaselineEntry:
    config: type
    build: Callable[[nn.Module, object, int], Method]


BASELINES: Registry[BaselineEntry] = Registry("baseline")
BASELINES.register("random-init")(BaselineEntry(RandomInitConfig, _random_init))
BASELINES.register("supervised")(BaselineEntry(SupervisedConfig, Supervised))


def config_class(name: str) -> type:
    """The config dataclass of baseline or SSL method `name` (the schema of `method.*`)."""
    if name in BASELINES:
        return BASELINES.get(name).config
    if name in METHODS:
        return METHODS.get(name).config
    raise KeyError(
        f"unknown method {name!r}{closest(name, [*METHODS, *BASELINES])}; SSL "
        f"methods: {', '.join(METHODS.names())}; baselines: "
        f"{', '.join(BASELINES.names())}"
    )


def build(backbone: nn.Module, cfg: DictConfig, num_classes: int) -> Method:
    """Baseline or SSL method `cfg.name` around `backbone`; `num_classes`, the training split's,
    sizes the supervised classifier."""
    if cfg.name in BASELINES:
        return BASELINES.get(cfg.name).build(backbone, cfg, num_classes)
    return METHODS.get(cfg.name).build(backbone, cfg)


def check(cfg: DictConfig) -> None:
    """Refuse what a baseline cannot be: a random init that trains, one-view SSL."""
    name = cfg.method.name
    if name == "random-init" and cfg.train.epochs != 0:
        raise ConfigError(
            f"method.name=random-init trains nothing: it needs train.epochs=0 "
            f"(got {cfg.train.epochs})"
        )
    if cfg.augment.pipeline == CLASSIFICATION and name != "supervised":
        raise ConfigError(
            f"augment.pipeline={CLASSIFICATION} gives one view per image, which "
            f"only method.name=supervised trains on (method.name is {name})"
        )


def classification_views(image_size: int) -> MultiViewTransform:
    """One view per image of torchvision's classification training preset (its
    references/classification ClassificationPresetTrain without auto-augment), run in the
    DataLoader workers as there."""
    return MultiViewTransform(
        [
            T.Compose(
                [
                    T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BILINEAR),
                    T.RandomHorizontalFlip(FLIP_P),
                    T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )
        ]
    )
