"""Top-k accuracy with a tie rule that cannot be gamed: ties count against the true class.

A sample is a hit at k when fewer than k other classes score at least as high as its true class.
Without ties this is the usual "true class among the k highest scores"; with ties (a kNN vote
where only 3 classes received any vote gives every other class the same score, 0) an unvoted
true class is never counted as a top-5 hit by the accident of sort order.
"""

from __future__ import annotations

from typing import Sequence

import torch


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(n, len(ks)) 0/1 hits of `scores` (n, C) against `labels` (n,) at each k."""
    if not torch.isfinite(scores).all():
        raise ValueError("classifier scores contain NaN or infinity (training diverged?)")
    true = scores.gather(1, labels.view(-1, 1))
    rivals = (scores >= true).sum(1) - 1  # classes other than the true one scoring >= it
    return torch.stack([(rivals < k).float() for k in ks], dim=1)


def scored(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> tuple[dict[str, float], torch.Tensor]:
    """{"top1": %, "top5": %} and each sample's top-1 hit (bool), which the result record keeps
    so the leaderboard can bootstrap and pair on the test images."""
    hits = topk_hits(scores, labels, ks)
    return {f"top{k}": 100.0 * h.item() for k, h in zip(ks, hits.mean(0))}, hits[:, 0].bool()
