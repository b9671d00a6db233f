"""The batched on-device two views: the same distribution as the PIL path, drawn per image, and a
function of (seed, epoch, batch) only.

Distribution checks compare many draws with an independent reference (torchvision's own
samplers and functional ops, the PIL pipeline of pretrain/augment.py) by a two-sample or
one-sample Kolmogorov-Smirnov test or a binomial bound. Every sample is seeded, so each test is
deterministic; the thresholds are the tests' 0.1% critical values, so a correct implementation
passes for all but about one seed in a thousand, while the errors they guard against (one draw
per batch, a crop drawn by side instead of area, a fixed jitter order, a missing op, a wrong
interpolation) move the statistics far past them (each test's comment says how far).
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from method_checks import resumed_state_is_bit_exact
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from pretrain.augment import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIPELINES,
    RECIPES,
    MultiViewTransform,
    build_view_transforms,
)
from pretrain.augment_batched import (
    BatchedTwoViews,
    DecodeResize,
    batch_generator,
    build_augmentation,
    on_accelerator,
)
from pretrain.config import load_pretrain_config

N = 10_000  # draws per distribution check
KS_ALPHA = 1e-3


def binomial_ok(hits: torch.Tensor, p: float) -> bool:
    """The observed rate is within 3.3 standard errors of p (two-sided 0.1%)."""
    n = hits.numel()
    return abs(hits.double().mean().item() - p) <= 3.3 * math.sqrt(p * (1 - p) / n) + 1e-12


def ops_of(compose: T.Compose, kind: type) -> list[tuple[float, object]]:
    """(probability, op) for every op of `kind` in a PIL view, looking inside RandomApply."""
    found = []
    for op in compose.transforms:
        if isinstance(op, T.RandomApply):
            found += [(op.p, inner) for inner in op.transforms if isinstance(inner, kind)]
        elif isinstance(op, kind):
            found.append((getattr(op, "p", 1.0), op))
    return found


def draws(pipeline: str, size: int, sizes: torch.Tensor, seed: int = 0, **kwargs):
    return BatchedTwoViews(pipeline, size, **kwargs).draw(batch_generator(seed, 0, 0), sizes)


@pytest.mark.parametrize("height,width,min_scale", [(64, 64, 0.08), (48, 80, 0.2), (200, 24, 0.08)])
def test_crop_boxes_follow_torchvision(height, width, min_scale):
    """Scale (area fraction), log aspect and the box centre against torchvision's
    RandomResizedCrop.get_params on an image of the same size; the 200×24 image falls back to
    its centre crop most of the time. Drawing the side instead of the area uniformly shifts the
    scale's KS statistic to 0.10 (measured; critical value here 0.028)."""
    sizes = torch.tensor([[height, width]]).expand(N, 2)
    box = draws("simclr", 32, sizes, crop_min_scale=min_scale)[0].box.double()
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    ref = torch.tensor(
        [
            T.RandomResizedCrop.get_params(image, [min_scale, 1.0], list(CROP_RATIO))
            for _ in range(N)
        ],
        dtype=torch.float64,
    )

    def features(b):
        top, left, h, w = b.unbind(1)
        return {
            "scale": h * w / (height * width),
            "log aspect": (w / h).log(),
            "centre y": (top + h / 2) / height,
            "centre x": (left + w / 2) / width,
        }

    ours, theirs = features(box), features(ref)
    for name in ours:
        result = stats.ks_2samp(ours[name].numpy(), theirs[name].numpy())
        assert result.pvalue > KS_ALPHA, (name, result)
    assert (box[:, 0] >= 0).all() and (box[:, 0] + box[:, 2] <= height).all()
    assert (box[:, 1] >= 0).all() and (box[:, 1] + box[:, 3] <= width).all()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_random_ops_follow_the_pil_pipeline(pipeline):
    """Each view's rates (jitter, grayscale, blur, solarize, flip) are the probabilities of the
    PIL view's own ops, its jitter factors and blur sigmas are uniform on those ops' ranges, and
    every image draws its own order of the four jitter ops, uniform over the 24 orders."""
    sizes = torch.tensor([[64, 64]]).expand(N, 2)
    pil_views = build_view_transforms(pipeline, 64)
    for params, view in zip(draws(pipeline, 64, sizes), pil_views):
        ((jitter_p, jitter),) = ops_of(view, T.ColorJitter)
        assert binomial_ok(params.jitter, jitter_p)
        ((gray_p, _),) = ops_of(view, T.RandomGrayscale)
        assert binomial_ok(params.gray, gray_p)
        ((flip_p, _),) = ops_of(view, T.RandomHorizontalFlip)
        assert binomial_ok(params.flip, flip_p)
        blurs = ops_of(view, T.GaussianBlur)
        assert binomial_ok(params.blur, blurs[0][0] if blurs else 0.0)
        solarize = ops_of(view, T.RandomSolarize)
        assert binomial_ok(params.solarize, solarize[0][0] if solarize else 0.0)
        for column, (low, high) in enumerate(
            [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
        ):
            result = stats.kstest(
                params.factors[:, column].numpy(), "uniform", args=(low, high - low)
            )
            assert result.pvalue > KS_ALPHA, (column, result)
        if blurs:
            low, high = blurs[0][1].sigma
            assert (
                stats.kstest(params.sigma.numpy(), "uniform", args=(low, high - low)).pvalue
                > KS_ALPHA
            )
        code = (params.order * torch.tensor([64, 16, 4, 1])).sum(1)
        counts = torch.bincount(code, minlength=256)[counts_index()]
        assert counts.sum() == N, "every order must be a permutation of the four ops"
        assert stats.chisquare(counts.numpy()).pvalue > KS_ALPHA


def counts_index() -> torch.Tensor:
    """The base-4 codes of the 24 permutations of (0, 1, 2, 3)."""
    return torch.tensor(
        [sum(d * 4 ** (3 - i) for i, d in enumerate(p)) for p in itertools.permutations(range(4))]
    )


def pil_gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L"): 299/587/114 per mille (torchvision's tensor ops use 0.2989 for red,
    which would differ from the PIL path by up to 1e-4 per op)."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def blend(x: torch.Tensor, other, factor: float) -> torch.Tensor:
    """ColorJitter's brightness (other = 0), contrast (the gray mean) and saturation (the gray
    image), as torchvision defines them."""
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def reference_view(image: torch.Tensor, p, i: int, pipeline: str, size: int) -> torch.Tensor:
    """View i of the batch by torchvision's functional ops on one float64 image, in the PIL path's
    order (crop, jitter in the drawn order, grayscale, blur, solarize, flip, normalise)."""
    recipe = RECIPES[pipeline]
    x = TF.resized_crop(
        image, *p.box[i].tolist(), [size, size], interpolation=recipe.interpolation, antialias=True
    ).clamp(0, 1)
    if p.jitter[i]:
        b, c, s, h = p.factors[i].tolist()
        ops = [
            lambda v: blend(v, 0, b),
            lambda v: blend(v, pil_gray(v).mean(), c),
            lambda v: blend(v, pil_gray(v), s),
            lambda v: TF.adjust_hue(v, h),
        ]
        for op in p.order[i].tolist():
            x = ops[op](x)
    if p.gray[i]:
        x = pil_gray(x).expand(3, -1, -1)
    if p.blur[i]:
        k = BatchedTwoViews(pipeline, size).kernel
        x = TF.gaussian_blur(x, [k, k], [p.sigma[i].item()] * 2)
    if p.solarize[i]:
        x = torch.where(x >= 0.5, 1 - x, x)
    if p.flip[i]:
        x = TF.hflip(x)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_views_equal_torchvision_functional_ops(pipeline):
    """With the draws fixed, each image's view is torchvision's functional pipeline on that image
    (antialiased resized crop with the recipe's interpolation, ColorJitter's formulas in the
    image's order, grayscale, blur, solarize, flip), to float32 round-off (1e-4 in normalised
    units, a 40th of a uint8 level)."""
    size, count = 40, 48  # above 32 px, so the blur is on
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    augment = BatchedTwoViews(pipeline, size)
    for p in augment.draw(batch_generator(1, 2, 3), torch.tensor([[size, size]] * count)):
        got = augment.apply(images, p)
        for i in range(count):
            want = reference_view(images[i].double() / 255, p, i, pipeline, size).float()
            torch.testing.assert_close(got[i], want, atol=1e-4, rtol=0, msg=f"image {i}")


