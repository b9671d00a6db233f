"""Backbones by name: torchvision's ResNets (resnet.py) and timm's ViTs and models (vit.py).

A family is one module that registers its constructors in `BACKBONES` (or a namespace such as
"timm:"); every backbone reports its own `feature_dim` and `facts` (stages, structure: base.py).
"""

from . import resnet, vit
from .base import BACKBONES, BackboneFacts, Stage, build_backbone, constructor
from .resnet import ResNetBackbone

__all__ = [
    "BACKBONES",
    "BackboneFacts",
    "ResNetBackbone",
    "Stage",
    "build_backbone",
    "constructor",
    "resnet",
    "vit",
]
