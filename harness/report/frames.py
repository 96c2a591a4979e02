"""``load_frame``: the results as a pandas DataFrame, validated as the report reads them."""

from __future__ import annotations

import logging
from pathlib import Path

from harness.core.results import scan_results
from harness.report.efficiency import load_records, speed_frame
from harness.report.leaderboard import cells_frame

log = logging.getLogger(__name__)


def load_frame(results_dir: str | Path = "results", kind: str = "cells"):
    """The results as a ``pandas.DataFrame``, one row per record, validated as the report reads them.

    ``kind="cells"``: one row per grid cell under ``<results_dir>/runs`` (scale, task, mechanism,
    seed, variant, length, status, metric, test, params, tokens_per_s, peak_memory_mb, wall_s,
    data fingerprint, commit, ...: the columns the leaderboard is built from); records that
    are unreadable or fail the schema are left out and logged. ``kind="speed"``: one row per
    speed measurement under ``<results_dir>/speed`` (mechanism, mode, causal, length, status,
    tokens_per_s, time_s, memory_mb, params)."""
    if kind == "cells":
        records, unreadable = scan_results(results_dir)
        for bad in unreadable:
            log.warning("left out %s: %s", bad["path"], bad["reason"])
        return cells_frame(records)
    if kind == "speed":
        return speed_frame(load_records(Path(results_dir) / "speed"))
    raise ValueError(f"load_frame: kind={kind!r} is not one of cells, speed")