def test_crop_is_drawn_on_the_original_image():
    """Workers squash an image to the decode square; the crop still covers the box drawn in the
    original's pixels. On a ramp image (red = x / width, green = y / height) the view's ramps
    match torchvision's crop of the original, to the resampling's half-pixel border shift."""
    height, width, size = 30, 50, 16
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    ramp = torch.stack([x / width, y / height, torch.zeros_like(x)])
    pil = Image.fromarray((ramp * 255).round().byte().permute(1, 2, 0).numpy())
    square, original = DecodeResize(40, T.InterpolationMode.BILINEAR)(pil, seed=0)
    assert square.shape == (3, 40, 40) and original.tolist() == [height, width]
    augment = BatchedTwoViews("mocov2", size)
    p = augment.draw(batch_generator(0, 0, 0), original[None].expand(8, 2))[0]
    p.jitter[:], p.gray[:], p.flip[:] = False, False, False
    got = augment.apply(square[None].expand(8, -1, -1, -1).contiguous(), p)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for i in range(8):
        want = TF.resized_crop(ramp, *p.box[i].tolist(), [size, size], antialias=True)
        assert (got[i] * std + mean - want)[:2].abs().max() < 0.03, p.box[i]


def source_images(count: int, height: int, width: int) -> list[Image.Image]:
    """Colourful images with structure at two scales: a random 4×4 colour grid upsampled, plus
    pixel noise at half its contrast (what blur and resampling act on)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        coarse = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), float)
        fine = rng.integers(0, 256, (height, width, 3))
        out.append(Image.fromarray((coarse * 2 / 3 + fine / 3).round().astype(np.uint8)))
    return out


def view_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: each channel's mean, the pixel std, the mean |horizontal gradient| (sharpness:
    blur and resampling) and the colourfulness (mean |channel - pixel mean|, grayscale: 0)."""
    pixels = (
        views * torch.tensor(IMAGENET_STD)[:, None, None]
        + torch.tensor(IMAGENET_MEAN)[:, None, None]
    )
    stats_ = {f"mean {c}": pixels[:, i].mean((1, 2)) for i, c in enumerate("rgb")}
    stats_["std"] = pixels.std((1, 2, 3))
    stats_["sharpness"] = (pixels[..., 1:] - pixels[..., :-1]).abs().mean((1, 2, 3))
    stats_["colourfulness"] = (pixels - pixels.mean(1, keepdim=True)).abs().mean((1, 2, 3))
    # Rounded far below a uint8 level, so that float round-off (a gray view's channels after
    # normalising and back) is no difference.
    return {name: (value * 1e5).round() for name, value in stats_.items()}


