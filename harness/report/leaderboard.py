"""Results → ``results/leaderboard.md`` (and plots): ``python -m harness report``.

The story of the table: scan every result file (an unreadable one is listed, never fatal)
→ one row per cell → cells grouped by (scale, task, mechanism, variant), seeds averaged only
within one config → per scale: the accuracy table with a column per task and sequence
length, baselines computed from the same splits (``harness.report.baselines``), 95% intervals
from the test size, bold only beyond them → accuracy against length → the recommendation
(per task and length band, the mechanisms within the interval of the best, by throughput)
→ tasks, throughput, parameters → published reference rows beside our ``scale=lra`` cells
→ the efficiency section from the speed benchmark → run details (only what is not ok).

Uncertainty: an accuracy's 95% interval is Wilson's binomial interval for the (seed-mean)
accuracy on the test-set size; a bits/token interval is ±1.96 standard errors over test
sequences, measured on the task's n-gram baseline (the cells do not record per-token
losses, so the test set's sampling width is taken from the baseline on the same split).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from harness.core.labels import FAILURE_MARK, length_label, softmax_first
from harness.core.results import (
    WouldShrink,
    check_not_shrinking,
    code_commit,
    record_cache_path,
    scan_results,
    write_text_atomic,
)

log = logging.getLogger(__name__)

NOT_OK = ("failed", "oom", "nan", "timeout")
Z95 = 1.959963984540054
CI_TARGET_POINTS = 3.5  # a test split is "too small" when its worst-case 95% half-width rounds above ±3 points
PARAMS_BUDGET = 1.10  # LRA's rule: at most 10% more parameters than the Transformer
LENGTH_KEYS = ("max_len", "max_length")  # task config caps on tokens per sequence (the smallest applies)
LENGTH_OVERRIDES = ("task.max_len", "task.max_length", "task.min_length", "task.resolution")
BANDS = ((256, "≤ 256"), (512, "257–512"), (1024, "513–1K"), (2048, "1K–2K"), (4096, "2K–4K"), (math.inf, "> 4K"))
SCALE_ORDER = ("tiny", "small", "lra")
# Sources that are the published data a paper's number was measured on (task -> sources).
REAL_SOURCES = {
    "listops": {"lra"},
    "text": {"imdb"},
    "retrieval": {"aan"},
    "image": {"cifar10", "cifar10_hf"},
    "pathfinder": {"lra"},
}

# Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", ICLR 2021, arXiv:2011.04006,
# Table 1 (also the leaderboard of github.com/google-research/long-range-arena, README as of 8 Nov 2020).
# Columns: ListOps, Text, Retrieval, Image, Pathfinder, Avg (Path-X: FAIL for every model, omitted).
LRA_TABLE1 = [
    ("Transformer", 36.37, 64.27, 57.46, 42.44, 71.40, 54.39),
    ("Local Attention", 15.82, 52.98, 53.39, 41.46, 66.63, 46.06),
    ("Sparse Trans.", 17.07, 63.58, 59.59, 44.24, 71.71, 51.24),
    ("Longformer", 35.63, 62.85, 56.89, 42.22, 69.71, 53.46),
    ("Linformer", 35.70, 53.94, 52.27, 38.56, 76.34, 51.36),
    ("Reformer", 37.27, 56.10, 53.40, 38.07, 68.50, 50.67),
    ("Sinkhorn Trans.", 33.67, 61.20, 53.83, 41.23, 67.45, 51.29),
    ("Synthesizer", 36.99, 61.68, 54.67, 41.61, 69.45, 52.88),
    ("BigBird", 36.05, 64.02, 59.29, 40.83, 74.87, 55.01),
    ("Linear Trans.", 16.13, 65.90, 53.09, 42.34, 75.30, 50.55),
    ("Performer", 18.01, 65.40, 53.82, 42.77, 77.05, 51.41),
]
LRA_CITATION = (
    "Tay et al. 2021, *Long Range Arena* (ICLR 2021, arXiv:2011.04006), Table 1; "
    "github.com/google-research/long-range-arena README"
)
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
# Later papers re-ran LRA in PyTorch with their own settings (not LRA's): their rows are a separate
# source, never comparable cell-for-cell with Table 1. Only rows checked against a second source are
# here: Skyformer's own row (also quoted by later papers); the other rows of the Nyströmformer and
# Skyformer tables are not yet, so they are left out rather than typed from memory.
REIMPLEMENTED_ROWS = [  # (name, citation, the protocol it was measured under, values)
    (
        "Skyformer",
        "Chen et al. 2021, *Skyformer* (NeurIPS 2021, arXiv:2111.00035), PyTorch LRA re-implementation",
        "pytorch",
        (38.69, 64.70, 82.06, 40.77, 70.73, 59.39),
    ),
]


# ----------------------------------------------------------------------------- intervals


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``p`` measured on ``n`` examples."""
    if not n or n <= 0 or p is None or not math.isfinite(p):
        return math.nan, math.nan
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def worst_half_width(n: int) -> float:
    """The widest 95% Wilson half-width a test split of ``n`` allows (at 50% accuracy), in points."""
    lo, hi = wilson(0.5, n)
    return 100 * (hi - lo) / 2


# ----------------------------------------------------------------------------- cells


def primary_metric(metrics: dict[str, float]) -> tuple[str, bool]:
    """(metric name, higher is better): bits/token for language models, else accuracy."""
    if "bits_per_token" in metrics:
        return "bits_per_token", False
    return "accuracy", True


def sequence_length(record: dict[str, Any]) -> int | None:
    """The cell's sequence length: the smallest length cap of its task's settings
    (``config.task.max_len``, ``config.task.max_length``), else the longest test sequence of its data."""
    config = (record.get("config") or {}).get("task") or {}
    caps = [int(config[k]) for k in LENGTH_KEYS if isinstance(config.get(k), (int, float)) and config[k]]
    if caps:
        return min(caps)
    longest = (record.get("data") or {}).get("length_max")
    return int(longest) if longest else None


def other_differences(variant_label: str) -> str:
    """The variant label without its length settings (length is a column, not a row)."""
    parts = [p.strip() for p in (variant_label or "").split(",") if p.strip()]
    return ", ".join(p for p in parts if p.split("=")[0].strip() not in LENGTH_OVERRIDES)


SHORT_LABEL = 40  # a variant label longer than this gets a short id (v1, v2, ...) and a line in the table's key


def variant_ids(labels) -> dict[str, str]:
    """Long variant labels -> 'v1', 'v2', ... (most used first), so a grid's shared overrides do not
    widen every row; short labels stay as they are."""
    counts = pd.Series([x for x in labels if x and len(x) > SHORT_LABEL], dtype=object).value_counts()
    ordered = sorted(counts.index, key=lambda x: (-counts[x], x))
    return {label: f"v{i + 1}" for i, label in enumerate(ordered)}


def variant_key(cells: pd.DataFrame) -> str:
    """The key of the short variant ids used in the rows of ``cells``."""
    pairs = sorted(
        {(i, label) for i, label in zip(cells.variant_id, cells.variant_other) if i}, key=lambda x: int(x[0][1:])
    )
    return "Variants: " + "; ".join(f"**{i}** = `{label}`" for i, label in pairs) if pairs else ""


