"""The backbone contract: what a backbone is, and the facts it reports about itself.

A backbone maps images (N, 3, H, W) to features (N, feature_dim) and carries `facts`, what
consumers need without being told its architecture's name (timm's `feature_info` is the model):

- `feature_dim`: the width of its output;
- `stages`: for dense tasks, the intermediate outputs by module name, channels and stride;
- `structure`: family facts (a ResNet's depth and block, a ViT's patch size and heads, the
  module name of the classifier slot its source models carry), for exporters and importers.

The manifest records them (`BackboneFacts.to_dict`), so exporters, detection and segmentation
read facts instead of keeping tables keyed by architecture name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from torch import nn

from ..registry import Registry, closest

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
# "timm" -> a function turning NAME of "timm:NAME" into that model's constructor
NAMESPACES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {}


@dataclass(frozen=True)
class Stage:
    """One intermediate output: the module that produces it, its channels, and its stride
    (input pixels per output pixel)."""

    module: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneFacts:
    family: str  # "resnet", "vit", "timm": decides which exporters and dense tasks apply
    feature_dim: int
    stages: tuple[Stage, ...]
    structure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As the manifest's "structure" entry (plain JSON values)."""
        return {
            **self.structure,
            "family": self.family,
            "feature_dim": self.feature_dim,
            "stages": [asdict(stage) for stage in self.stages],
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> BackboneFacts:
        rest = {k: v for k, v in entry.items() if k not in ("family", "feature_dim", "stages")}
        return cls(
            entry["family"],
            entry["feature_dim"],
            tuple(Stage(**stage) for stage in entry["stages"]),
            rest,
        )


def constructor(arch: str) -> Callable[..., nn.Module]:
    """The constructor of a registered name, or of "NAMESPACE:NAME" (e.g. "timm:convnext_tiny")."""
    namespace, sep, name = arch.partition(":")
    if not sep:
        return BACKBONES.get(arch)
    if namespace not in NAMESPACES:
        raise KeyError(
            f"unknown backbone namespace {namespace!r} in {arch!r}"
            f"{closest(namespace, NAMESPACES)}; known: {', '.join(NAMESPACES)}"
        )
    return NAMESPACES[namespace](name)


def build_backbone(arch: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by name; it has `feature_dim` and `facts`."""
    return constructor(arch)(**kwargs)
