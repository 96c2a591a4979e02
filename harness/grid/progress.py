"""One line per finished cell of a sweep, from a Hydra callback (``hydra.callbacks``):

    [ 12/98] ok       mqar/performer[mqar_4k]/seed0   test accuracy 0.364   112 s   ETA 2h31m

The name in brackets is the cell's label in the grid's cells file (``hydra/sweeper=cells``: its
bundle and swept values), else its variant. k counts finished cells across every process of the
grid (a line per cell in ``<sweep dir>/progress.tsv``: status, seconds, whether it ran, name, and
when it finished (seconds since the epoch), appended under a lock, so joblib and submitit workers
count too); N and the grid's offset come from the grid (``HARNESS_GRID_TOTAL``) or default to the
sweep's size. The ETA is the mean wall time of the cells that ran (recorded cells that were
skipped cost nothing) times the cells left, divided by the cells that run at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

TOTAL_ENV = "HARNESS_GRID_TOTAL"
JOBS_ENV = "HARNESS_GRID_JOBS"
PROGRESS_ENV = "HARNESS_GRID_PROGRESS"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def key_metric(record: dict[str, Any]) -> str:
    test = (record.get("metrics") or {}).get("test") or {}
    if "bits_per_token" in test:
        return f"test bits/token {test['bits_per_token']:.3f}"
    if "exact" in test:
        return f"test exact match {test['exact']:.3f}"
    if "accuracy" in test:
        return f"test accuracy {test['accuracy']:.3f}"
    return record.get("error") or ""


class CellProgress(Callback):
    """Prints the progress line of each finished cell, in the process that launched it."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._labels: dict[str, list[str]] = {}  # cells file -> each cell's label

    def _label(self, config: DictConfig, num: int) -> str:
        """The cell's label in the grid's cells file ('' outside a grid, or when it has none)."""
        try:
            path = config.hydra.sweeper.get("cells_file")
        except Exception:
            return ""
        if not path:
            return ""
        if path not in self._labels:
            from harness.grid.launcher import read_cells

            try:
                self._labels[path] = [str(c.get("name") or "") for c in read_cells(path)]
            except (OSError, ValueError):
                self._labels[path] = []
        labels = self._labels[path]
        return labels[num] if 0 <= num < len(labels) else ""

    @staticmethod
    def _multirun(config: DictConfig) -> bool:
        try:
            return str(config.hydra.mode) in ("RunMode.MULTIRUN", "MULTIRUN")
        except Exception:
            return False

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._multirun(config):
            self._started[int(config.hydra.job.num)] = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self._multirun(config):
            return
        from filelock import FileLock

        num = int(config.hydra.job.num)
        elapsed = time.time() - self._started.pop(num, time.time())
        record = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(record, dict):
            status = record.get("status", "?")
            ran = not record.get("_skipped")
            tag = self._label(config, num) or record.get("variant")
            name = (
                f"{record.get('task')}/{record.get('mechanism')}"
                + (f"[{tag}]" if tag else "")
                + (f"/seed{record.get('seed')}")
            )
            detail = key_metric(record) if status != "running" else "running in another process"
            if not ran:
                detail += " (recorded before: skipped)"
        else:
            status = "done" if job_return.status == JobStatus.COMPLETED else "failed"
            ran = True
            name = " ".join(job_return.overrides or [])
            value = job_return._return_value
            detail = str(value).splitlines()[0] if value is not None and status == "failed" else ""
        progress = Path(os.environ.get(PROGRESS_ENV) or Path(str(config.hydra.sweep.dir)) / "progress.tsv")
        progress.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(progress) + ".lock"):
            with open(progress, "a") as f:
                f.write(f"{status}\t{elapsed:.1f}\t{int(ran)}\t{name}\t{time.time():.2f}\n")
            rows = [line.split("\t") for line in progress.read_text().splitlines() if line.count("\t") >= 3]
        done = len(rows)
        total = int(os.environ.get(TOTAL_ENV) or 0) or done
        ran_times = [float(r[1]) for r in rows if r[2] == "1"]
        jobs = max(1, int(os.environ.get(JOBS_ENV) or 1))
        eta = ""
        if ran_times and total > done:
            eta = f"   ETA {format_duration(sum(ran_times) / len(ran_times) * (total - done) / jobs)}"
        width = len(str(total))
        print(f"[{done:>{width}}/{total}] {status:<11} {name}   {detail}   {format_duration(elapsed)}{eta}", flush=True)