def log_folder(record: dict[str, Any]) -> str:
    """The cell's log folder relative to the results folder (cell.log and curves/metrics.csv)."""
    parts = ["logs", record["scale"], record["task"], record["mechanism"]]
    if record.get("variant"):
        parts.append(record["variant"])
    return "/".join(parts + [f"seed{record['seed']}"])


def cells_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per result: identity, status, primary test metric, data, efficiency."""
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        test = metrics.get("test") or {}
        metric, higher = primary_metric(test)
        if metric == "accuracy" and r["task"].endswith("_lm"):
            metric, higher = "bits_per_token", False
        data = r.get("data") or {}
        env = r.get("env") or {}
        sizes = data.get("sizes") or {}
        other = other_differences(r.get("variant_label", ""))
        rows.append(
            {
                "scale": r["scale"],
                "task": r["task"],
                "mechanism": r["mechanism"],
                "seed": r["seed"],
                "variant": r.get("variant") or "",
                "variant_label": r.get("variant_label") or "",
                "variant_other": other,
                "length": sequence_length(r),
                "status": r["status"],
                "error": r.get("error"),
                # text-to-SQL (Spider): the accuracy column is exact set match of the decoded query
                "metric": metric,
                "higher_better": higher,
                "test": test.get("exact", test.get(metric)) if metric == "accuracy" else test.get(metric),
                "params": r.get("params"),
                "tokens_per_s": r.get("tokens_per_s"),
                "peak_memory_mb": r.get("peak_memory_mb"),
                "wall_s": r.get("wall_s"),
                "source": data.get("source"),
                "fingerprint": data.get("fingerprint"),
                "cache_path": record_cache_path(r),
                "majority": data.get("majority_accuracy"),
                "unigram_bits": data.get("unigram_bits_per_token"),
                "sizes": sizes,
                "n_test": sizes.get("test"),
                "length_mean": data.get("length_mean"),
                "length_max": data.get("length_max"),
                "num_classes": data.get("num_classes"),
                "commit": env.get("commit"),
                "device": env.get("device"),
                # every commit the cell trained under (a resumed cell may have several), and whether its code differed
                "commits": tuple(c for c in (env.get("commits") or [env.get("commit")]) if c),
                "dirty": env.get("dirty"),
                "torch": env.get("torch"),
                "log": log_folder(r),
                # per test item (paired tests), the test units' clusters, the validation curve, softmax in disguise
                "items_correct": (r.get("test_items") or {}).get("correct"),
                "items_count": (r.get("test_items") or {}).get("count"),
                "clusters": data.get("test_clusters"),
                "val_curve": r.get("val_curve") or None,
                "softmax_equivalent": r.get("softmax_equivalent"),
                "warmup_steps": ((data.get("warmup") or {}).get("steps")),
                "protocol": (r.get("config") or {}).get("protocol") or "",
            }
        )
    columns = [
        "scale",
        "task",
        "mechanism",
        "seed",
        "variant",
        "variant_label",
        "variant_other",
        "length",
        "status",
        "error",
        "metric",
        "higher_better",
        "test",
        "params",
        "tokens_per_s",
        "peak_memory_mb",
        "wall_s",
        "source",
        "fingerprint",
        "cache_path",
        "majority",
        "unigram_bits",
        "sizes",
        "n_test",
        "length_mean",
        "length_max",
        "num_classes",
        "commit",
        "commits",
        "dirty",
        "device",
        "torch",
        "log",
        "items_correct",
        "items_count",
        "clusters",
        "val_curve",
        "softmax_equivalent",
        "warmup_steps",
        "protocol",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    ids = variant_ids(frame.variant_other)
    frame["variant_id"] = frame.variant_other.map(lambda x: ids.get(x, ""))
    shown = [i or other for i, other in zip(frame.variant_id, frame.variant_other)]
    shared = column_configs(frame)
    frame["row"] = [f"{m} [{x}]" if x and not column else m for m, x, column in zip(frame.mechanism, shown, shared)]
    frame["column_config"] = [ids.get(c, c) for c in shared]
    return frame


def column_configs(frame: pd.DataFrame) -> list[str]:
    """Per cell, the config its whole column shares (scale, task and length; its label without the
    length), when every cell there has that one config and it sets nothing mechanism-specific: a
    grid that gives each length its own budget (the CPU grid) then names the config once, in the
    column's title, and a mechanism keeps one row. Else ''."""
    keys = list(zip(frame.scale, frame.task, frame.length.fillna(-1)))
    configs: dict[tuple, set[str]] = {}
    for key, other in zip(keys, frame.variant_other):
        configs.setdefault(key, set()).add(other)
    shared = {
        key: next(iter(c))
        for key, c in configs.items()
        if len(c) == 1 and not any(p.strip().startswith("mechanism.") for p in next(iter(c)).split(","))
    }
    return [shared.get(key, "") for key in keys]


def band_of(length) -> str:
    for upper, label in BANDS:
        if length <= upper:
            return label
    return BANDS[-1][1]


# ----------------------------------------------------------------------------- columns and groups


def column_baselines(cells: pd.DataFrame, store: Path) -> dict[tuple, dict[str, Any]]:
    """(task, length) -> {"baselines": [...], "error": ...} from the column's (most common) data;
    and (task, length, fingerprint) for every other data a row of that column was trained on
    (e.g. a variant with another ``task.num_distractors``): such a row is judged against the
    baselines of its own data, never another dataset's."""
    out: dict[tuple, dict[str, Any]] = {}
    for (task, length), group in cells.groupby(["task", cells.length.fillna(-1).astype(int)]):
        with_data = group.dropna(subset=["fingerprint"])
        if with_data.empty:
            out[(task, int(length))] = {"baselines": [], "error": "no cell recorded its data"}
            continue
        fingerprint = with_data.fingerprint.mode().iloc[0]
        for fp, same in with_data.groupby("fingerprint"):
            key = (task, int(length)) if fp == fingerprint else (task, int(length), fp)
            out[key] = _baselines_of(task, same.iloc[0], store)
    return out


def _baselines_of(task: str, first: pd.Series, store: Path) -> dict[str, Any]:
    """The baselines of one cell's data (computed from its cached splits, else what it recorded)."""
    from harness.report.baselines import baselines_for

    found = baselines_for(task, first.fingerprint, first.cache_path, store)
    if not found.get("baselines"):  # fall back on what the result itself records
        recorded = []
        if pd.notna(first.majority) and first.metric == "accuracy":
            recorded.append(
                {
                    "name": "majority",
                    "metric": "accuracy",
                    "value": float(first.majority),
                    "n_test": first.n_test,
                    "half_width": None,
                    "note": "recorded in the result",
                }
            )
        if pd.notna(first.unigram_bits):
            recorded.append(
                {
                    "name": "unigram",
                    "metric": "bits_per_token",
                    "value": float(first.unigram_bits),
                    "n_test": first.n_test,
                    "half_width": None,
                    "note": "recorded in the result",
                }
            )
        found = {"baselines": recorded, "error": found.get("error")}
    return found


def data_baselines(baselines: dict[tuple, dict[str, Any]], task: str, length, fingerprint) -> dict[str, Any]:
    """The baselines a row is judged against: those of its own data when it differs from its
    column's (key (task, length, fingerprint)), else the column's."""
    return baselines.get((task, int(length), fingerprint)) or baselines.get((task, int(length)), {})


def strongest(baselines: list[dict[str, Any]], higher: bool) -> dict[str, Any] | None:
    metric = "accuracy" if higher else "bits_per_token"
    usable = [b for b in baselines if b.get("metric") == metric and b.get("value") is not None]
    if not usable:
        return None
    return (max if higher else min)(usable, key=lambda b: b["value"])


