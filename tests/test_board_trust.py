"""The board's uncertainty and row identity, against references computed independently here:
scipy's bootstrap and t distribution, and records built by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from leaderboard import stats
from leaderboard.aggregate import build_board
from leaderboard.render import csv_text, markdown
from sslbench.config import recipe_hash
from sslbench.results import (
    HITS_KEY,
    BackboneIdentity,
    DatasetInfo,
    RecordError,
    ResultRecord,
    pack_hits,
    unpack_hits,
    validate,
)

PROTOCOL = {"data": {"dataset": {"name": "synthetic-shapes"}}, "knn": {"k": [20]}}
TEST_IMAGES = 400


def _hits(rate: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(TEST_IMAGES) < rate


def record(
    method: str,
    run: str,
    seed: int,
    hits=None,
    *,
    config: dict | None = None,
    top1: float | None = None,
    task: str = "knn",
    metric: str = "top1",
    weights: str = "ab",
    source: str | None = None,
) -> ResultRecord:
    config = {"method": {"name": method}, "run": {"seed": seed}} if config is None else config
    details = {} if hits is None else {HITS_KEY: pack_hits(hits)}
    value = 100 * float(np.mean(hits)) if top1 is None else top1
    return ResultRecord(
        task=task,
        metrics={metric: value},
        backbone=BackboneIdentity(
            weights * 32,
            method,
            run,
            "resnet18",
            recipe_hash(config) if config else None,
            config,
            source,
        ),
        protocol=PROTOCOL,
        dataset=DatasetInfo("synthetic-shapes", 8, {"train": 512, "test": TEST_IMAGES}, {}),
        seed=seed,
        wall_time_s=1.0,
        peak_memory_mb={"cpu_rss": 1.0},
        device="cpu",
        versions={"python": "3", "torch": "2", "torchvision": "0", "faiss": None, "sslbench": "0"},
        details=details,
    )


def test_hits_round_trip_and_are_checked_against_the_test_split():
    hits = _hits(0.3, 0)
    assert (unpack_hits(pack_hits(hits)) == hits).all() and len(unpack_hits(pack_hits([]))) == 0
    bad = record("simclr", "simclr", 0, hits)
    bad.details[HITS_KEY] = pack_hits(hits[:-1])
    with pytest.raises(RecordError, match="holds 399 images, the test split 400"):
        validate(bad)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_hits({"n": 9, "bits": pack_hits(hits[:8])["bits"]})


def test_seed_interval_is_students_t():
    values = [61.0, 64.5, 62.25, 66.0]
    lo, hi = stats.seed_interval(values)
    ref = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values)
    )
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_bootstrap_intervals_equal_scipys_percentile_bootstrap():
    a, b = _hits(0.6, 1).astype(float), _hits(0.55, 2).astype(float)
    ref = scipy_stats.bootstrap(
        (a,),
        np.mean,
        n_resamples=stats.RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(stats.SEED),
    ).confidence_interval
    assert stats.bootstrap_interval(a) == pytest.approx((100 * ref.low, 100 * ref.high), rel=1e-12)
    ref = scipy_stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
        paired=True,
        n_resamples=stats.RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(stats.SEED),
    ).confidence_interval
    assert stats.paired_difference_interval(a, b) == pytest.approx(
        (100 * ref.low, 100 * ref.high), rel=1e-9
    )


def test_the_paired_test_with_seeds_is_the_one_run_test_when_the_seeds_agree():
    """Seeds with identical hits add no spread: the two-level bootstrap gives the one-run
    interval (the images are drawn first, from the same stream)."""
    a, b = _hits(0.6, 1).astype(float), _hits(0.55, 2).astype(float)
    one = stats.paired_difference_interval(a, b)
    assert stats.paired_difference_interval(np.stack([a] * 3), np.stack([b] * 2)) == pytest.approx(
        one, rel=1e-12
    )


def test_the_paired_test_carries_the_spread_between_seeds():
    """Two rows of three seeds on the same images, hits driven by each image's difficulty (as
    real rows share their easy and hard images) and each seed's own accuracy: 55/60/65% vs
    58/63/68%. Averaging the seeds' hits first keeps only the test set's noise, which the pairing
    all but removes, and calls the 3-point gap distinct; drawing the seeds too carries their
    5-point spread and does not, as Welch's test over the seeds' values does not."""
    difficulty = np.random.default_rng(0).random(TEST_IMAGES)

    def run(accuracy: float, seed: int) -> np.ndarray:
        noise = 0.02 * np.random.default_rng(seed).standard_normal(TEST_IMAGES)
        return (difficulty + noise < accuracy).astype(float)

    row_a = np.stack([run(p, s) for p, s in ((0.55, 1), (0.60, 2), (0.65, 3))])
    row_b = np.stack([run(p, s) for p, s in ((0.58, 4), (0.63, 5), (0.68, 6))])
    averaged = stats.paired_difference_interval(row_b.mean(0), row_a.mean(0))
    with_seeds = stats.paired_difference_interval(row_b, row_a)
    assert not averaged[0] <= 0 <= averaged[1]
    assert with_seeds[0] <= 0 <= with_seeds[1]
    assert with_seeds[1] - with_seeds[0] > 2 * (averaged[1] - averaged[0])
    assert not stats.indistinguishable_paired(row_b.mean(0), row_a.mean(0))
    assert stats.indistinguishable_paired(row_b, row_a)
    assert stats.indistinguishable_seeds(list(100 * row_b.mean(1)), list(100 * row_a.mean(1)))


def test_the_paired_test_agrees_with_mcnemars_exact_test_on_clear_cases():
    """Far apart: McNemar (scipy's exact binomial test on the discordant pairs) and the paired
    bootstrap both reject; one image apart: neither does."""
    a = _hits(0.7, 3)
    far, near = a.copy(), a.copy()
    far[np.flatnonzero(a)[:60]] = False
    near[np.flatnonzero(a)[0]] = False
    for other, distinct in ((far, True), (near, False)):
        b01, b10 = int((a & ~other).sum()), int((~a & other).sum())
        mcnemar_p = scipy_stats.binomtest(b01, b01 + b10, 0.5).pvalue
        assert bool(mcnemar_p < 0.05) is distinct
        assert stats.indistinguishable_paired(a, other) is not distinct


def test_welch_decides_dense_columns_with_seeds():
    assert stats.indistinguishable_seeds([40.0, 41.0], [40.5, 41.5])
    assert not stats.indistinguishable_seeds([40.0, 40.2, 40.1], [30.0, 30.3, 30.1])
    p = scipy_stats.ttest_ind([40.0, 41.0], [40.5, 41.5], equal_var=False).pvalue
    assert p >= 0.05


def test_records_differing_only_in_config_are_two_rows_seeds_of_one_config_one():
    exact = {"method": {"name": "simclr", "loss_form": "exact"}}
    unigrad = {"method": {"name": "simclr", "loss_form": "unigrad"}}
    records = [
        record("simclr", "simclr", s, _hits(0.5, s), config={**exact, "run": {"seed": s}})
        for s in (0, 1)
    ]
    records.append(
        record(
            "simclr",
            "simclr",
            0,
            _hits(0.6, 9),
            config={**unigrad, "run": {"seed": 0}},
            weights="cd",
        )
    )
    board = build_board(records)
    labels = sorted(r.label for r in board.rows)
    assert labels == ['simclr [method.loss_form="exact"]', 'simclr [method.loss_form="unigrad"]']
    cells = {r.label: next(iter(r.cells.values())) for r in board.rows}
    assert cells['simclr [method.loss_form="exact"]'].n == 2  # the two seeds average
    assert cells['simclr [method.loss_form="unigrad"]'].n == 1


def test_cells_carry_intervals_marks_and_their_place_between_the_baselines():
    records = [
        record("simclr", "simclr", 0, _hits(0.62, 1)),
        record("byol", "byol", 0, _hits(0.60, 2), weights="cd"),  # close to the best
        record("vicreg", "vicreg", 0, _hits(0.30, 3), weights="ce"),  # far below it
        record("random-init", "random-init", 0, _hits(0.2, 4), weights="cf"),
        record("supervised", "supervised", 0, _hits(0.9, 5), weights="d0"),
    ]
    board = build_board(records)
    assert [r.label for r in board.rows] == ["simclr", "byol", "vicreg"]
    assert [r.label for r in board.baselines] == ["random-init", "supervised"]
    assert all(c.rank is None for r in board.baselines for c in r.cells.values())
    cell = {r.label: next(iter(r.cells.values())) for r in (*board.rows, *board.baselines)}
    for label, c in cell.items():  # single runs: a bootstrap interval around the value
        assert c.interval_kind == "bootstrap" and c.interval[0] < c.mean < c.interval[1], label
    assert cell["byol"].tied_with_best is True and cell["vicreg"].tied_with_best is False
    floor, ceiling = cell["random-init"].mean, cell["supervised"].mean
    assert cell["byol"].position == pytest.approx((cell["byol"].mean - floor) / (ceiling - floor))
    md = markdown(board, [], "x")
    assert "## Baselines" in md and "≈best" in md and "pos " in md
    assert md.index("| vicreg |") < md.index("## Baselines") < md.index("| random-init |")
    rows = csv_text(board).splitlines()
    assert rows[0].count(":lo") == 1 and rows[-1].startswith("supervised,supervised,resnet18")


def test_cells_indistinguishable_from_random_init_are_marked():
    """Paired over the same test images: a row whose hits are the floor's but for a handful,
    flipped both ways, is ≈floor; one far above it is not; the reference is the paired
    bootstrap's own interval."""
    floor_hits = _hits(0.3, 4)
    near = floor_hits.copy()
    near[np.flatnonzero(floor_hits)[:6]] = False  # 6 right answers lost, 6 wrong ones gained
    near[np.flatnonzero(~floor_hits)[:6]] = True
    records = [
        record("simclr", "simclr", 0, _hits(0.7, 1)),
        record("byol", "byol", 0, near, weights="cd"),
        record("random-init", "random-init", 0, floor_hits, weights="cf"),
    ]
    cell = {r.label: next(iter(r.cells.values())) for r in (*build_board(records).rows,)}
    assert cell["byol"].tied_with_floor is True and cell["simclr"].tied_with_floor is False
    low, high = stats.paired_difference_interval(floor_hits.astype(float), near.astype(float))
    assert low <= 0 <= high  # the same decision, from the interval itself
    assert "≈floor" in markdown(build_board(records), [], "x")
    # without a floor row there is nothing to test against
    assert all(
        c.tied_with_floor is None for r in build_board(records[:2]).rows for c in r.cells.values()
    )
