"""The report's inference against values computed by hand."""

import math

import numpy as np
import pytest

from harness.core.stats import (
    chance_normalised,
    clustered_interval,
    mcnemar,
    paired_bootstrap,
    seeds_and_items_interval,
)


def test_mcnemar_exact_p_values():
    # discordant: A only on items 0, 1; B only on item 3 -> n=3, k=1: 2 (1 + 3) / 8 = 1
    assert mcnemar([1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 1]) == {"a_only": 2, "b_only": 1, "p_value": 1.0}
    # five discordant, all for A: 2 / 32
    assert mcnemar([1] * 5 + [0], [0] * 6)["p_value"] == pytest.approx(0.0625)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair
    with pytest.raises(ValueError, match="not the same test items"):
        mcnemar([1, 0], [1])


def test_clustered_interval_by_hand():
    # two clusters of two: y_g = (2, 0), m_g = (2, 2), p = 1/2; var = 2/1 · (1 + 1) / 16 = 1/4
    r = clustered_interval([1, 1, 0, 0], [7, 7, 3, 3])
    assert r["accuracy"] == 0.5 and r["half_width"] == pytest.approx(1.959963984540054 * 0.5)
    assert r["clusters"] == 2 and r["n_eff"] == pytest.approx(1.0)  # deff = (1/4) / (1/16) = 4
    # every item its own cluster: var = 4/3 · 4 · (1/4) / 16 = 1/12
    r = clustered_interval([1, 1, 0, 0])
    assert r["half_width"] == pytest.approx(1.959963984540054 * math.sqrt(1 / 12))
    # per-sequence counts (MQAR): correct 3 of 4 and 1 of 4 -> p = 1/2
    r = clustered_interval([3, 1], count=[4, 4])
    assert r["accuracy"] == 0.5 and r["n"] == 8


def test_correlated_windows_widen_the_interval():
    rng = np.random.default_rng(0)
    page_right = rng.random(40) < 0.6
    items = np.repeat(page_right, 5).astype(int)  # five windows of a page share their outcome
    pages = np.repeat(np.arange(40), 5)
    naive, clustered = clustered_interval(items), clustered_interval(items, pages)
    assert clustered["half_width"] > 2 * naive["half_width"]
    assert clustered["n_eff"] == pytest.approx(40, rel=0.05)


def test_seeds_and_items_interval_by_hand():
    r = seeds_and_items_interval([0.5, 0.7], 0.1)
    assert r["mean"] == pytest.approx(0.6)
    assert r["half_width"] == pytest.approx(1.959963984540054 * math.sqrt(0.02 / 2 + (0.1 / 1.959963984540054) ** 2))
    assert seeds_and_items_interval([0.5], 0.1)["half_width"] == pytest.approx(0.1)


def test_paired_bootstrap():
    a = [[1, 1, 1, 1, 0, 1, 1, 1] * 20]
    b = [[0, 1, 0, 1, 0, 0, 1, 0] * 20]
    r = paired_bootstrap(a, b)
    assert r["diff"] == pytest.approx(7 / 8 - 3 / 8) and r["p_value"] < 0.01 and r["low"] > 0
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    # per-sequence counts and several seeds: diff of the seed means of summed ratios
    r = paired_bootstrap([[2, 4], [4, 4]], [[1, 1]], count=[4, 4])
    assert r["diff"] == pytest.approx((6 / 8 + 8 / 8) / 2 - 2 / 8)
    with pytest.raises(ValueError, match="not the same test items"):
        paired_bootstrap([[1, 0]], [[1]])


def test_chance_normalised():
    assert chance_normalised(0.55, 0.1) == pytest.approx(0.5)
    assert chance_normalised(0.5, 0.5) == 0
    with pytest.raises(ValueError, match="chance rate"):
        chance_normalised(0.5, 1.0)


def test_shared_unit_clusters_are_connected_components():
    from harness.core.stats import shared_unit_clusters

    # pairs (a, b): 0-1 share doc "x", 1-2 share "y" (so 0, 1, 2 are one cluster); 3 stands alone;
    # windows of one page are (page, page)
    assert shared_unit_clusters([("x", "p"), ("x", "y"), ("q", "y"), ("r", "s")]) == [0, 0, 0, 1]
    assert shared_unit_clusters([(5, 5), (5, 5), (7, 7)]) == [0, 0, 1]


def test_a_cells_own_interval_is_cluster_robust_over_its_sequences():
    """harness.train.run records each seed's 95% interval of test accuracy: with per-sequence counts
    (MQAR: 4 queries each) the sequence is the unit, so a model right on whole sequences only
    gets a wider interval than 4x as many independent predictions would."""
    from harness.train.run import _test_interval

    whole = {"correct": [4, 0] * 50, "count": [4] * 100}  # 0.5, all-or-nothing per sequence
    spread = {"correct": [2] * 100, "count": [4] * 100}  # 0.5, half of each sequence
    lo_w, hi_w = _test_interval(whole, None)
    lo_s, hi_s = _test_interval(spread, None)
    assert lo_w < 0.5 < hi_w and hi_w - lo_w == pytest.approx(
        2 * 1.959963984540054 * math.sqrt(100 / 99 * 0.25 / 100), rel=1e-4
    )
    assert hi_s - lo_s < 1e-9  # every sequence scores exactly 0.5: no sampling variance left
    assert _test_interval({}, None) is None
