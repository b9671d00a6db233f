"""The two-view augmentation pipelines of SimCLR, MoCo v2 and BYOL, seedable
(docs/methods.md#augmentations).

Each pipeline is crop → colour jitter → grayscale → blur → solarize → flip → normalise; the ops
after the crop are pointwise or isotropic, so this order has the same distribution as each
paper's own. Interpolation follows the source repositories: bilinear for SimCLR and MoCo v2
(also MoCo v3, whose code keeps torchvision's default), bicubic for the BYOL pipeline (BYOL,
Barlow Twins and VICReg resize with bicubic).

Only torchvision's v1 transforms are used; they draw every random number from torch's global
generator, so seeding it inside `torch.random.fork_rng` makes a view a function of (image, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from sslbench.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIPELINES",
    "BLUR_MODES",
    "build_view_transforms",
    "MultiViewTransform",
    "build_eval_transform",
]


@dataclass(frozen=True)
class ViewRecipe:
    """One view's random ops; probabilities of 0 drop the op."""

    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class PipelineRecipe:
    crop_min_scale: float
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    interpolation: T.InterpolationMode
    views: tuple[ViewRecipe, ViewRecipe]


_SYMMETRIC = (ViewRecipe(blur_p=0.5, solarize_p=0.0),) * 2
RECIPES = {
    # SimCLR colour strength s=1: (0.8s, 0.8s, 0.8s, 0.2s).
    "simclr": PipelineRecipe(0.08, (0.8, 0.8, 0.8, 0.2), T.InterpolationMode.BILINEAR, _SYMMETRIC),
    "mocov2": PipelineRecipe(0.2, (0.4, 0.4, 0.4, 0.1), T.InterpolationMode.BILINEAR, _SYMMETRIC),
    # BYOL's asymmetric views: always blurred / rarely blurred but sometimes solarized.
    "byol": PipelineRecipe(
        0.08,
        (0.4, 0.4, 0.2, 0.1),
        T.InterpolationMode.BICUBIC,
        (ViewRecipe(blur_p=1.0, solarize_p=0.0), ViewRecipe(blur_p=0.1, solarize_p=0.2)),
    ),
}
PIPELINES = tuple(RECIPES)
BLUR_MODES = ("auto", "on", "off")
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range, torchvision's default
JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # on uint8 PIL images: pixels >= 128 are inverted (BYOL's x >= 0.5)
# SimCLR and the solo-learn CIFAR recipes drop blur on 32 px images: it erases what little is left.
MAX_SIZE_WITHOUT_BLUR = 32


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's kernel: radius = (size // 10) // 2, i.e. about 10% of the side, odd; at least 3."""
    return max(3, 2 * (image_size // 10 // 2) + 1)


def _use_blur(blur: str, image_size: int) -> bool:
    if blur not in BLUR_MODES:
        raise ValueError(f"unknown blur mode {blur!r}; valid: {', '.join(BLUR_MODES)}")
    return blur == "on" or (blur == "auto" and image_size > MAX_SIZE_WITHOUT_BLUR)


def resolve(
    pipeline: str, image_size: int, crop_min_scale: float | None = None, blur: str = "auto"
) -> tuple[PipelineRecipe, float, bool]:
    """The recipe, its crop's minimum scale and whether it blurs at this size: what the PIL path
    and the batched path (augment_batched.py) both build from."""
    if pipeline not in RECIPES:
        raise ValueError(
            f"unknown augmentation pipeline {pipeline!r}; valid: {', '.join(PIPELINES)}"
        )
    recipe = RECIPES[pipeline]
    min_scale = recipe.crop_min_scale if crop_min_scale is None else crop_min_scale
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {min_scale}")
    return recipe, min_scale, _use_blur(blur, image_size)


def build_view_transforms(
    pipeline: str, image_size: int, crop_min_scale: float | None = None, blur: str = "auto"
) -> list[Callable]:
    """One PIL → normalised tensor transform per view (two), as in the pipeline's paper."""
    recipe, min_scale, with_blur = resolve(pipeline, image_size, crop_min_scale, blur)

    def view(v: ViewRecipe) -> T.Compose:
        ops: list[Callable] = [
            T.RandomResizedCrop(
                image_size,
                scale=(min_scale, 1.0),
                ratio=CROP_RATIO,
                interpolation=recipe.interpolation,
            ),
            T.RandomApply([T.ColorJitter(*recipe.jitter)], p=JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
        ]
        if with_blur and v.blur_p > 0:
            blur_op = T.GaussianBlur(blur_kernel_size(image_size), sigma=BLUR_SIGMA)
            ops.append(T.RandomApply([blur_op], p=v.blur_p))
        if v.solarize_p > 0:
            ops.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=v.solarize_p))
        ops += [
            T.RandomHorizontalFlip(p=FLIP_P),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
        return T.Compose(ops)

    return [view(v) for v in recipe.views]


def view_seed(seed: int, view_index: int) -> int:
    """A well-mixed 64-bit seed for one view, so views of one image, and nearby seeds,
    decorrelate."""
    words = [seed & (2**64 - 1), view_index]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


class MultiViewTransform:
    """Applies each view transform under its own seed; the views depend only on (image, seed).

    The global torch RNG is forked, not consumed, so the result is the same whatever ran before,
    in whatever order samples are drawn, in whichever DataLoader worker.
    """

    def __init__(self, view_transforms: Sequence[Callable]):
        self.view_transforms = list(view_transforms)

    def __call__(self, img: Image.Image, seed: int) -> list[torch.Tensor]:
        views = []
        for index, transform in enumerate(self.view_transforms):
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also reseed CUDA's, which
                # fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(view_seed(seed, index))
                views.append(transform(img))
        return views

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.view_transforms})"
