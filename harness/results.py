"""The result of one grid cell: a dataclass, written atomically as JSON, read back.

A cell is its whole effective config (task with its source and data, mechanism, model,
train, trainer precision): ``config`` holds it, ``config_hash`` identifies it. The cell
with the scale's presets is the *default* variant (``variant == ""``); any other config is
its own record under a folder named by its hash, so two configs never share a result:

    <results_dir>/runs/<scale>/<task>/<mechanism>/seed<k>.json              (presets)
    <results_dir>/runs/<scale>/<task>/<mechanism>/<variant>/seed<k>.json    (any other config)

``variant_label`` says in words how a variant differs from the presets
(e.g. ``mechanism.num_features=128, model.depth=2``).
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    variant: str = ""  # "" for the scale's presets, else the config hash
    variant_label: str = ""  # how the config differs from the presets, in override syntax
    protocol: str = ""  # whose settings at a scale with protocols (scale=lra: lra | pytorch | nystromformer); else ""
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None  # set when a killed run was resumed from its checkpoint
    warnings: list[str] = field(default_factory=list)
    # per test item, in test-split order: {"correct": [...], "count": [...]} (predictions scored per
    # example, or per sequence for per-position tasks): what the report's paired tests compare
    test_items: dict[str, list[int]] = field(default_factory=dict)
    # [[step, validation accuracy (bits/token for LMs)], ...] of every validation while training
    val_curve: list[list[float]] = field(default_factory=list)
    # does the mechanism compute exactly softmax at this sequence length (measured at the start of
    # the cell by harness.attention.computes_softmax; None: not checked, e.g. above 4K tokens)
    softmax_equivalent: bool | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status '{self.status}' is not one of {STATUSES}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def result_path(results_dir: str | Path, scale: str, task: str, mechanism: str, seed: int, variant: str = "") -> Path:
    folder = Path(results_dir) / "runs" / scale / task / mechanism
    return (folder / variant if variant else folder) / f"seed{seed}.json"


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON to a temp file in the same folder, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a result is for every reader
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(payload), f, indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return _finite(value.item())
    return str(value)


def _finite(value: Any) -> Any:
    """Non-finite floats become null: a result file is always valid JSON (the status says
    why a metric is missing, e.g. ``nan``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_result(results_dir: str | Path, result: Result) -> Path:
    path = result_path(results_dir, result.scale, result.task, result.mechanism, result.seed, result.variant)
    return write_json_atomic(path, result.as_dict())


REQUIRED_KEYS = ("task", "mechanism", "scale", "seed", "status")


class UnreadableResult(ValueError):
    """A result file that is truncated, empty, binary, not an object or lacks a key."""


def load_result(path: str | Path) -> dict[str, Any]:
    """The record in ``path``; UnreadableResult (saying why) for anything that isn't one."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableResult(f"cannot read: {exc.strerror or exc}") from None
    if not raw.strip():
        raise UnreadableResult("empty file")
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UnreadableResult("not UTF-8 text (binary?)") from None
    except json.JSONDecodeError as exc:
        raise UnreadableResult(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(record, dict):
        raise UnreadableResult(f"not a JSON object but {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise UnreadableResult(f"no {', '.join(missing)} (not a result record)")
    if record["status"] not in STATUSES:
        raise UnreadableResult(f"unknown status {record['status']!r}")
    record.setdefault("variant", "")
    record.setdefault("variant_label", "")
    return record


def read_result(path: str | Path) -> dict[str, Any] | None:
    """The record in ``path``, or None when there is none or it is unreadable."""
    try:
        return load_result(path)
    except UnreadableResult:
        return None


def scan_results(results_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(records, unreadable) under ``<results_dir>/runs``: every readable record (with its
    ``_path``), and ``{"path", "reason"}`` for every file that is not one. Never raises on a
    bad file, so a report or a grid survives any of them."""
    records, unreadable = [], []
    for path in sorted((Path(results_dir) / "runs").rglob("seed*.json")):
        try:
            record = load_result(path)
        except UnreadableResult as exc:
            unreadable.append({"path": str(path), "reason": str(exc)})
            continue
        record["_path"] = str(path)
        records.append(record)
    return records, unreadable


def read_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable result under ``<results_dir>/runs`` (see ``scan_results``)."""
    return scan_results(results_dir)[0]


def code_commit() -> tuple[str | None, bool]:
    """(short commit of this checkout or None, whether tracked files outside ``results/`` differ from it:
    a regenerated leaderboard is not a change of code)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results"],
                capture_output=True, text=True,
                cwd=Path(__file__).parent, timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return commit, dirty


def environment() -> dict[str, Any]:
    """Commit, torch version and device, recorded with every result."""
    import platform

    import torch

    commit, dirty = code_commit()
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
