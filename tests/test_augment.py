"""Two-view augmentations: the papers' parameters, and views that depend only on (image, seed)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pretrain.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIPELINES,
    MultiViewTransform,
    blur_kernel_size,
    build_eval_transform,
    build_view_transforms,
)


@pytest.fixture(scope="module")
def image():
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def ops_of(compose: T.Compose, kind: type) -> list[tuple[float, object]]:
    """(probability, op) for every op of `kind`, looking inside RandomApply."""
    found = []
    for op in compose.transforms:
        if isinstance(op, T.RandomApply):
            found += [(op.p, inner) for inner in op.transforms if isinstance(inner, kind)]
        elif isinstance(op, kind):
            found.append((getattr(op, "p", 1.0), op))
    return found


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("size", [32, 64])
def test_views_shape_and_dtype(image, pipeline, size):
    views = MultiViewTransform(build_view_transforms(pipeline, size))(image, seed=3)
    assert len(views) == 2
    for v in views:
        assert v.shape == (3, size, size) and v.dtype == torch.float32


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_views_depend_only_on_image_and_seed(image, pipeline):
    transform = MultiViewTransform(build_view_transforms(pipeline, 64))
    first = transform(image, seed=7)
    torch.rand(1000)  # consume the global generator
    transform(image, seed=8)  # and draw another sample in between
    state = torch.get_rng_state()
    again = transform(image, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "the global generator must not advance"
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    shipped = pickle.loads(pickle.dumps(transform))  # as to a spawned DataLoader worker
    for a, b in zip(first, shipped(image, seed=7)):
        assert torch.equal(a, b)
    other = transform(image, seed=8)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1]), "the two views of one image must differ"


def test_byol_views_are_asymmetric():
    view1, view2 = build_view_transforms("byol", 64)
    ((blur1_p, blur1),) = ops_of(view1, T.GaussianBlur)
    ((blur2_p, blur2),) = ops_of(view2, T.GaussianBlur)
    assert (blur1_p, blur2_p) == (1.0, 0.1)
    for blur in (blur1, blur2):
        assert blur.sigma == (0.1, 2.0) and blur.kernel_size == (7, 7)
    assert ops_of(view1, T.RandomSolarize) == []
    ((solarize_p, solarize),) = ops_of(view2, T.RandomSolarize)
    assert solarize_p == 0.2 and solarize.threshold == 128
    ((jitter_p, jitter),) = ops_of(view1, T.ColorJitter)
    assert jitter_p == 0.8
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
    assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
    ((_, crop),) = ops_of(view1, T.RandomResizedCrop)
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC


@pytest.mark.parametrize(
    "pipeline,min_scale,jitter,interpolation",
    [
        ("simclr", 0.08, (0.8, 0.8, 0.8, 0.2), T.InterpolationMode.BILINEAR),
        ("mocov2", 0.2, (0.4, 0.4, 0.4, 0.1), T.InterpolationMode.BILINEAR),
    ],
)
def test_symmetric_pipelines(pipeline, min_scale, jitter, interpolation):
    for view in build_view_transforms(pipeline, 64):
        ((_, crop),) = ops_of(view, T.RandomResizedCrop)
        assert crop.scale == (min_scale, 1.0) and crop.size == (64, 64)
        assert crop.interpolation == interpolation
        ((jitter_p, cj),) = ops_of(view, T.ColorJitter)
        b, c, s, h = jitter
        assert jitter_p == 0.8
        assert [*cj.brightness, *cj.contrast, *cj.saturation, *cj.hue] == pytest.approx(
            [1 - b, 1 + b, 1 - c, 1 + c, 1 - s, 1 + s, -h, h]
        )
        assert [p for p, _ in ops_of(view, T.RandomGrayscale)] == [0.2]
        assert [p for p, _ in ops_of(view, T.GaussianBlur)] == [0.5]
        assert [p for p, _ in ops_of(view, T.RandomHorizontalFlip)] == [0.5]
        assert ops_of(view, T.RandomSolarize) == []


def test_crop_min_scale_override():
    for view in build_view_transforms("byol", 64, crop_min_scale=0.2):
        ((_, crop),) = ops_of(view, T.RandomResizedCrop)
        assert crop.scale == (0.2, 1.0)
    with pytest.raises(ValueError, match="crop_min_scale"):
        build_view_transforms("byol", 64, crop_min_scale=0.0)


def test_blur_modes_and_kernel():
    assert [blur_kernel_size(s) for s in (32, 64, 96, 224)] == [3, 7, 9, 23]

    def has_blur(size, mode):
        return bool(ops_of(build_view_transforms("mocov2", size, blur=mode)[0], T.GaussianBlur))

    assert not has_blur(32, "auto") and has_blur(33, "auto")
    assert has_blur(32, "on") and not has_blur(224, "off")
    # Without blur, BYOL's second view still solarizes.
    assert ops_of(build_view_transforms("byol", 32)[1], T.RandomSolarize)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match=r"'swav'.*simclr, mocov2, byol"):
        build_view_transforms("swav", 32)
    with pytest.raises(ValueError, match=r"'sometimes'.*auto, on, off"):
        build_view_transforms("simclr", 32, blur="sometimes")


def test_normalisation_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)
    for view in build_view_transforms("simclr", 32):
        ((_, norm),) = ops_of(view, T.Normalize)
        assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD
    black = build_eval_transform(32)(Image.new("RGB", (50, 40)))
    expected = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(black[:, 0, 0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,resize", [(32, (32, 32)), (96, 110), (224, 256)])
def test_eval_transform(image, size, resize):
    transform = build_eval_transform(size)
    assert transform.transforms[0].size == resize
    torch.rand(10)
    out = transform(image)
    assert out.shape == (3, size, size) and torch.equal(out, transform(image))
