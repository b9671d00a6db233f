"""The deterministic evaluation transform every evaluator (and the pretraining monitors) share."""

from __future__ import annotations

from typing import Callable

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Below this side length images are resized directly: the ImageNet resize-then-crop would cut
# away an eighth of an already tiny image.
SMALL_IMAGE = 96


def build_eval_transform(image_size: int) -> Callable:
    """ImageNet convention (resize to size/0.875, centre crop) for large images; resize for small."""
    if image_size >= SMALL_IMAGE:
        resize = [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size)]
    else:
        resize = [T.Resize((image_size, image_size))]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pixel_stats() -> tuple[list[float], list[float]]:
    """The pretraining normalisation on the 0-255 pixel scale detectron2 and mmseg work in."""
    return ([round(255 * m, 3) for m in IMAGENET_MEAN], [round(255 * s, 3) for s in IMAGENET_STD])
