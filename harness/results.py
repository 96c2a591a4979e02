"""The result of one grid cell: a dataclass, written atomically as JSON, read back.

Path: ``<results_dir>/runs/<scale>/<task>/<mechanism>/seed<k>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed", "oom", "nan", "timeout", "unsupported")
FINISHED = ("ok", "unsupported")  # never re-run unless rerun=all


@dataclass
class Result:
    task: str
    mechanism: str
    mechanism_config: dict[str, Any]
    scale: str
    seed: int
    status: str
    error: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    params: int | None = None
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    wall_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    task_config: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    mechanism_metrics: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    best_step: int | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status '{self.status}' is not one of {STATUSES}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def result_path(results_dir: str | Path, scale: str, task: str, mechanism: str, seed: int) -> Path:
    return Path(results_dir) / "runs" / scale / task / mechanism / f"seed{seed}.json"


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON to a temp file in the same folder, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_result(results_dir: str | Path, result: Result) -> Path:
    path = result_path(results_dir, result.scale, result.task, result.mechanism, result.seed)
    return write_json_atomic(path, result.as_dict())


def read_result(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable result under ``<results_dir>/runs``; unreadable files are skipped
    with a warning (a report never dies on one bad file)."""
    import logging

    out = []
    for path in sorted((Path(results_dir) / "runs").glob("*/*/*/seed*.json")):
        record = read_result(path)
        if record is None or "status" not in record:
            logging.getLogger(__name__).warning("skipping unreadable result %s", path)
            continue
        record["_path"] = str(path)
        out.append(record)
    return out


def environment() -> dict[str, Any]:
    """Commit, torch version and device, recorded with every result."""
    import platform

    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                cwd=Path(__file__).parent, timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
    }
