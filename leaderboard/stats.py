"""The leaderboard's uncertainty: 95% intervals for a cell and tests between two rows.

- Several seeds (n >= 2): Student's t interval over the seeds' values, mean ± t(0.975, n-1)·s/√n.
- One run of a classification task: a percentile bootstrap over the test images, from the
  per-image top-1 hits the record keeps (sslbench.results.HITS_KEY).
- Two rows of a classification column: a paired bootstrap over the same test images of the
  difference of their per-image accuracies; the rows are indistinguishable when its 95% interval
  holds 0. A row with several seeds has its seeds drawn with replacement in every resample too (a
  two-level bootstrap), so the test carries the spread between pretraining runs as well as the
  test set's, not the test set's alone.
- Two rows of another column (detection, segmentation): Welch's t-test over seeds (p >= 0.05:
  indistinguishable) when both have n >= 2; otherwise no test is possible.

Resampling draws from a fixed seed, so a board is the same every time it is built.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


def seed_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean of `values` (at least two)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("a t interval needs at least two values")
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


CHUNK = 100  # resamples drawn at once: bounds memory at CHUNK × images per row


def _resampled_means(per_image: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `per_image` (images on the last axis) over `resamples` draws of the images with
    replacement, (..., resamples); one index set serves every leading row, which is what pairs
    them. Drawn CHUNK resamples at a time: the same numbers as one draw, without a resamples ×
    images index (800 MB for ImageNet's 50,000 validation images)."""
    n = per_image.shape[-1]
    means = []
    for start in range(0, resamples, CHUNK):
        index = rng.integers(0, n, (min(CHUNK, resamples - start), n))
        means.append(per_image[..., index].mean(-1))
    return np.concatenate(means, axis=-1)


def _resampled_seeds(per_seed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(seeds, resamples) means → one mean per resample over the seeds drawn with replacement;
    a single seed is taken as it is (nothing to draw)."""
    seeds, resamples = per_seed.shape
    if seeds == 1:
        return per_seed[0]
    drawn = rng.integers(0, seeds, (resamples, seeds))
    return per_seed[drawn, np.arange(resamples)[:, None]].mean(1)


def bootstrap_interval(
    per_image: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval (in %) of the mean of per-image scores in [0, 1]."""
    rng = np.random.default_rng(seed)
    means = _resampled_means(np.asarray(per_image, dtype=np.float64), resamples, rng)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(100 * lo), float(100 * hi)


def paired_difference_interval(
    a: np.ndarray,
    b: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval (in points) of mean(a) − mean(b) over the same images.

    `a`, `b`: per-image scores of one run each, (images,), or of several seeds, (seeds, images);
    each resample draws the images once for both rows and, for a row with several seeds, its
    seeds with replacement."""
    a, b = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (a, b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores of different lengths: {a.shape[1]} vs {b.shape[1]}")
    rng = np.random.default_rng(seed)
    if len(a) == len(b) == 1:  # one run each: resample the per-image differences
        diffs = _resampled_means(a[0] - b[0], resamples, rng)
    else:
        per_seed = _resampled_means(np.concatenate([a, b]), resamples, rng)
        diffs = _resampled_seeds(per_seed[: len(a)], rng) - _resampled_seeds(
            per_seed[len(a) :], rng
        )
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(100 * lo), float(100 * hi)


def indistinguishable_paired(a: np.ndarray, b: np.ndarray) -> bool:
    lo, hi = paired_difference_interval(a, b)
    return lo <= 0 <= hi


def indistinguishable_seeds(a: list[float], b: list[float], alpha: float = 1 - CONFIDENCE) -> bool:
    """Welch's t-test of two rows' seed values (each n >= 2); equal values are indistinguishable."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values per row")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return bool(np.mean(a) == np.mean(b))
    return bool(stats.ttest_ind(a, b, equal_var=False).pvalue >= alpha)