ALPHA = 0.05  # the paired tests' level: "beats" and "below the best" need p < ALPHA (one-sided)


def seed_items(ok: pd.DataFrame, n_test) -> dict[str, Any] | None:
    """The group's per-seed outcomes on every test item (seeds × items), the predictions per item
    and the items' clusters, when every finished seed recorded them on the same items."""
    rows = [r for r in ok.itertuples() if isinstance(r.items_correct, list) and len(r.items_correct)]
    if not rows or len(rows) != len(ok) or len({len(r.items_correct) for r in rows}) != 1:
        return None
    n = len(rows[0].items_correct)
    count = rows[0].items_count if isinstance(rows[0].items_count, list) and len(rows[0].items_count) == n else None
    clusters = rows[0].clusters if isinstance(rows[0].clusters, list) and len(rows[0].clusters) == n else None
    return {"correct": [r.items_correct for r in rows], "count": count, "clusters": clusters}


def item_interval(items: dict[str, Any] | None, mean: float, n_test) -> tuple[float, float]:
    """(95% half-width of one seed's accuracy from the test set alone, effective number of units):
    cluster-robust over the recorded items (queries of one sequence, windows of one page, pairs
    sharing a document are one cluster), else Wilson's on the test size."""
    from harness.core.stats import clustered_interval

    if items is None:
        if not n_test:
            return math.nan, math.nan
        lo, hi = wilson(mean, int(n_test))
        return (hi - lo) / 2, float(n_test)
    widths, n_eff = [], math.nan
    for correct in items["correct"]:
        units = items["clusters"]
        if units is None and items["count"] is not None and any(c != 1 for c in items["count"]):
            units = list(range(len(correct)))  # per-position tasks: the sequence is the unit of its queries
        found = clustered_interval(correct, units, count=items["count"])
        widths.append(found["half_width"])
        n_eff = found["n_eff"]
    return float(np.mean(widths)), n_eff


def paired_p(a: dict[str, Any], b_correct: list[list[int]]) -> float:
    """One-sided p-value of "A beats B" on the same test items: the paired bootstrap over items
    (clusters) and seeds of ``harness.core.stats``."""
    from harness.core.stats import paired_bootstrap

    return paired_bootstrap(a["correct"], b_correct, count=a["count"], clusters=a["clusters"])["p_value"]


def group_stats(cells: pd.DataFrame, baselines: dict[tuple[str, int], dict[str, Any]]) -> pd.DataFrame:
    """One row per (task, length, row label): seeds of one config averaged; a 95% interval that adds
    the seeds' variance to the test set's (cluster-robust where test units are clustered); whether
    it beats the strongest baseline under a paired test on the same test items; bold when it does
    and is not significantly below the column's best (paired too); softmax in disguise marked."""
    rows = []
    for (task, length, row, variant), group in cells.groupby(
        ["task", cells.length.fillna(-1).astype(int), "row", "variant"], sort=False
    ):
        ok = group[group.status == "ok"].dropna(subset=["test"])
        higher = bool(group.higher_better.iloc[0])
        n_test = group.n_test.dropna().iloc[0] if group.n_test.notna().any() else None
        mechanism = group.mechanism.iloc[0]
        entry = {
            "task": task,
            "length": int(length),
            "row": row,
            "mechanism": mechanism,
            "column_config": group.column_config.iloc[0],
            "variant": variant,
            "higher": higher,
            "statuses": list(group.status),
            "seeds": len(group),
            "n_ok": len(ok),
            "n_test": n_test,
            "mean": math.nan,
            "std": math.nan,
            "lo": math.nan,
            "hi": math.nan,
            "n_eff": math.nan,
            "items": None,
            "p_baseline": math.nan,
            "p_best": math.nan,
            "softmax_equivalent": mechanism != "softmax" and bool((ok.softmax_equivalent == True).any()),  # noqa: E712
            "curve": [c for c in ok.val_curve if isinstance(c, list) and c],
            "warmup_steps": ok.warmup_steps.dropna().max() if ok.warmup_steps.notna().any() else math.nan,
            "tokens_per_s": ok.tokens_per_s.median() if len(ok) else math.nan,
            "peak_memory_mb": ok.peak_memory_mb.median() if len(ok) else math.nan,
            "params": ok.params.dropna().iloc[0] if ok.params.notna().any() else math.nan,
            "fingerprint": group.fingerprint.dropna().mode().iloc[0] if group.fingerprint.notna().any() else None,
        }
        entry["own_data"] = (task, int(length), entry["fingerprint"]) in baselines
        own = data_baselines(baselines, task, length, entry["fingerprint"])
        if len(ok):
            mean = float(ok.test.mean())
            entry.update(mean=mean, std=float(ok.test.std(ddof=1)) if len(ok) > 1 else 0.0)
            if higher:
                from harness.core.stats import seeds_and_items_interval

                entry["items"] = seed_items(ok, n_test)
                half_items, entry["n_eff"] = item_interval(entry["items"], mean, n_test)
                if math.isfinite(half_items):
                    half = seeds_and_items_interval(list(ok.test), half_items)["half_width"]
                    entry["lo"], entry["hi"] = max(0.0, mean - half), min(1.0, mean + half)
            else:
                best = strongest(own.get("baselines", []), higher=False)
                width = best.get("half_width") if best else None
                if width is not None and math.isfinite(width):
                    entry["lo"], entry["hi"] = mean - width, mean + width
        rows.append(entry)
    stats = pd.DataFrame(rows)
    if stats.empty:
        return stats
    stats["beats_baseline"] = False
    stats["bold"] = False
    stats["within_best"] = False
    for (task, length), column in stats.groupby(["task", "length"]):
        finished = column.dropna(subset=["mean"])
        if finished.empty:
            continue
        higher = bool(column.higher.iloc[0])
        best = finished.loc[finished["mean"].idxmax() if higher else finished["mean"].idxmin()]
        for index, entry in finished.iterrows():
            base = strongest(data_baselines(baselines, task, length, entry.fingerprint).get("baselines", []), higher)
            items, base_items = entry["items"], (base or {}).get("items")
            if higher and items is not None and base_items and len(base_items["correct"]) == len(items["correct"][0]):
                p = paired_p(items, [base_items["correct"]])
                beats = p < ALPHA
                stats.at[index, "p_baseline"] = p
            elif base is None or not math.isfinite(entry.lo):
                continue
            else:  # no per-item outcomes (older records): the interval's lower bound against the baseline
                beats = entry.lo > base["value"] if higher else entry.hi < base["value"]
            if (
                higher
                and index != best.name
                and items is not None
                and best["items"] is not None
                and len(best["items"]["correct"][0]) == len(items["correct"][0])
            ):
                p_best = paired_p(best["items"], items["correct"])  # is the best significantly above this row?
                within = p_best >= ALPHA
                stats.at[index, "p_best"] = p_best
            else:
                within = index == best.name or (entry["mean"] >= best.lo if higher else entry["mean"] <= best.hi)
            stats.at[index, "beats_baseline"] = bool(beats)
            stats.at[index, "within_best"] = bool(within)
            stats.at[index, "bold"] = bool(beats and within)
    return stats


# ----------------------------------------------------------------------------- tables