@pytest.mark.parametrize(
    "pipeline,height,width,decode_size",
    [("simclr", 40, 40, 40), ("mocov2", 40, 40, 40), ("byol", 40, 40, 40), ("simclr", 40, 56, 56)],
)  # squashed to 56², stretched in height: no detail lost
def test_pixel_statistics_match_the_pil_path(pipeline, height, width, decode_size):
    """The same 256 source images, 4 draws each, at 40 px (blur on): each per-view statistic's
    distribution over 1,024 views matches the PIL path's (two-sample KS, critical value 0.086 at
    0.1%; measured: at most 0.071). The sharpness statistic (pixel noise in the sources) sees
    the blur and the resampling: measured distances of wrong variants were 0.24 without the
    blur, 0.18 bilinear for BYOL's bicubic, 0.57 BYOL's views swapped, 0.12 SimCLR's crop from
    0.5 instead of 0.08, 0.22 MoCo v2's jitter strength for SimCLR's, and 0.27 decoding a 40×56
    image to 40² (detail the PIL path keeps is lost: decode_size must not shrink the image)."""
    size, repeats = 40, 4
    images = source_images(256, height, width)
    pil = MultiViewTransform(build_view_transforms(pipeline, size))
    pil_views = [
        torch.stack(v)
        for v in zip(
            *[pil(img, seed=1000 * r + i) for r in range(repeats) for i, img in enumerate(images)]
        )
    ]
    decode = DecodeResize(decode_size, RECIPES[pipeline].interpolation)
    decoded = [decode(img, 0) for img in images]
    pixels = torch.stack([d[0] for d in decoded]).repeat(repeats, 1, 1, 1)
    sizes = torch.stack([d[1] for d in decoded]).repeat(repeats, 1)
    ours = BatchedTwoViews(pipeline, size)(pixels, sizes, (0, 0, 0))
    for view, (a, b) in enumerate(zip(ours, pil_views)):
        ours_stats, pil_stats = view_statistics(a), view_statistics(b)
        for name in ours_stats:
            result = stats.ks_2samp(ours_stats[name].numpy(), pil_stats[name].numpy())
            assert result.pvalue > KS_ALPHA, (view, name, result)


