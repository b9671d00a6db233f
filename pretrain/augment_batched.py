"""The two-view pipelines of pretrain/augment.py as batched tensor ops on the training device,
with an independent random draw per image (docs/methods.md#augmentations).

torchvision's batched v2 transforms draw one set of parameters per call, i.e. per batch, which
would give every image of a batch the same crop and colours. kornia draws per image, but its
ColorJitter draws the order of its four ops once per batch (torchvision's draws it per image),
its resized crop resamples without antialiasing and assumes one input size for the batch, and
its samplers take no generator. So the parameters are drawn here, per image, from a
`torch.Generator` seeded by (seed, epoch, batch), and kornia supplies the per-image colour, hue
and blur kernels; the crop is a separable resampling matrix per image with PIL's antialiasing
filters, into which the flip is folded.

DataLoader workers only decode and resize each image to a fixed square (`DecodeResize`), uint8,
and report its original size: crops are drawn in the original's coordinates, exactly as
torchvision's RandomResizedCrop draws them, and mapped onto the square. The views have the PIL
path's distribution when the square does not shrink the image (augment.decode_size at least its
longer side); a smaller square trades the detail of small crops for less to copy. The other ops are
pointwise or isotropic, so the PIL path's order (crop, jitter, grayscale, blur, solarize, flip)
is kept with the flip moved into the crop.

All draws are made on the CPU in float64 for the whole global batch, and each process takes its
rows: the views depend only on (images, seed, epoch, batch), not on the device the draws would
otherwise run on, nor on how the global batch is split over processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import gaussian_blur2d
from omegaconf import DictConfig
from PIL import Image
from torchvision.transforms import InterpolationMode

from .augment import (
    BLUR_SIGMA,
    CROP_RATIO,
    FLIP_P,
    GRAYSCALE_P,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_P,
    SOLARIZE_THRESHOLD,
    MultiViewTransform,
    ViewRecipe,
    blur_kernel_size,
    build_view_transforms,
    resolve,
)

__all__ = [
    "AUGMENT_DEVICES",
    "BatchedTwoViews",
    "DecodeResize",
    "ViewParams",
    "batch_generator",
    "build_augmentation",
    "on_accelerator",
]

AUGMENT_DEVICES = ("auto", "cpu", "accelerator")
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before its fallback
# What DecodeResize hands PIL for the recipe's interpolation.
_PIL_RESAMPLE = {
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
}
_CUBIC_A = -0.5  # PIL's (and torch's antialiased) bicubic
# A pixel of continuous value x becomes uint8 round(255 x) in the PIL path, which inverts values
# >= SOLARIZE_THRESHOLD: the same as inverting x >= (threshold - 0.5) / 255.
_SOLARIZE_AT = (SOLARIZE_THRESHOLD - 0.5) / 255


def on_accelerator(setting: str, device: torch.device) -> bool:
    """Whether augment.device=`setting` augments batches on the training device ('auto': when that
    device is CUDA) rather than in DataLoader workers."""
    if setting not in AUGMENT_DEVICES:
        raise ValueError(
            f"augment.device={setting!r}; expected one of {', '.join(AUGMENT_DEVICES)}"
        )
    return setting == "accelerator" or (setting == "auto" and device.type == "cuda")


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """A CPU generator for one global batch, its seed well mixed from (seed, epoch, batch)."""
    words = [x & (2**64 - 1) for x in (seed, epoch, batch)]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def build_augmentation(
    cfg: DictConfig, device: torch.device
) -> tuple[Callable, BatchedTwoViews | None]:
    """The DataLoader's per-image transform ((image, seed) → sample) and, when augment.device
    puts the random ops on `device`, the batched two views the loop applies to each batch."""
    a, size = cfg.augment, cfg.data.image_size
    if not on_accelerator(a.device, device):
        views = build_view_transforms(a.pipeline, size, a.crop_min_scale, a.blur)
        return MultiViewTransform(views), None
    decode_size = size if a.decode_size is None else a.decode_size
    if decode_size < 1:
        raise ValueError(f"augment.decode_size={decode_size}; expected a positive side length")
    batched = BatchedTwoViews(a.pipeline, size, a.crop_min_scale, a.blur)
    return DecodeResize(decode_size, batched.recipe.interpolation), batched


class DecodeResize:
    """The worker's part: an RGB image as a uint8 (3, size, size) tensor and its original
    (height, width). Takes (image, seed) like MultiViewTransform and ignores the seed: nothing
    random happens in the workers."""

    def __init__(self, size: int, interpolation: InterpolationMode):
        self.size, self.resample = size, _PIL_RESAMPLE[interpolation]

    def __call__(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        original = torch.tensor([image.height, image.width])
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        pixels = torch.from_numpy(np.asarray(image).copy())
        return pixels.permute(2, 0, 1).contiguous(), original

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resample={self.resample.name})"


@dataclass
class ViewParams:
    """One view's draws for a batch of B images (CPU tensors)."""

    size: torch.Tensor  # (B, 2) int64: the original's height, width
    box: torch.Tensor  # (B, 4) int64: top, left, height, width in the original's pixels
    flip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B,) bool: colour jitter applied
    factors: torch.Tensor  # (B, 4) float64: brightness, contrast, saturation, hue
    order: torch.Tensor  # (B, 4) int64: a permutation of the four jitter ops, per image
    gray: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) float64
    solarize: torch.Tensor  # (B,) bool