def _value(entry, digits: int) -> tuple[str, str]:
    if entry.higher:
        text = (
            f"{100 * entry['mean']:.1f}" if entry.n_ok == 1 else f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
        )
        interval = f" [{100 * entry.lo:.1f}, {100 * entry.hi:.1f}]" if math.isfinite(entry.lo) else ""
    else:
        text = (
            f"{entry['mean']:.{digits}f}"
            if entry.n_ok == 1
            else f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
        )
        interval = f" [{entry.lo:.{digits}f}, {entry.hi:.{digits}f}]" if math.isfinite(entry.lo) else ""
    return text, interval


def cell_text(entry) -> str:
    """``mean ± std [95% interval]``, bold by the rule, ◦ where it does not beat the shortcut
    baseline beyond the interval, and the failed seeds."""
    statuses = pd.Series(entry.statuses)
    if entry.n_ok:
        text, interval = _value(entry, 3)
        text = f"**{text}**" if entry.bold else text
        text += interval + ("" if entry.beats_baseline else " ◦") + (" †" if entry.get("own_data") else "")
        text += " ≡softmax" if entry.get("softmax_equivalent") else ""
        failed = statuses[statuses.isin(NOT_OK)]
        if len(failed):
            marks = " / ".join(sorted({FAILURE_MARK[x] for x in failed}))
            text += f" ({marks} {len(failed)}/{len(statuses)} seeds)"
        return text
    if (statuses == "unsupported").all():
        return "n/a"
    return " / ".join(sorted({FAILURE_MARK.get(s, s) for s in statuses if s != "unsupported"}))


def baseline_text(base: dict[str, Any] | None, higher: bool) -> str:
    if base is None or base.get("value") is None:
        return "–"
    value = base["value"]
    if higher:
        lo, hi = wilson(value, int(base["n_test"])) if base.get("n_test") else (math.nan, math.nan)
        return f"{100 * value:.1f}" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if math.isfinite(lo) else "")
    half = base.get("half_width")
    return f"{value:.3f}" + (f" ± {half:.3f}" if half is not None and math.isfinite(half) else "")


def columns_of(stats: pd.DataFrame) -> list[tuple[str, int]]:
    return sorted({(t, int(L)) for t, L in zip(stats.task, stats.length)})


def column_title(task: str, length: int, higher: bool = True, config: str = "") -> str:
    """``text L=1K``, with the config the whole column shares (``[v1]``) and ``(bits ↓)`` for LM tasks."""
    return (
        f"{task} L={length_label(length if length >= 0 else None)}"
        + (f" [{config}]" if config else "")
        + ("" if higher else " (bits ↓)")
    )


def column_config(stats: pd.DataFrame, task: str, length: int) -> str:
    column = stats[(stats.task == task) & (stats.length == length)]
    return str(column.column_config.iloc[0]) if len(column) else ""


def primary_columns(stats: pd.DataFrame) -> dict[str, int]:
    """Per task, the length with the most rows (ties: the shortest): where the average looks."""
    out = {}
    for task, group in stats.groupby("task"):
        counts = group.groupby("length").row.nunique()
        out[task] = int(min(counts.index, key=lambda L: (-counts[L], L)))
    return out


def chance_rate(stats: pd.DataFrame, baselines: dict, column: tuple[str, int]) -> float:
    """A column's no-information rate: its majority baseline's accuracy (else 1 / classes)."""
    majority = [b for b in baselines.get(column, {}).get("baselines", []) if b.get("name") == "majority"]
    if majority and majority[0].get("value") is not None:
        return float(majority[0]["value"])
    return math.nan


def accuracy_table(stats: pd.DataFrame, baselines: dict) -> tuple[str, pd.Series]:
    """Markdown: rows = baselines then mechanisms (variants labelled); a column per task and
    length; plus each row's average of chance-normalised accuracy, (acc − c) / (1 − c) with c the
    column's majority rate, over the accuracy tasks at their primary length (so 2-class and
    10-class columns count alike); a row missing one of them gets no average."""
    from harness.core.stats import chance_normalised

    columns = columns_of(stats)
    higher = {c: bool(stats[(stats.task == c[0]) & (stats.length == c[1])].higher.iloc[0]) for c in columns}
    primary = primary_columns(stats)
    header = (
        ["mechanism"]
        + [column_title(t, L, higher[(t, L)], column_config(stats, t, L)) for t, L in columns]
        + ["average (chance-normalised)"]
    )
    names = sorted(
        {b["name"] for c in columns for b in baselines.get(c, {}).get("baselines", [])},
        key=lambda n: (n != "majority", n),
    )
    rows = []
    for name in names:
        row = [f"baseline: {name}"]
        for c in columns:
            match = [b for b in baselines.get(c, {}).get("baselines", []) if b["name"] == name]
            row.append(baseline_text(match[0], higher[c]) if match else "")
        rows.append(row + [""])
    order = softmax_first(stats.row)
    averages = {}
    for label in order:
        row, accs = [label], []
        for c in columns:
            entry = stats[(stats.task == c[0]) & (stats.length == c[1]) & (stats.row == label)]
            if entry.empty:
                row.append("–")
                continue
            entry = entry.iloc[0]
            row.append(cell_text(entry))
            chance = chance_rate(stats, baselines, c)
            if higher[c] and primary.get(c[0]) == c[1] and entry.n_ok and math.isfinite(chance) and chance < 1:
                accs.append(chance_normalised(entry["mean"], chance))
        wanted = [
            t
            for t in primary
            if higher[(t, primary[t])] and math.isfinite(chance_rate(stats, baselines, (t, primary[t])))
        ]
        complete = bool(accs) and len(accs) == len(wanted)
        averages[label] = sum(accs) / len(accs) if complete else math.nan
        row.append(f"{round(100 * averages[label], 1) + 0.0:.1f}" if complete else "–")
        rows.append(row)
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True), pd.Series(averages, dtype=float)


