"""Deterministic class-stratified splits for datasets that ship without a val (or test) split."""

from __future__ import annotations

from typing import Sequence

import numpy as np

SPLIT_SEED = 0


def stratified_split(
    targets: Sequence[int], fractions: Sequence[float], seed: int = SPLIT_SEED
) -> list[np.ndarray]:
    """Partition sample indices into len(fractions) parts with each class cut in those proportions.

    Each class is shuffled by a private Generator (so the split neither depends on nor disturbs
    global seeding) and cut at the rounded cumulative fractions, so every part's per-class count
    is within 1 of its exact share. Each part lists its indices in source order.
    """
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)[:-1]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        cuts = np.rint(bounds * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]