# Columns of one view's uniform draws.
_AREA = slice(0, CROP_ATTEMPTS)
_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _JITTER = 2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 1, 2 * CROP_ATTEMPTS + 2
_FACTORS = slice(_JITTER + 1, _JITTER + 5)
_ORDER = slice(_JITTER + 5, _JITTER + 9)
_GRAY_U, _BLUR_U, _SIGMA_U, _SOLARIZE_U, _FLIP_U = range(_JITTER + 9, _JITTER + 14)
_COLUMNS = _JITTER + 14


class BatchedTwoViews:
    """Both views of a uint8 batch from DecodeResize, as normalised float32 tensors on the batch's
    device: `views = BatchedTwoViews("byol", 64)(images, sizes, (seed, epoch, batch))`."""

    def __init__(
        self,
        pipeline: str,
        image_size: int,
        crop_min_scale: float | None = None,
        blur: str = "auto",
    ):
        self.recipe, self.min_scale, self.with_blur = resolve(
            pipeline, image_size, crop_min_scale, blur
        )
        self.pipeline, self.image_size = pipeline, image_size
        self.kernel = blur_kernel_size(image_size)

    def __call__(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        key: tuple[int, int, int],
        part: tuple[int, int] = (0, 1),
    ) -> list[torch.Tensor]:
        """`key` is (seed, epoch, batch index); `part` is (rank, world_size): `images` are rows
        rank·B … (rank+1)·B of a global batch of world_size·B."""
        rank, world_size = part
        draws = self.draw(
            batch_generator(*key), sizes, rows=rank * len(images), total=world_size * len(images)
        )
        return [self.apply(images, p) for p in draws]

    def draw(
        self,
        generator: torch.Generator,
        sizes: torch.Tensor,
        rows: int = 0,
        total: int | None = None,
    ) -> list[ViewParams]:
        """Both views' draws for images of original (height, width) `sizes`, rows `rows` … of a
        global batch of `total` (default: just these)."""
        total = len(sizes) if total is None else total
        if not 0 <= rows <= total - len(sizes):
            raise ValueError(f"rows {rows}…{rows + len(sizes)} outside a batch of {total}")
        u = torch.rand((total, 2, _COLUMNS), generator=generator, dtype=torch.float64)
        u = u[rows : rows + len(sizes)]
        sizes = sizes.long()
        return [self._view_params(u[:, i], sizes, v) for i, v in enumerate(self.recipe.views)]

    def _view_params(self, u: torch.Tensor, sizes: torch.Tensor, view: ViewRecipe) -> ViewParams:
        b, c, s, h = self.recipe.jitter
        low = torch.tensor([1 - b, 1 - c, 1 - s, -h], dtype=torch.float64)
        high = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, _SIGMA_U]
        return ViewParams(
            size=sizes,
            box=self._boxes(u, sizes.to(torch.float64)),
            flip=u[:, _FLIP_U] < FLIP_P,
            jitter=u[:, _JITTER] < JITTER_P,
            factors=low + (high - low) * u[:, _FACTORS],
            order=u[:, _ORDER].argsort(dim=1),
            gray=u[:, _GRAY_U] < GRAYSCALE_P,
            blur=(u[:, _BLUR_U] < view.blur_p) & self.with_blur,
            sigma=sigma,
            solarize=u[:, _SOLARIZE_U] < view.solarize_p,
        )

    def _boxes(self, u: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomResizedCrop.get_params for each image, vectorised: the first of
        CROP_ATTEMPTS (area, log-aspect) draws whose box fits, else the centre crop clamped to
        the ratio range."""
        height, width = sizes[:, :1], sizes[:, 1:]
        area = height * width * (self.min_scale + (1.0 - self.min_scale) * u[:, _AREA])
        low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        aspect = torch.exp(low + (high - low) * u[:, _RATIO])
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first True
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        height, width = height[:, 0], width[:, 0]
        top = (u[:, _TOP] * (height - h + 1)).floor()
        left = (u[:, _LEFT] * (width - w + 1)).floor()
        # The fallback: the whole image, cut to the nearest ratio in range, centred.
        ratio = width / height
        fw = torch.where(ratio > CROP_RATIO[1], (height * CROP_RATIO[1]).round(), width)
        fh = torch.where(ratio < CROP_RATIO[0], (width / CROP_RATIO[0]).round(), height)
        none = ~fits.any(dim=1)
        h, w = torch.where(none, fh, h), torch.where(none, fw, w)
        top = torch.where(none, torch.div(height - h, 2, rounding_mode="floor"), top)
        left = torch.where(none, torch.div(width - w, 2, rounding_mode="floor"), left)
        return torch.stack([top, left, h, w], dim=1).long()

    def apply(self, images: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """One view of `images` (uint8, B×3×S×S on any device) under draws `p`."""
        if (
            images.dtype != torch.uint8
            or images.ndim != 4
            or images.shape[1] != 3
            or images.shape[2] != images.shape[3]
        ):
            raise ValueError(
                f"expected a uint8 batch of square images (B, 3, S, S) from "
                f"DecodeResize, got {images.dtype} {tuple(images.shape)}"
            )
        side = images.shape[-1]
        # (op, images) for each position of each image's own jitter order.
        jitter = [(op, p.jitter & (p.order[:, k] == op)) for k in range(4) for op in range(4)]
        masks = [p.flip, p.gray, p.blur, p.solarize] + [mask for _, mask in jitter]
        box, sigma, *rest = _upload(
            [
                (p.box * (side / p.size).repeat(1, 2)).float(),
                p.sigma[p.blur].float(),
                *(p.factors[mask, op].float() for op, mask in jitter),
                *(m.nonzero()[:, 0] for m in masks),
            ],
            images.device,
        )
        factors, (flip, gray, blur, solarize, *chosen) = rest[: len(jitter)], rest[len(jitter) :]
        x = self._crop(images.float() / 255, box, flip)
        for (op, _), where, factor in zip(jitter, chosen, factors):
            _update(x, where, lambda v, op=op, f=factor: _JITTER_OPS[op](v, f))
        _update(x, gray, _grayscale)
        sigma = sigma[:, None].expand(-1, 2)
        _update(x, blur, lambda v: gaussian_blur2d(v, self.kernel, sigma, border_type="reflect"))
        _update(x, solarize, lambda v: torch.where(v >= _SOLARIZE_AT, 1 - v, v))
        mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
        return (x - mean) / std

    def _crop(self, x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Each image's box (top, left, height, width in x's pixels) resized to image_size², the
        images `flip` mirrored, as Wy · x · Wxᵀ."""
        side = x.shape[-1]
        rows = self._weights(box[:, 0], box[:, 2], side)
        cols = self._weights(box[:, 1], box[:, 3], side)
        _update(cols, flip, lambda w: w.flip(1))
        # Columns, then rows, each as one batched matmul over the three channels.
        b, n = len(x), self.image_size
        x = torch.bmm(x.reshape(b, 3 * side, side), cols.transpose(1, 2))
        x = torch.bmm(rows, x.view(b, 3, side, n).transpose(1, 2).reshape(b, side, 3 * n))
        x = x.view(b, n, 3, n).transpose(1, 2).contiguous()
        return x.clamp_(0, 1)  # bicubic overshoots; the PIL path's uint8 image clips

    def _weights(self, start: torch.Tensor, length: torch.Tensor, side: int) -> torch.Tensor:
        """(B, image_size, side) resampling matrices of PIL's resize of [start, start + length)
        to image_size pixels: the filter widened by the scale when shrinking (antialiasing),
        taps limited to the pixels whose centres lie in the box and normalised to sum 1."""
        mode = self.recipe.interpolation
        scale = (length / self.image_size)[:, None, None]
        out = torch.arange(self.image_size, device=start.device, dtype=torch.float32)
        centre = start[:, None, None] + (out[None, :, None] + 0.5) * scale
        pixel = torch.arange(side, device=start.device, dtype=torch.float32)[None, None] + 0.5
        t = ((pixel - centre) / scale.clamp(min=1.0)).abs()
        if mode == InterpolationMode.BILINEAR:
            w = (1 - t).clamp(min=0)
        else:
            a = _CUBIC_A
            near = ((a + 2) * t - (a + 3)) * t * t + 1
            far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
            w = torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))
        inside = (pixel > start[:, None, None]) & (pixel < (start + length)[:, None, None])
        w = w * inside
        return w / w.sum(dim=-1, keepdim=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.pipeline!r}, {self.image_size}, "
            f"crop_min_scale={self.min_scale}, blur={self.with_blur})"
        )


def _upload(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Small CPU tensors on `device` in one copy, pinned and asynchronous on CUDA: the host never
    waits for the device in the middle of a view."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])  # indices < 2**53
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, tensors)]


def _update(
    x: torch.Tensor, chosen: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """x[chosen] = fn(x[chosen]): fn sees the chosen images as one batch."""
    if len(chosen):
        x[chosen] = fn(x[chosen])


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L") weights, as three equal channels (RandomGrayscale's output)."""
    return rgb_to_grayscale(x).expand_as(x)


def _hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_hue(x, factor * (2 * math.pi))  # torchvision's factor is in turns


# ColorJitter's ops in torchvision's numbering (ColorJitter.get_params' fn_idx), with
# torchvision's formulas, each clamped to [0, 1].
_JITTER_OPS = (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
    _hue,
)