def tasks_table(cells: pd.DataFrame) -> str:
    rows = []
    for (task, source, fingerprint), group in cells.dropna(subset=["fingerprint"]).groupby(
        ["task", "source", "fingerprint"]
    ):
        first = group.iloc[0]
        sizes = first.sizes or {}
        n = sizes.get("test")
        units, effective = test_units(group)
        n_units = effective if math.isfinite(effective) else n  # predictions per sequence count, clusters shrink it
        half = worst_half_width(int(n_units)) if n_units else math.nan
        flag = "" if not math.isfinite(half) or half <= CI_TARGET_POINTS else " ⚠ too small for ±3 points"
        rows.append(
            [
                task,
                source,
                length_label(first.length),
                f"{sizes.get('train', '?')}/{sizes.get('validation', '?')}/{n or '?'}",
                f"{first.length_mean:.0f} / {first.length_max}" if pd.notna(first.length_mean) else "–",
                int(first.num_classes) if pd.notna(first.num_classes) else "–",
                (f"±{half:.1f}" if math.isfinite(half) else "–") + flag,
                units,
                fingerprint,
            ]
        )
    headers = [
        "task",
        "source",
        "L",
        "train/val/test",
        "length mean / max (test)",
        "classes",
        "95% half-width at 50% (points, effective units)",
        "test units: predictions / clusters → effective",
        "fingerprint",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def test_units(group: pd.DataFrame) -> tuple[str, float]:
    """The test set's units as one finished cell's outcomes show them: predictions, the clusters
    they come in (queries of one sequence, windows of one page) and the effective number of
    independent units (predictions / design effect, ``harness.core.stats.clustered_interval``)."""
    from harness.core.stats import clustered_interval

    ok = group[(group.status == "ok") & group.items_correct.map(lambda x: isinstance(x, list) and len(x) > 0)]
    if ok.empty:
        return "–", math.nan
    first = ok.iloc[0]
    n = len(first.items_correct)
    count = first.items_count if isinstance(first.items_count, list) and len(first.items_count) == n else None
    clusters = first.clusters if isinstance(first.clusters, list) and len(first.clusters) == n else None
    found = clustered_interval(first.items_correct, clusters, count=count)
    return f"{found['n']:,.0f} / {found['clusters']:,.0f} → {found['n_eff']:,.0f}", found["n_eff"]


def throughput_table(stats: pd.DataFrame) -> str:
    """Row × (task, length): training tokens/s (thousands) · peak memory MB of the cells themselves."""
    ok = stats[stats.n_ok > 0]
    if ok.empty:
        return "_no finished cells_"
    columns = columns_of(ok)
    rows = []
    for label in softmax_first(ok.row):
        row = [label]
        for task, length in columns:
            entry = ok[(ok.task == task) & (ok.length == length) & (ok.row == label)]
            if entry.empty:
                row.append("–")
                continue
            e = entry.iloc[0]
            speed = f"{e.tokens_per_s / 1e3:,.1f}k" if pd.notna(e.tokens_per_s) else "–"
            memory = f"{e.peak_memory_mb:,.0f}" if pd.notna(e.peak_memory_mb) else "–"
            row.append(f"{speed} · {memory}")
        rows.append(row)
    headers = ["mechanism"] + [column_title(t, L, config=column_config(ok, t, L)) for t, L in columns]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def params_table(stats: pd.DataFrame) -> str:
    """Parameters per row and task (its primary length), flagged > 10% over softmax (LRA's budget)."""
    primary = primary_columns(stats)
    rows = []
    for label in softmax_first(stats.row):
        row = [label]
        for task, length in sorted(primary.items()):
            column = stats[(stats.task == task) & (stats.length == length)]
            entry = column[column.row == label]
            if entry.empty or pd.isna(entry.params.iloc[0]):
                row.append("–")
                continue
            params = int(entry.params.iloc[0])
            softmax = column[(column.row == "softmax")].params
            text = f"{params:,}"
            if len(softmax) and pd.notna(softmax.iloc[0]) and label != "softmax":
                ratio = params / float(softmax.iloc[0])
                text += f" ({100 * (ratio - 1):+.0f}%{' ⚠' if ratio > PARAMS_BUDGET else ''})"
            row.append(text)
        rows.append(row)
    headers = ["mechanism"] + [
        column_title(t, L, config=column_config(stats, t, L)) for t, L in sorted(primary.items())
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def recommendation_table(stats: pd.DataFrame, baselines: dict) -> str:
    """Per task and length band: the rows that beat the strongest baseline (paired test) and are
    not significantly below the band's best, fastest first; ✓ marks the Pareto front of
    (accuracy, training throughput). Rows that compute exactly softmax at that length (a window
    or blocks covering the sequence) are left out: they are softmax, not evidence about their
    mechanism. A band where nothing beats the baseline says "no accuracy signal" and lists the
    fastest rows as a cost ranking only."""
    from harness.report.efficiency import pareto_front

    ok = stats[(stats.n_ok > 0) & ~stats.softmax_equivalent.astype(bool)].copy()
    if ok.empty:
        return "_no finished cells_"
    ok["band"] = [band_of(L) for L in ok.length]
    rows = []
    band_order = [label for _, label in BANDS]
    for (task, band), group in sorted(
        ok.groupby(["task", "band"]), key=lambda kv: (kv[0][0], band_order.index(kv[0][1]))
    ):
        higher = bool(group.higher.iloc[0])
        signal = group[group.beats_baseline & group.within_best]
        if signal.empty:
            fastest = group.sort_values("tokens_per_s", ascending=False, na_position="last").head(3)
            for e in (e for _, e in fastest.iterrows()):
                rows.append(
                    [
                        task,
                        band,
                        length_label(e.length),
                        e.row,
                        _short_value(e, higher),
                        *_cost(e),
                        "",
                        "no accuracy signal: cost ranking only",
                    ]
                )
            continue
        signal = signal.sort_values("tokens_per_s", ascending=False, na_position="last")
        points = {
            i: (e.tokens_per_s if pd.notna(e.tokens_per_s) else 0.0, e["mean"] if higher else -e["mean"])
            for i, e in signal.iterrows()
        }
        front = set(pareto_front(points))
        for i, e in signal.iterrows():
            config = f" [{e.column_config}]" if e.get("column_config") else ""
            rows.append(
                [
                    task,
                    band,
                    length_label(e.length) + config,
                    e.row,
                    _short_value(e, higher),
                    *_cost(e),
                    "✓" if i in front else "",
                    "",
                ]
            )
    headers = [
        "task",
        "length band",
        "L",
        "mechanism",
        "accuracy (or bits ↓)",
        "train tokens/s",
        "peak MB",
        "Pareto",
        "note",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _short_value(e, higher: bool) -> str:
    return f"{100 * e['mean']:.1f}" if higher else f"{e['mean']:.3f}"


def _cost(e) -> list[str]:
    return [
        f"{e.tokens_per_s / 1e3:,.1f}k" if pd.notna(e.tokens_per_s) else "–",
        f"{e.peak_memory_mb:,.0f}" if pd.notna(e.peak_memory_mb) else "–",
    ]


def _our_rows(cells: pd.DataFrame, protocols: tuple[str, ...]) -> list[list[str]]:
    """Our ``scale=lra`` cells of these protocols on the real sources, a row per mechanism."""
    ours = cells[(cells.scale == "lra") & (cells.status == "ok") & cells.protocol.isin(protocols)]
    ours = ours[
        pd.Series(
            [s in REAL_SOURCES.get(t, set()) for t, s in zip(ours.task, ours.source)], index=ours.index, dtype=bool
        )
    ]
    mine = []
    for (mech, protocol), group in ours.groupby(["mechanism", "protocol"]):
        values = []
        for task in LRA_TASKS:
            scores = group[group.task == task].test.dropna()
            values.append(100 * scores.mean() if len(scores) else math.nan)
        complete = all(math.isfinite(v) for v in values)
        mine.append(
            [
                f"{mech} (ours)",
                f"measured here, `protocol={protocol}`",
                *[f"{v:.2f}" if math.isfinite(v) else "–" for v in values],
                f"{sum(values) / len(values):.2f}" if complete else "–",
            ]
        )
    return mine


def reference_section(cells: pd.DataFrame) -> str:
    """Published numbers only beside our ``scale=lra`` cells of the protocol they were measured
    under: LRA's Table 1 beside ``protocol=lra``; the PyTorch re-implementations' rows (Skyformer)
    beside ``protocol=pytorch`` (their setup: one small model for every task, text at 4K, their
    retrieval head and budgets). A cell of another protocol is never set beside them."""
    header = ["model", "source", *[t for t in LRA_TASKS], "avg"]
    lra = [[name, "published", *[f"{v:.2f}" for v in values[:5]], f"{values[5]:.2f}"] for name, *values in LRA_TABLE1]
    lines = [
        "## Published reference numbers",
        "",
        "Published rows appear only beside our `scale=lra` cells of the protocol they were measured under "
        "(`protocol=lra|pytorch|nystromformer`, recorded in every cell), on the same real sources (LRA's "
        "ListOps, IMDB bytes, AAN, CIFAR-10, Pathfinder-32 hard), mean over seeds. They are never part of our "
        "means or bold marks. The settings of each protocol and their sources: `docs/protocols.md`.",
        "",
        f"### LRA's own protocol (`protocol=lra`): {LRA_CITATION}",
        "",
        tabulate(lra + _our_rows(cells, ("lra",)), headers=header, tablefmt="github", disable_numparse=True),
        "",
    ]
    for protocol in sorted({p for _, _, p, _ in REIMPLEMENTED_ROWS}):
        rows = [
            [name, f"published [{i + 1}]", *[f"{v:.2f}" for v in values]]
            for i, (name, _, p, values) in enumerate(REIMPLEMENTED_ROWS)
            if p == protocol
        ]
        lines += [
            f"### The PyTorch re-implementations' protocol (`protocol={protocol}`)",
            "",
            tabulate(rows + _our_rows(cells, (protocol,)), headers=header, tablefmt="github", disable_numparse=True),
            "",
            *[f"[{i + 1}] {citation}." for i, (_, citation, p, _) in enumerate(REIMPLEMENTED_ROWS) if p == protocol],
            "",
        ]
    if not _our_rows(cells, tuple(["lra", *{p for _, _, p, _ in REIMPLEMENTED_ROWS}])):
        lines += [
            "_No `scale=lra` cells on the real sources yet: run `make benchmark SCALE=lra` with the LRA data "
            "(see README, tasks; `protocol=pytorch` for the re-implementations' setup)._",
            "",
        ]
    return "\n".join(lines)


def details_section(cells: pd.DataFrame, unreadable: list[dict[str, str]], results_dir: Path) -> str:
    """Only what is not ok (failed, oom, nan, timeout, unreadable), each with its log and curves."""
    bad = cells[cells.status.isin(NOT_OK)]
    rows = []
    for _, c in bad.sort_values(["scale", "task", "mechanism", "variant", "seed"]).iterrows():
        links = f"[log]({c.log}/cell.log) · [curves]({c.log}/curves/metrics.csv)"
        rows.append(
            [
                c.scale,
                c.task,
                c.mechanism,
                c.variant_label or "default",
                c.seed,
                FAILURE_MARK[c.status],
                (c.error or "")[:120].replace("|", "\\|"),
                links,
            ]
        )
    for item in unreadable:
        path = Path(item["path"])
        try:
            shown = path.relative_to(results_dir).as_posix()
        except ValueError:
            shown = str(path)
        rows.append(["?", "?", "?", "?", "?", "✗ unreadable", item["reason"].replace("|", "\\|"), f"`{shown}`"])
    counts = cells[~cells.status.isin(NOT_OK)].status.value_counts()
    rest = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    lines = [
        "## Run details",
        "",
        f"Cells not ok: {len(bad)}; unreadable result files: {len(unreadable)}; "
        f"the other cells: {rest}. Links are relative to this file's folder.",
        "",
    ]
    if rows:
        lines += [
            tabulate(
                rows,
                headers=["scale", "task", "mechanism", "variant", "seed", "status", "error", "files"],
                tablefmt="github",
                disable_numparse=True,
            ),
            "",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def figure_legend(fig, axes, ncol: int = 1) -> None:
    """One legend right of the panels, each label once (the panels share series)."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(
        list(handles.values()), list(handles.keys()), loc="outside right center", fontsize=8, frameon=False, ncol=ncol
    )


def accuracy_length_plot(stats: pd.DataFrame, baselines: dict, path: Path, scale: str) -> Path | None:
    """Accuracy (bits for LM tasks) against sequence length, a panel per task, a line per row;
    the strongest baseline dashed grey; ✕ where a series stops (failed/oom/nan/timeout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from harness.report.efficiency import finish_figure, series_style

    tasks = sorted(stats.task.unique())
    if not tasks:
        return None
    style = series_style(softmax_first(stats.row))
    cols = min(3, len(tasks))
    rows_n = math.ceil(len(tasks) / cols)
    # the legend sits right of the panels: ~0.19 in per entry at fontsize 8, in as many columns as it
    # needs to fit the figure's height (33 series in one column would run off a one-row figure)
    entries = len(style) + 1
    height = 4 * rows_n
    legend_cols = max(1, math.ceil(entries * 0.19 / (height - 0.6)))
    legend_width = 2.4 * legend_cols
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(5 * cols + legend_width, height), squeeze=False, layout="constrained"
    )
    for ax, task in zip(axes.flat, tasks):
        group = stats[(stats.task == task) & (stats.length > 0)]
        higher = bool(group.higher.iloc[0]) if len(group) else True
        failures: list[tuple[float, str, Any]] = []
        scale_y = 100 if higher else 1
        for label in style:
            series = group[group.row == label].sort_values("length")
            if series.empty:
                continue
            done = series[series.n_ok > 0]
            # a line joins two lengths only where both cells ran one config (a column's shared config
            # differs between lengths, e.g. a smaller batch at 4K): otherwise the points stand alone
            runs = (done.column_config != done.column_config.shift()).cumsum() if len(done) else []
            for i, (_, run) in enumerate(done.groupby(runs, sort=False) if len(done) else []):
                ax.plot(
                    run.length, scale_y * run["mean"], label=label if i == 0 else None, markersize=5, **style[label]
                )
            stopped = series[(series.n_ok == 0) & series.statuses.map(lambda s: any(x in NOT_OK for x in s))]
            for _, e in stopped.iterrows():  # no value: a cross at the foot of the panel, at its own length
                status = next(x for x in e.statuses if x in NOT_OK)
                ax.plot(
                    [e.length],
                    [0.03],
                    marker="x",
                    markersize=9,
                    markeredgewidth=2,
                    color=style[label]["color"],
                    linestyle="none",
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    label=None if len(done) else label,
                )
                failures.append((float(e.length), status, style[label]["color"]))
        base_points = []
        for length in sorted(group.length.unique()):
            base = strongest(baselines.get((task, int(length)), {}).get("baselines", []), higher)
            if base:
                base_points.append((length, scale_y * base["value"]))
        if base_points:
            ax.plot(
                *zip(*base_points),
                color="grey",
                linestyle="--",
                linewidth=1.2,
                marker="_",
                markersize=14,
                label="strongest baseline",
            )
        lengths = sorted(group.length.unique())
        if lengths:
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [length_label(L) for L in lengths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        stacked: dict[float, int] = {}
        for length, status, color in failures:  # the status beside its cross, stacked upwards at one length
            k = stacked[length] = stacked.get(length, -1) + 1
            ax.annotate(
                status,
                (length, 0.03),
                xycoords=ax.get_xaxis_transform(),
                textcoords="offset points",
                xytext=(6, -3 + 9 * k),
                fontsize=7,
                color=color,
            )
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel("test accuracy (%)" if higher else "test bits/token (lower is better)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    figure_legend(fig, axes, ncol=legend_cols)
    shared = (
        " · each length at its column's config (the table's column titles)"
        if stats.column_config.astype(bool).any()
        else ""
    )
    return finish_figure(
        fig,
        f"Accuracy vs sequence length — scale `{scale}` (✕ at the foot: no cell finished there; "
        f"lines join only lengths run with one config){shared}",
        path,
    )


def learning_curves_plot(stats: pd.DataFrame, baselines: dict, path: Path, scale: str) -> Path | None:
    """Validation accuracy against training step, a panel per accuracy column (task, length), a
    line per row (mean over seeds at each evaluated step), the strongest baseline dashed: tells a
    slow learner (still rising at the last step) from one that cannot solve the task (flat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.report.efficiency import finish_figure, series_style

    shown = stats[stats.higher & stats.curve.map(bool)]
    columns = columns_of(shown) if len(shown) else []
    if not columns:
        return None
    style = series_style(softmax_first(shown.row))
    cols = min(3, len(columns))
    rows_n = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols + 2.4, 3.8 * rows_n), squeeze=False, layout="constrained")
    for ax, (task, length) in zip(axes.flat, columns):
        column = shown[(shown.task == task) & (shown.length == length)]
        for label in style:
            entry = column[column.row == label]
            if entry.empty:
                continue
            by_step: dict[int, list[float]] = {}
            for curve in entry.iloc[0].curve:
                for step, value in curve:
                    by_step.setdefault(int(step), []).append(float(value))
            steps = sorted(by_step)
            ax.plot(steps, [100 * np.mean(by_step[x]) for x in steps], label=label, markersize=4, **style[label])
        base = strongest(baselines.get((task, int(length)), {}).get("baselines", []), True)
        if base:
            ax.axhline(100 * base["value"], color="grey", linestyle="--", linewidth=1.2, label="strongest baseline")
        warm = column.warmup_steps.dropna()
        if len(warm):  # trained at the short length before this step (validation is at the column's length)
            ax.axvline(float(warm.max()), color="black", linestyle=":", linewidth=1.0, label="end of the warm start")
        config = column_config(stats, task, length)
        ax.set_title(column_title(task, length, True, config), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    figure_legend(fig, axes)
    return finish_figure(fig, f"Learning curves — scale `{scale}` (validation accuracy, mean over seeds)", path)


def accuracy_throughput_plot(
    stats: pd.DataFrame, baselines: dict, path: Path, scale: str, min_rows: int = 3
) -> Path | None:
    """Accuracy against the cells' own training throughput, a panel per task and length (LRA's
    figure 3 from the grid itself, so it needs no speed sweep), and per config (presets or one
    variant): the Pareto front dashed, the strongest baseline dotted; panels with at least
    ``min_rows`` finished rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from harness.report.efficiency import finish_figure, pareto_front, series_style, si_number

    ok = stats[(stats.n_ok > 0) & stats.higher & stats.tokens_per_s.notna() & (stats.length > 0)].copy()
    # one panel per config too: throughputs of a preset model and a 4x smaller variant do not compare
    ok["config"] = [
        row.split(" [", 1)[1].rstrip("]") if " [" in row else column for row, column in zip(ok.row, ok.column_config)
    ]
    panels = [(t, L, c) for (t, L, c), g in ok.groupby(["task", "length", "config"]) if len(g) >= min_rows]
    if not panels:
        return None
    style = series_style(softmax_first(ok.row))
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.8 * cols, 4.2 * rows_n), squeeze=False, layout="constrained")
    for ax, (task, length, config) in zip(axes.flat, panels):
        group = ok[(ok.task == task) & (ok.length == length) & (ok.config == config)]
        points = {e.row: (float(e.tokens_per_s), 100 * float(e["mean"])) for _, e in group.iterrows()}
        for label, (x, y) in points.items():  # named in the panel's legend: labels beside points collide
            ax.scatter(x, y, color=style[label]["color"], marker=style[label]["marker"], s=36, alpha=0.8, label=label)
        front = pareto_front(points)  # ordered by throughput
        ax.plot(
            [points[m][0] for m in front],
            [points[m][1] for m in front],
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
        base = strongest(baselines.get((task, int(length)), {}).get("baselines", []), True)
        if base:
            ax.axhline(
                100 * base["value"], color="grey", linestyle=":", linewidth=1.2, label=f"baseline: {base['name']}"
            )
        ax.set_xscale("log")
        # ticks at 1, 2 and 5 per decade, written 20k / 50k: the default minor labels of a range
        # within one decade run together (3×10⁴4×10⁴)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: si_number(v)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{task}, L = {length_label(length)}, {f'variant {config}' if config else 'presets'}", fontsize=10)
        ax.set_xlabel("training throughput of the cell (tokens/s, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(0.12)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return finish_figure(
        fig, f"Accuracy vs training throughput — scale `{scale}`, a panel per task, length and config", path
    )


# ----------------------------------------------------------------------------- the page


def header_lines(cells: pd.DataFrame, speed_records: list[dict[str, Any]], results_dir: Path) -> list[str]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit, dirty = code_commit()
    at = f" at commit {commit}{' (with uncommitted changes)' if dirty else ''}" if commit else ""
    lines = [
        f"Generated {stamp} from {len(cells)} cell results in `{results_dir}/runs` by `python -m harness report`"
        f"{at}; the cells' own commits are below.",
        "",
    ]
    if cells.empty:
        return lines
    seeds = "; ".join(f"`{s}`: {', '.join(str(x) for x in sorted(set(g.seed)))}" for s, g in cells.groupby("scale"))
    grid_wall = float(cells.wall_s.fillna(0).sum())
    speed_wall = float(sum((r.get("wall_s") or 0) for r in speed_records if r.get("kind") == "speed"))
    total = grid_wall + speed_wall
    lines += [
        f"- **scale(s)**: {', '.join(f'`{s}`' for s in sorted(cells.scale.unique()))}; **seeds**: {seeds}",
        f"- **hardware**: {', '.join(sorted(set(cells.device.dropna()))) or '?'}; "
        f"**torch**: {', '.join(sorted(set(cells.torch.dropna()))) or '?'}; "
        "**commit(s)**: "
        f"{', '.join(sorted({c for cs in cells.commits for c in cs} | set(cells.commit.dropna()))) or '?'}"
        + code_caveat(cells),
        f"- **total wall time**: {total / 3600:.2f} h (cells {grid_wall / 3600:.2f} h + speed sweep "
        f"{speed_wall / 3600:.2f} h, summed from the records)",
    ]
    measured = make_benchmark_line(results_dir)
    return lines + ([measured] if measured else []) + [""]


def code_caveat(cells: pd.DataFrame) -> str:
    """Cells whose code is not one commit: trained under several (resumed across a change), or
    with imported files that differ from their commit (``env.dirty_files`` in their records)."""
    dirty = int((cells.dirty == True).sum())  # noqa: E712 - None (not recorded) is not dirty
    several = int(sum(len(c) > 1 for c in cells.commits))
    parts = ([f"{dirty} cell(s) ran code that differs from its commit (env.dirty_files)"] if dirty else []) + (
        [f"{several} cell(s) trained under several commits (env.segments)"] if several else []
    )
    return f" ({'; '.join(parts)})" if parts else ""


def make_benchmark_line(results_dir: Path) -> str | None:
    """The last ``make benchmark``'s own clock (``runs/make_benchmark.json``, written by the
    Makefile): start to end, processes, data preparation and the speed sweep included."""
    path = results_dir / "runs" / "make_benchmark.json"
    try:
        run = json.loads(path.read_text())
        started, finished = int(run["started"]), int(run["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    when = datetime.fromtimestamp(finished, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"- **measured `{run.get('command', 'make benchmark')}`**: {(finished - started) / 3600:.2f} h "
        f"start to end (finished {when}; grid exit status {run.get('grid_status', '?')})"
    )


LEGEND = (
    "Test metric of the checkpoint selected on validation: accuracy (%) or bits/token (↓). Each cell: "
    "mean ± std over seeds (one config), then a 95% interval that adds the seeds' variance to the test "
    "set's (cluster-robust where test units come in clusters: the queries of one sequence, windows of one "
    "page; Wilson's on the test size for records without per-item outcomes; ±1.96 SE over test sequences "
    "for bits). **Bold**: beats the strongest baseline row of its column under a paired test on the same "
    "test items (paired bootstrap over items and seeds, one-sided p < 0.05) *and* is not significantly "
    "below the column's best (the same test). ◦: does not beat the strongest (shortcut) baseline. "
    "≡softmax: at this length the mechanism computes exactly softmax attention (its window or blocks "
    "cover the sequence; measured against the float64 oracle), so the row is not independent evidence "
    "and is left out of the recommendation. Baselines are computed from the same splits "
    "(`harness/report/baselines.py`). A label in brackets is a variant (its config differs from the scale's "
    "presets); length is the column; a bracket in a column's title is the config every cell of that "
    "column shares, whose rows are then plain mechanism names. `n/a`: the mechanism lacks a capability "
    "the task needs; `✗ status`: failed (see run details). †: trained on other data than the column's "
    "baseline rows; judged against the baselines of its own data. Average: of chance-normalised accuracy "
    "(acc − c) / (1 − c), c = the column's majority rate, over accuracy tasks at each task's "
    "most-populated length; a row missing one of them has none."
)


def scale_section(scale: str, cells: pd.DataFrame, results_dir: Path) -> list[str]:
    baselines = column_baselines(cells, results_dir / "baselines")
    stats = group_stats(cells, baselines)
    table = accuracy_table(stats, baselines)[0]
    lines = [f"## Accuracy — scale `{scale}`", "", LEGEND, "", table, ""]
    key = variant_key(cells)
    if key:
        lines += [key, ""]
    errors = sorted(
        {
            f"{key[0]} L={length_label(key[1])}{' (data ' + key[2] + ')' if len(key) > 2 else ''}: {v['error']}"
            for key, v in baselines.items()
            if v.get("error")
        }
    )
    if errors:
        lines += ["Baselines not computed from the splits: " + "; ".join(errors), ""]
    plot = accuracy_length_plot(stats, baselines, results_dir / "plots" / f"accuracy_vs_length_{scale}.png", scale)
    lines += [f"### Accuracy against sequence length — scale `{scale}`", ""]
    if plot:
        lines += [f"![accuracy vs length]({plot.relative_to(results_dir).as_posix()})", ""]
    speed_plot = accuracy_throughput_plot(
        stats, baselines, results_dir / "plots" / f"accuracy_vs_throughput_{scale}.png", scale
    )
    if speed_plot:
        lines += [f"![accuracy vs throughput]({speed_plot.relative_to(results_dir).as_posix()})", ""]
    curves = learning_curves_plot(stats, baselines, results_dir / "plots" / f"learning_curves_{scale}.png", scale)
    if curves:
        lines += [
            f"### Learning curves — scale `{scale}`",
            "",
            "Validation accuracy while training (mean over seeds): a row still rising at its last step is "
            "a slow learner at this budget; a flat one near the baseline did not find the task.",
            "",
            f"![learning curves]({curves.relative_to(results_dir).as_posix()})",
            "",
        ]
    lines += [
        f"### Recommendation — scale `{scale}`",
        "",
        "Per task and length band: the mechanisms that beat the strongest baseline and are not significantly "
        "below the band's best (both by the paired test), fastest training first (tokens/s and peak memory "
        "of the cells themselves); ✓: on the Pareto front of accuracy and throughput. Rows that are "
        "softmax in disguise at that length are left out. Where no row beats the baseline the band has "
        "no accuracy signal and lists its fastest rows as a cost ranking only.",
        "",
        recommendation_table(stats, baselines),
        "",
    ]
    lines += [f"### Tasks — scale `{scale}`", "", tasks_table(cells), ""]
    lines += [
        f"### Training throughput — scale `{scale}`",
        "",
        "Measured during the grid's own training (median over seeds): thousands of padded tokens per "
        "second of training steps after warm-up · peak memory in MB (CUDA max allocated, or the "
        "process's peak RSS on CPU). Compare within a column.",
        "",
        throughput_table(stats),
        "",
    ]
    lines += [
        f"### Parameters — scale `{scale}`",
        "",
        "Model parameters per task (at its most-populated length), relative to softmax; ⚠: more than 10% "
        "over softmax (LRA's parameter budget).",
        "",
        params_table(stats),
        "",
    ]
    return lines


def efficiency_section(results_dir: Path, params: dict[str, int], records: list[dict[str, Any]]) -> str:
    """Tables and plots from the speed benchmark (``harness.bench.speed``), when it has run."""
    from harness.report import efficiency

    if not records:
        return "\n## Efficiency\n\n_No speed benchmark yet: run `make speed`._\n"
    text = efficiency.efficiency_markdown(records, params=params)
    written = efficiency.write_plots(records, results_dir / "plots")
    images = "\n".join(f"![{p.stem}]({p.relative_to(results_dir).as_posix()})" for p in written)
    return "\n" + text + ("\n" + images + "\n" if images else "")


def write_report(results_dir: str | Path = "results", *, force: bool = False) -> Path:
    results_dir = Path(results_dir)
    records, unreadable = scan_results(results_dir)
    check_not_shrinking(results_dir / "leaderboard.md", len(records), force=force)
    from harness.report import efficiency

    speed_records = efficiency.load_records(results_dir / "speed")
    out = results_dir / "leaderboard.md"
    cells = cells_frame(records)
    lines = ["# Leaderboard", "", *header_lines(cells, speed_records, results_dir)]
    params: dict[str, int] = {}
    if cells.empty:
        lines += ["_No results yet: run `make smoke` or `make benchmark`._", ""]
    else:
        scales = sorted(cells.scale.unique(), key=lambda s: (SCALE_ORDER.index(s) if s in SCALE_ORDER else 9, s))
        for scale in scales:
            lines += scale_section(scale, cells[cells.scale == scale], results_dir)
        ok = cells[(cells.status == "ok") & (cells.variant == "")].sort_values(["task"], key=lambda t: t != "listops")
        params = ok.dropna(subset=["params"]).groupby("mechanism", sort=False).params.first().astype(int).to_dict()
        lines.append(reference_section(cells))
    lines.append(efficiency_section(results_dir, params, speed_records))
    lines.append(details_section(cells, unreadable, results_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    return out


@dataclass
class ReportSettings:
    """``python -m harness report`` settings."""

    results_dir: str = "results"  # reads <results_dir>/runs and /speed; writes leaderboard.md and plots/ there
    force: bool = False  # write even when the new table has fewer cells than the one on disk


def main(argv: list[str] | None = None) -> int:
    """Write the report; exit 1 when it refuses (a table that would shrink without force=true)."""
    from harness.core.overrides import parse

    settings = parse(
        ReportSettings,
        sys.argv[1:] if argv is None else argv,
        command="report",
        refused={"out": "use results_dir= (the folder holding runs/ and speed/)"},
    )
    try:
        path = write_report(settings.results_dir, force=settings.force)
    except WouldShrink as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
