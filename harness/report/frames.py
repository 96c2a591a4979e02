"""``load_frame``: the results as a pandas DataFrame, validated as the report reads them."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from harness.core.results import scan_results
from harness.report.efficiency import load_records, speed_frame
from harness.report.leaderboard import cells_frame

log = logging.getLogger(__name__)


def load_frame(results_dir: str | Path = "results", kind: str = "cells"):
    """The results as a ``pandas.DataFrame``, one row per record, validated as the report reads them.

    ``kind="cells"``: one row per grid cell under ``<results_dir>/runs`` (scale, task, mechanism,
    seed, variant, length, status, metric, test, params, tokens_per_s, peak_memory_mb, wall_s,
    data fingerprint, commit, ...: the columns the leaderboard is built from), then one column
    per setting of the cells' configs, named by its path in the record's ``config``
    (``config.task.max_len``, ``config.model.depth``, ``config.train.lr``,
    ``config.mechanism.num_features``, ``config.trainer.precision``; empty where a cell has no
    such setting, e.g. another mechanism's). Records of an older schema are read upgraded
    (``harness.core.results.upgrade_record``); records that are unreadable or fail the schema
    are left out and logged. ``kind="speed"``: one row per
    speed measurement under ``<results_dir>/speed`` (mechanism, mode, causal, length, status,
    tokens_per_s, time_s, memory_mb, params)."""
    if kind == "cells":
        records, unreadable = scan_results(results_dir)
        for bad in unreadable:
            log.warning("left out %s: %s", bad["path"], bad["reason"])
        settings = pd.json_normalize([r.get("config") or {} for r in records]).add_prefix("config.")
        return pd.concat([cells_frame(records), settings], axis=1)
    if kind == "speed":
        return speed_frame(load_records(Path(results_dir) / "speed"))
    raise ValueError(f"load_frame: kind={kind!r} is not one of cells, speed")