def test_views_are_a_function_of_seed_epoch_and_batch():
    """The same (seed, epoch, batch) gives identical views whatever ran before; another batch
    index, epoch or seed gives other views; every image of a batch draws its own crop and
    colours; a batch split over processes gives each its rows of the one-process views."""
    images = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    sizes = torch.tensor([[24, 24]] * 16)
    augment = BatchedTwoViews("byol", 24)
    first = augment(images, sizes, (5, 1, 7))
    torch.rand(100)
    again = augment(images, sizes, (5, 1, 7))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for key in [(5, 1, 8), (5, 2, 7), (6, 1, 7)]:
        assert not torch.equal(augment(images, sizes, key)[0], first[0]), key
    assert not torch.equal(first[0], first[1]), "the two views must differ"
    same = images[:1].expand(16, -1, -1, -1).contiguous()
    views = augment(same, sizes, (5, 1, 7))[0]
    assert len({v.numpy().tobytes() for v in views}) == 16, "images must draw independently"
    p = augment.draw(batch_generator(5, 1, 7), sizes)[0]
    assert len({tuple(b) for b in p.box.tolist()}) > 12
    assert len(set(p.factors[:, 0].tolist())) == 16
    halves = [augment(images[r * 8 : (r + 1) * 8], sizes[:8], (5, 1, 7), (r, 2)) for r in (0, 1)]
    for view in (0, 1):
        torch.testing.assert_close(
            torch.cat([h[view] for h in halves]), first[view], rtol=0, atol=1e-6
        )


def test_decode_resize_keeps_an_image_of_the_right_size():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tensor, size = DecodeResize(32, T.InterpolationMode.BICUBIC)(Image.fromarray(pixels), 0)
    assert tensor.dtype == torch.uint8 and size.tolist() == [32, 32]
    assert torch.equal(tensor, torch.from_numpy(pixels).permute(2, 0, 1))
    gray = Image.fromarray(pixels[..., 0])
    tensor, size = DecodeResize(16, T.InterpolationMode.BILINEAR)(gray, 0)
    assert tensor.shape == (3, 16, 16) and size.tolist() == [32, 32]


def test_device_setting_and_bad_input():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not on_accelerator("auto", cpu) and on_accelerator("auto", cuda)
    assert on_accelerator("accelerator", cpu) and not on_accelerator("cpu", cuda)
    with pytest.raises(ValueError, match=r"augment.device='gpu'.*auto, cpu, accelerator"):
        on_accelerator("gpu", cpu)
    accelerator = ["method.name=simsiam", "augment.device=accelerator"]
    cfg = load_pretrain_config([], [*accelerator, "augment.decode_size=0"])
    with pytest.raises(ValueError, match="augment.decode_size=0"):
        build_augmentation(cfg, cpu)
    cfg = load_pretrain_config([], [*accelerator, "augment.pipeline=byol"])
    transform, augment = build_augmentation(cfg, cpu)
    assert isinstance(transform, DecodeResize) and transform.size == cfg.data.image_size
    assert augment.recipe is RECIPES["byol"]
    transform, augment = build_augmentation(load_pretrain_config([], ["method.name=simsiam"]), cpu)
    assert isinstance(transform, MultiViewTransform) and augment is None
    with pytest.raises(ValueError, match=r"uint8 batch of square images.*float32"):
        BatchedTwoViews("simclr", 16)(
            torch.zeros(2, 3, 16, 16), torch.tensor([[16, 16]] * 2), (0, 0, 0)
        )


def test_resume_with_accelerator_augmentation_is_bit_exact(shapes_root, tmp_path):
    """The loop augments uint8 batches on the training device (the CPU here); a run SIGKILLed
    after a checkpoint and resumed ends with the same weights as one run straight through."""
    resumed_state_is_bit_exact("simsiam", shapes_root, tmp_path, "augment.device=accelerator")
    saved = load_pretrain_config([tmp_path / "killed" / "config.yaml"], [])
    assert saved.augment.device == "accelerator"
