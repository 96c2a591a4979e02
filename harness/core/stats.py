"""Inference for the leaderboard: paired tests on the same test items, intervals that combine
seeds with test-set size and respect clustered test units, chance-normalised accuracy.

* ``mcnemar``: the exact two-sided McNemar test of two classifiers scored on the same items
  (binomial on the discordant pairs, Edwards-free): is A's accuracy different from B's?
* ``paired_bootstrap``: A − B on the same items, resampling test items (clusters, if given)
  and pairing seeds, as Koehn (2004) and Dror et al. (2018) describe; returns the mean
  difference, its 95% interval and a one-sided p-value for "A > B".
* ``clustered_interval``: a proportion's 95% interval when test units come in clusters
  (windows of one page, pairs sharing a document): the cluster-robust (ratio-estimator)
  standard error, and the effective number of units ``n_eff = n / design effect``.
* ``seeds_and_items_interval``: the interval of a mean over seeds that adds the seed variance
  to the test-set variance (the law of total variance), so one lucky seed cannot look bold.
* ``chance_normalised``: (acc − chance) / (1 − chance), comparable across 2- and 10-class columns.

Every function takes plain arrays (0/1 outcomes, or correct/count per item for per-position
tasks) and is checked against hand-computed values in ``tests/test_stats.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def mcnemar(a: Sequence[int], b: Sequence[int]) -> dict[str, float]:
    """Exact McNemar test: ``a``, ``b`` are 0/1 outcomes on the same items, in one order.
    Returns the discordant counts (``a_only``: A right, B wrong; ``b_only``) and the two-sided
    exact p-value, 2 · P[Binomial(a_only + b_only, ½) ≤ min(a_only, b_only)], capped at 1."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes of different lengths ({x.size} vs {y.size}): not the same test items")
    a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def _item_scores(correct: Sequence[float], count: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(correct, dtype=float)
    return y, (np.ones_like(y) if count is None else np.asarray(count, dtype=float))


def paired_bootstrap(
    a: Sequence[Sequence[int]],
    b: Sequence[Sequence[int]],
    *,
    count: Sequence[int] | None = None,
    clusters: Sequence[int] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """A − B accuracy over the same test items: ``a`` and ``b`` are per-seed lists of per-item
    correct counts (seeds × items; a baseline has one row), ``count`` the predictions per item
    (1 each by default; queries per sequence for MQAR). Each resample draws clusters (items by
    default) with replacement, and one seed of A and one of B at random; accuracy is the ratio
    of summed correct to summed count. Returns ``diff`` (the point estimate: means over seeds),
    ``low``/``high`` (the 2.5/97.5 percentiles) and ``p_value`` = the fraction of resamples with
    A − B ≤ 0 (one-sided, for "A beats B")."""
    xa = np.atleast_2d(np.asarray(a, dtype=float))
    xb = np.atleast_2d(np.asarray(b, dtype=float))
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"paired outcomes over {xa.shape[1]} and {xb.shape[1]} items: not the same test items")
    n = xa.shape[1]
    cnt = np.ones(n) if count is None else np.asarray(count, dtype=float)
    groups = np.arange(n) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    n_groups = int(groups.max()) + 1
    # per cluster sums: (seeds, clusters)
    sa = np.stack([np.bincount(groups, weights=row, minlength=n_groups) for row in xa])
    sb = np.stack([np.bincount(groups, weights=row, minlength=n_groups) for row in xb])
    sc = np.bincount(groups, weights=cnt, minlength=n_groups)
    diff = float(xa.sum(1).mean() / cnt.sum() - xb.sum(1).mean() / cnt.sum())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    weights = np.stack([np.bincount(d, minlength=n_groups) for d in draws])  # (n_boot, clusters)
    ia, ib = rng.integers(0, len(xa), n_boot), rng.integers(0, len(xb), n_boot)
    total = weights @ sc
    boot = ((weights * sa[ia]).sum(1) - (weights * sb[ib]).sum(1)) / np.maximum(total, 1e-12)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": diff, "low": float(low), "high": float(high), "p_value": float((boot <= 0).mean())}


def clustered_interval(
    correct: Sequence[float],
    clusters: Sequence[int] | None = None,
    *,
    count: Sequence[float] | None = None,
    z: float = Z95,
) -> dict[str, float]:
    """Accuracy, its cluster-robust 95% half-width and the effective number of units.

    With cluster totals y_g (correct) and m_g (count), p = Σy / Σm and the ratio estimator's
    variance is G / (G − 1) · Σ (y_g − p·m_g)² / (Σm)²; without clusters each item is one. The
    design effect is that variance over the binomial one p(1 − p)/n, and ``n_eff = n / deff``."""
    y, m = _item_scores(correct, count)
    groups = np.arange(len(y)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    yg = np.bincount(groups, weights=y)
    mg = np.bincount(groups, weights=m)
    total = mg.sum()
    p = float(yg.sum() / total)
    g = len(yg)
    var = g / (g - 1) * float(((yg - p * mg) ** 2).sum()) / total**2 if g > 1 else math.inf
    binomial = p * (1 - p) / total
    deff = var / binomial if binomial > 0 else 1.0
    # n_eff is capped at n: a design effect below 1 (units within a cluster that disagree more
    # than chance would) narrows the interval, but is never read as more units than predictions
    return {
        "accuracy": p,
        "half_width": z * math.sqrt(var),
        "n": float(total),
        "clusters": float(g),
        "n_eff": float(min(total, total / deff)) if deff > 0 else float(total),
    }


def seeds_and_items_interval(
    per_seed_accuracy: Sequence[float], item_half_width: float, *, z: float = Z95
) -> dict[str, float]:
    """The mean over seeds and a 95% half-width that adds both sources of variance: the test
    set's (``item_half_width`` of one seed's accuracy, e.g. from ``clustered_interval``) and the
    seeds' (their sample variance, over the number of seeds): var = s²/k + (h/z)²."""
    acc = np.asarray(per_seed_accuracy, dtype=float)
    k = len(acc)
    seed_var = float(acc.var(ddof=1)) / k if k > 1 else 0.0
    return {
        "mean": float(acc.mean()),
        "half_width": z * math.sqrt(seed_var + (item_half_width / z) ** 2),
        "seeds": float(k),
    }


def chance_normalised(accuracy: float, chance: float) -> float:
    """(accuracy − chance) / (1 − chance): 0 at chance, 1 when perfect."""
    if not 0 <= chance < 1:
        raise ValueError(f"chance rate {chance} is not in [0, 1)")
    return (accuracy - chance) / (1 - chance)


def shared_unit_clusters(pairs: Sequence[tuple]) -> list[int]:
    """Cluster ids of test items that share a unit: items ``(a, b)`` (e.g. two documents of a
    retrieval pair, or ``(page, page)`` for windows of one page) are in one cluster when they are
    linked through shared keys (connected components, union-find); ids in first-seen order."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    ids: dict = {}
    return [ids.setdefault(find(a), len(ids)) for a, _ in pairs]
