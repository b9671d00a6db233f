"""The deterministic evaluation transform every evaluator (and the pretraining monitors) share.

Normalisation is the backbone's: ImageNet's mean/std for everything sslbench pretrains, the
manifest's "normalize" entry for an imported checkpoint (artifact.input_normalization).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Below this side length images are resized directly: the ImageNet resize-then-crop would cut
# away an eighth of an already tiny image.
SMALL_IMAGE = 96


def build_eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable:
    """ImageNet convention (resize to size/0.875, centre crop) for large images; resize for
    small ones."""
    if image_size >= SMALL_IMAGE:
        resize = [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size)]
    else:
        resize = [T.Resize((image_size, image_size))]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def pixel_stats(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> tuple[list[float], list[float]]:
    """The normalisation on the 0-255 pixel scale detectron2 and mmseg work in."""
    return ([round(255 * m, 3) for m in mean], [round(255 * s, 3) for s in std])
