"""The result of one grid cell: a dataclass, written atomically as JSON, read back.

A cell is its whole effective config (task with its source and data, mechanism, model,
train, trainer precision): ``config`` holds it, once (``config.task.max_len``,
``config.mechanism.num_features``, ...), and ``config_hash`` identifies it. The cell
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
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "oom", "nan", "timeout", "unsupported")
FINISHED = ("ok", "unsupported")  # never re-run unless rerun=all


@dataclass
class Result:
    """One cell's record (layout ``SCHEMA_VERSION``): its names, status, measurements, data and
    environment, and its settings once, in ``config`` (the cell's identity,
    ``harness.train.cells.cell_identity``: scale, task, mechanism, model, train, trainer and,
    at a scale with protocols, protocol)."""

    task: str
    mechanism: str
    scale: str
    seed: int
    status: str
    error: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: int | None = None
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    wall_s: float | None = None  # the cell's training and testing, from its trainer's start (resumed runs summed)
    # the cell process's whole wall time, from its start (interpreter, imports, data loading, model
    # building included) to the record's write; a resumed cell adds its earlier runs' ``wall_s`` part
    process_wall_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    mechanism_metrics: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    best_step: int | None = None
    variant: str = ""  # "" for the scale's presets, else the config hash
    variant_label: str = ""  # how the config differs from the presets, in override syntax
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # every setting of the cell, once
    resumed_from_step: int | None = None  # set when a killed run was resumed from its checkpoint
    warnings: list[str] = field(default_factory=list)
    # per test item, in test-split order: {"correct": [...], "count": [...]} (predictions scored per
    # example, or per sequence for per-position tasks): what the report's paired tests compare
    test_items: dict[str, list[int]] = field(default_factory=dict)
    # [[step, validation accuracy (bits/token for LMs)], ...] of every validation while training
    val_curve: list[list[float]] = field(default_factory=list)
    # does the mechanism compute exactly softmax at this sequence length (measured at the start of
    # the cell by harness.core.attention.computes_softmax; None: not checked, e.g. above 4K tokens)
    softmax_equivalent: bool | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status '{self.status}' is not one of {STATUSES}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc")


def status_of(exc: BaseException) -> str:
    """The status of a cell or a measurement that raised ``exc``: the one classification of
    errors, for ``harness.train.run`` and ``harness.bench.speed`` alike. An exception class may name its
    own status (``status = "timeout"``: the cell's and the measurement's time limits;
    ``"nan"``: a non-finite loss); out of memory is ``oom`` on every device (CUDA's
    OutOfMemoryError, MemoryError, the CPU allocator's "can't allocate memory" under
    ``ulimit -v``, C++'s bad_alloc); anything else ``failed``."""
    own = getattr(type(exc), "status", None)
    if isinstance(own, str) and own in STATUSES:
        return own
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or any(m in text for m in OOM_MARKERS):
        return "oom"
    return "failed"


def last_line(exc: BaseException) -> str:
    """The last line of ``exc`` as Python prints it (``ValueError: shape``): what a record's
    ``error`` holds, for a cell and a measurement alike."""
    lines = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` (same suffix) to write to; renamed onto ``path`` when the
    block ends without an error, removed otherwise. A reader sees the old file or the new one,
    never a torn one (a full disk, a kill half-way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


BUILT_FROM = re.compile(
    r"\bfrom (\d+) cell results\b"
)  # the leaderboard's header: "Generated … from 78 cell results …"


class WouldShrink(ValueError):
    """A report would replace a leaderboard built from more cell results than exist now."""


def check_not_shrinking(leaderboard: str | Path, n_records: int, *, force: bool = False) -> None:
    """Refuse (``WouldShrink``, one line) to replace a leaderboard whose header says it was built
    from more cell results than the ``n_records`` now at hand: a fresh clone has the committed
    leaderboard but not the runs behind it, and ``make report`` there must not turn it into
    "No results yet". ``force`` replaces it anyway."""
    if force:
        return
    try:
        with open(leaderboard, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:  # none yet
        return
    match = BUILT_FROM.search(head)
    if match and int(match.group(1)) > n_records:
        raise WouldShrink(
            f"{leaderboard} was built from {match.group(1)} cell results and only {n_records} exist "
            f"now; not overwritten (force=true replaces it)"
        )


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``Path.write_text``, atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure_atomic(fig, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig(path)``, atomically (see ``atomic_path``); the format from the suffix."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or None, **kwargs)
    return Path(path)


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


# The cell record's layout. 1: the first versioned one (records without the key are the same
# layout, written before it was versioned); it stored the settings twice, as ``config`` and as
# ``task_config``/``mechanism_config``/``model_config``/``train_config`` (and ``protocol``).
# 2: the settings once, in ``config``. A reader upgrades older records (``upgrade_record``) and
# refuses newer ones.
SCHEMA_VERSION = 2
V1_COPIES = ("task_config", "mechanism_config", "model_config", "train_config", "protocol")


def config_section(config: dict[str, Any], section: str) -> dict[str, Any]:
    """The settings of one section of a cell's ``config`` (``task``, ``mechanism``, ``model``, ...)
    without its ``name``: what the task, mechanism or model is built from."""
    return {k: v for k, v in (config.get(section) or {}).items() if k != "name"}


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` in today's layout (``SCHEMA_VERSION``), from any older one; a record of today's
    layout (or of an unknown version, for ``record_problem`` to refuse) is returned as it is.

    Version 1 to 2: the copies of the settings (``task_config``, ``mechanism_config``,
    ``model_config``, ``train_config``, ``protocol``) go; ``config`` stays. A version-1 record from
    before ``config`` was recorded gets one built from the copies (``config.task`` is
    ``{"name": <task>, **task_config}``, likewise the mechanism; ``config.model`` and
    ``config.train`` the copies as they are). The argument is not changed."""
    version = record.get("schema_version", 1)
    if version != 1:
        return record
    old = {key: record.get(key) for key in V1_COPIES}
    record = {k: v for k, v in record.items() if k not in V1_COPIES}
    config = record.get("config")
    if isinstance(config, dict) and config:
        config = dict(config)
    else:
        config = {"scale": record.get("scale")}
        for section in ("task", "mechanism"):
            settings = old[f"{section}_config"]
            if isinstance(settings, dict):
                config[section] = {"name": record.get(section), **settings}
        for section in ("model", "train"):
            settings = old[f"{section}_config"]
            if isinstance(settings, dict):
                config[section] = dict(settings)
    if old["protocol"] and "protocol" not in config:
        config["protocol"] = old["protocol"]
    record["config"] = config
    record["schema_version"] = SCHEMA_VERSION
    return record


def write_result(results_dir: str | Path, result: Result) -> Path:
    path = result_path(results_dir, result.scale, result.task, result.mechanism, result.seed, result.variant)
    return write_json_atomic(path, {"schema_version": SCHEMA_VERSION, **result.as_dict()})


PROJECT_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "HARNESS_CACHE_DIR"  # the data cache's root (harness.data.task), else DEFAULT_CACHE_DIR
DEFAULT_CACHE_DIR = ".cache/data"


def record_cache_path(record: dict[str, Any]) -> str:
    """Where the data cache of ``record`` is now, from any working folder: ``data.cache_path``
    below the recorded ``data.cache_root``, else below today's root (``$HARNESS_CACHE_DIR`` or
    the project's ``.cache/data``: the cache moved). An older record's path relative to the
    folder its cell ran in is looked up from the working folder, the results folder's parent
    and the project. The first that holds data, else the first candidate (for the message);
    "" when the record names none."""
    data = record.get("data") or {}
    recorded = data.get("cache_path")
    if not recorded or not isinstance(recorded, str):
        return ""
    path = Path(recorded)
    if path.is_absolute():
        return recorded
    roots = [Path(os.environ[CACHE_ENV])] if os.environ.get(CACHE_ENV) else []
    roots.append(PROJECT_ROOT / DEFAULT_CACHE_DIR)
    if data.get("cache_root"):  # relative to the cache's root
        candidates = [Path(data["cache_root"]) / path, *(root / path for root in roots)]
    else:  # relative to the working folder of the cell's run
        candidates = [Path.cwd() / path]
        runs = next((p for p in Path(record.get("_path", "")).parents if p.name == "runs"), None)
        if runs is not None:
            candidates.append(runs.parent.parent / path)
        candidates.append(PROJECT_ROOT / path)
        if path.parts[:2] == Path(DEFAULT_CACHE_DIR).parts:
            candidates += [root / Path(*path.parts[2:]) for root in roots]
    found = next((c for c in candidates if (c / "data").is_dir()), candidates[0])
    return str(found.resolve())


REQUIRED_KEYS = ("task", "mechanism", "scale", "seed", "status")


class UnreadableResult(ValueError):
    """A result file that is truncated, empty, binary, not an object or lacks a key."""


def load_result(path: str | Path) -> dict[str, Any]:
    """The record in ``path`` in today's layout (an older one upgraded, ``upgrade_record``), checked
    against the schema (``record_problem``); UnreadableResult (saying why) for anything that isn't one."""
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
    problem = record_problem(record)
    if problem:
        raise UnreadableResult(problem)
    record = upgrade_record(record)
    record.setdefault("variant", "")
    record.setdefault("variant_label", "")
    return record


# ----------------------------------------------------------------------------- the record's schema


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_fraction_metric(name: str) -> bool:
    """Metrics that are a share of the test set, so within [0, 1]: accuracy (and its interval
    ``accuracy_ci95``), Spider's exact and execution match (overall and per hardness), the
    valid-SQL rate."""
    return bool({"accuracy", "exact", "execution"} & set(name.split("_"))) or name == "valid_sql"


_TEXT = ("task", "mechanism", "scale", "variant", "variant_label")
_OPTIONAL_TEXT = ("error", "config_hash")
_OBJECTS = ("data", "env", "config", "mechanism_metrics", "test_items", "metrics")
_CONFIG_SECTIONS = ("task", "mechanism", "model", "train", "trainer")
_COUNTS = ("params", "steps", "best_step", "resumed_from_step")
_AMOUNTS = ("tokens_per_s", "peak_memory_mb", "wall_s", "process_wall_s")


def record_problem(record: dict[str, Any]) -> str | None:
    """Why ``record`` is not a valid result of its ``schema_version`` (absent: 1), in one line, or
    None: a version this harness knows (1 to ``SCHEMA_VERSION``), and the types and ranges of
    every field the report reads, checked on the record as ``upgrade_record`` makes it (a
    version-1 record's copies of its settings must be objects; today's layout holds the settings
    only in ``config``, an object whose sections are objects naming the record's task and
    mechanism). Optional fields may be absent or null; present ones must have their type."""
    version = record.get("schema_version", 1)
    if not _is_count(version) or not 1 <= version <= SCHEMA_VERSION:
        return (
            f"schema_version {_shown(version)}: this harness reads records of version 1 up to version "
            f"{SCHEMA_VERSION} (a newer harness wrote it?)"
        )
    if version == 1:
        for key in V1_COPIES[:-1]:
            if record.get(key) is not None and not isinstance(record[key], dict):
                return f"{key} is {_shown(record[key])}, not an object"
        if record.get("protocol") is not None and not isinstance(record["protocol"], str):
            return f"protocol is {_shown(record['protocol'])}, not text"
        if record.get("config") is not None and not isinstance(record["config"], dict):
            return f"config is {_shown(record['config'])}, not an object"
        record = upgrade_record(record)
    else:
        copies = [key for key in V1_COPIES if key in record]
        if copies:
            return (
                f"{', '.join(copies)}: settings outside config in a version-{version} record "
                "(they live in config.task, config.mechanism, ...)"
            )
        if not isinstance(record.get("config"), dict) or not record["config"]:
            return f"config is {_shown(record.get('config'))}, not the cell's settings (an object)"
    config = record.get("config") or {}
    for section in _CONFIG_SECTIONS:
        if config.get(section) is not None and not isinstance(config[section], dict):
            return f"config.{section} is {_shown(config[section])}, not an object"
    for section in ("task", "mechanism"):
        name = (config.get(section) or {}).get("name")
        if name is not None and name != record.get(section):
            return (
                f"config.{section}.name is {_shown(name)} but the record's {section} is {_shown(record.get(section))}"
            )
    for key in _TEXT:
        if key in record and not isinstance(record[key], str):
            return f"{key} is {_shown(record[key])}, not text"
    for key in ("task", "mechanism", "scale"):
        if not record[key]:
            return f"{key} is empty"
    if not _is_count(record["seed"]):
        return f"seed is {_shown(record['seed'])}, not a whole number >= 0"
    if record["status"] not in STATUSES:
        return f"unknown status {_shown(record['status'])} (valid: {', '.join(STATUSES)})"
    for key in _OPTIONAL_TEXT:
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key} is {_shown(record[key])}, not text"
    for key in _OBJECTS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key} is {_shown(record[key])}, not an object"
    for key in _COUNTS:
        if record.get(key) is not None and not _is_count(record[key]):
            return f"{key} is {_shown(record[key])}, not a whole number >= 0"
    for key in _AMOUNTS:
        if record.get(key) is not None and not (_is_number(record[key]) and record[key] >= 0):
            return f"{key} is {_shown(record[key])}, not a number >= 0"
    if record.get("warnings") is not None and not isinstance(record["warnings"], list):
        return f"warnings is {_shown(record['warnings'])}, not a list"
    for split, metrics in (record.get("metrics") or {}).items():
        if not isinstance(metrics, dict):
            return f"metrics.{split} is {_shown(metrics)}, not an object"
        for name, value in metrics.items():
            problem = _metric_problem(name, value)
            if problem:
                return f"metrics.{split}.{name} is {_shown(value)}, {problem}"
    for name, value in (record.get("mechanism_metrics") or {}).items():
        problem = _metric_problem(name, value)
        if problem:
            return f"mechanism_metrics.{name} is {_shown(value)}, {problem}"
    data = record.get("data") or {}
    majority = data.get("majority_accuracy")
    if majority is not None and not (_is_number(majority) and 0 <= majority <= 1):
        return f"data.majority_accuracy is {_shown(majority)}, not a number in [0, 1]"
    for key in ("test_examples_evaluated", "n_test"):
        if data.get(key) is not None and not _is_count(data[key]):
            return f"data.{key} is {_shown(data[key])}, not a whole number >= 0"
    sizes = data.get("sizes")
    if sizes is not None and not (isinstance(sizes, dict) and all(_is_count(v) for v in sizes.values())):
        return f"data.sizes is {_shown(sizes)}, not split sizes"
    for key, values in (record.get("test_items") or {}).items():
        if not (isinstance(values, list) and all(_is_count(v) for v in values)):
            return f"test_items.{key} is not a list of whole numbers >= 0"
    return None


def _metric_problem(name: str, value: Any) -> str | None:
    if value is None:  # a non-finite value written as null: the status says why
        return None
    if isinstance(value, list) and len(value) == 2:  # an interval, e.g. accuracy_ci95: [low, high]
        if not all(_is_number(v) for v in value) or value[0] > value[1]:
            return "not an interval [low, high]"
        return next(filter(None, (_metric_problem(name, v) for v in value)), None)
    if not _is_number(value):
        return "not a number"
    if is_fraction_metric(name) and not 0 <= value <= 1:
        return "outside [0, 1]"
    if name in ("loss", "bits_per_token") and value < 0:
        return "negative"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


SEED_FILE = re.compile(r"seed(0|[1-9][0-9]*)\.json")


def path_problem(record: dict[str, Any], path: Path, runs: Path) -> str | None:
    """Why the record in ``path`` does not belong there (``runs/<scale>/<task>/<mechanism>/
    [<variant>/]seed<k>.json``, from the record's own content), or None. A copy (``seed0 copy.json``),
    a record moved to another mechanism's folder, or one whose seed is not its file name's
    would otherwise count twice or under the wrong name."""
    match = SEED_FILE.fullmatch(path.name)
    if not match:
        return f"file name '{path.name}' is not seed<k>.json (a copy?)"
    parts = path.relative_to(runs).parts[:-1]
    if len(parts) not in (3, 4):
        return f"lies {len(parts)} folders below runs/, not at <scale>/<task>/<mechanism>/[<variant>/]"
    expected = {
        "scale": parts[0],
        "task": parts[1],
        "mechanism": parts[2],
        "variant": parts[3] if len(parts) == 4 else "",
    }
    for key, folder in expected.items():
        if record.get(key, "") != folder:
            where = f"folder '{folder}'" if folder else "the presets' folder (no variant)"
            return f"record's {key} is {record.get(key)!r} but it lies in {where} (a misplaced record)"
    if record["seed"] != int(match.group(1)):
        return f"record's seed is {record['seed']} but the file is {path.name}"
    return None


def read_result(path: str | Path) -> dict[str, Any] | None:
    """The record in ``path``, or None when there is none or it is unreadable."""
    try:
        return load_result(path)
    except UnreadableResult:
        return None


def scan_results(results_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(records, unreadable) under ``<results_dir>/runs``: every valid record (with its ``_path``),
    and ``{"path", "reason"}`` for every JSON file that is not one: unreadable, against the
    schema (``record_problem``), or not at the path its own content names (``path_problem``).
    Never raises on a bad file, so a report or a grid survives any of them, and never
    counts one: a bad record is listed, not averaged."""
    runs = Path(results_dir) / "runs"
    records, unreadable = [], []
    for path in sorted(runs.rglob("*.json")):
        if path.name.startswith(".") or path.parent == runs:  # a write in progress; the grid's own files
            continue
        try:
            record = load_result(path)
            problem = path_problem(record, path, runs)
            if problem:
                raise UnreadableResult(problem)
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
    a regenerated leaderboard is not a change of code). The report's own header; a cell records
    ``code_state()``, the state of the code it imported."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return commit, dirty


# ----------------------------------------------------------------------------- which code produced a record

PLUGIN_ENTRY_POINT_GROUPS = ("harness.mechanisms", "harness.tasks")
NOT_CODE_FOLDERS = ("tests",)  # below the project, but not what a cell runs (pytest imports them)


def imported_code_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The source files of the modules this process has imported that are the project's code
    (every module below ``root`` but its tests and virtual environments: harness/, mechanisms/,
    tasks/, hydra_plugins/, plugins/) or a plugin's (files from ``$HARNESS_PLUGIN_PATH`` folders
    and the helpers beside them, the packages behind the ``harness.*`` entry points)."""
    import importlib.metadata

    files = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.endswith(".py") and os.path.isabs(file):  # torch._classes: "_classes.py"
            files[name] = os.path.abspath(file)
    plugin_dirs = {os.path.dirname(f) for n, f in files.items() if n.startswith("harness_plugin_")}
    plugin_dirs |= {os.path.abspath(p) for p in os.environ.get("HARNESS_PLUGIN_PATH", "").split(os.pathsep) if p}
    try:
        packages = {
            ep.value.split(":")[0].split(".")[0]
            for group in PLUGIN_ENTRY_POINT_GROUPS
            for ep in importlib.metadata.entry_points(group=group)
        }
    except Exception:  # a broken distribution's metadata: its entry points are registry's to report
        packages = set()
    prefix = str(root) + os.sep
    keep = set()
    for name, file in files.items():
        if file.startswith(prefix):
            parts = Path(file[len(prefix) :]).parts
            if parts[0] not in NOT_CODE_FOLDERS and not any(p.startswith(".") or p == "site-packages" for p in parts):
                keep.add(Path(file))
        elif os.path.dirname(file) in plugin_dirs or name.split(".")[0] in packages:
            keep.add(Path(file))
    return sorted(keep)


def _git(folder: Path, *args: str) -> str | None:
    """``git args`` run in ``folder``: its output, or None when git fails (not a repository, no git)."""
    try:
        done = subprocess.run(
            ["git", "--literal-pathspecs", *args], capture_output=True, text=True, cwd=folder, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _differing(top: Path, files: list[Path]) -> set[Path]:
    """The ``files`` (inside the work tree ``top``) that differ from its HEAD: modified, staged,
    untracked or ignored (an ignored file is in no commit either)."""
    relative = [str(f.relative_to(top)) for f in files]
    out = _git(top, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored=matching", "--", *relative)
    if out is None:
        return set(files)
    found, entries = set(), iter(out.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        found.add(top / entry[3:])
        if entry[0] in "RC":  # a rename or copy names its source next
            next(entries, None)
    return {f for f in files if f in found}


def code_state(files: list[Path] | None = None, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Which code produced a result: the commit of the project's checkout (``root``), whether any
    of ``files`` (default: the code this process imported, ``imported_code_files``) differs from
    the commit of the git work tree holding it, or lies in none, and which ones (paths below
    ``root`` relative to it, others absolute). A file edited, staged, untracked or ignored counts;
    files that were not imported do not. ``other_commits``: the commits of other work trees that
    imported files come from (e.g. a plugin package's own repository), when there are any."""
    files = imported_code_files(root) if files is None else [Path(f) for f in files]
    root = Path(root)
    commit = (_git(root, "rev-parse", "--short", "HEAD") or "").strip() or None
    tops: dict[Path, Path | None] = {}
    by_top: dict[Path | None, list[Path]] = {}
    for file in files:
        folder = file.parent
        if folder not in tops:
            toplevel = _git(folder, "rev-parse", "--show-toplevel") if folder.is_dir() else None
            tops[folder] = Path(toplevel.strip()).resolve() if toplevel and toplevel.strip() else None
        by_top.setdefault(tops[folder], []).append(file.resolve())
    differing, others = set(), {}
    for top, group in by_top.items():
        if top is None:  # in no git work tree: no commit names this code
            differing.update(group)
            continue
        differing |= _differing(top, group)
        if top != root.resolve():
            others[str(top)] = (_git(top, "rev-parse", "--short", "HEAD") or "").strip() or None

    def shown(path: Path) -> str:
        try:
            return str(path.relative_to(root.resolve()))
        except ValueError:
            return str(path)

    state: dict[str, Any] = {
        "commit": commit,
        "dirty": bool(differing) if commit else None,
        "dirty_files": sorted(shown(f) for f in differing),
        "code_files": len(files),
    }
    if others:
        state["other_commits"] = others
    return state


def code_segments_summary(segments: list[dict[str, Any]], now: dict[str, Any]) -> dict[str, Any]:
    """The ``env`` fields of a cell that trained in ``segments`` (the runs its checkpoints name, this
    one last) and now writes its record with the code ``now``: ``commit`` is today's, ``commits``
    every commit it trained under in order, ``dirty`` whether any of its code differed from its commit
    in any run (``dirty_files``: which files, in any run)."""
    commits, files = [], set(now.get("dirty_files") or [])
    for segment in [*segments, now]:
        if segment.get("commit") not in commits:
            commits.append(segment.get("commit"))
        files.update(segment.get("dirty_files") or [])
    dirties = [s.get("dirty") for s in [*segments, now]]
    dirty = True if any(dirties) else (None if all(d is None for d in dirties) else False)
    return {**now, "commits": commits, "dirty": dirty, "dirty_files": sorted(files), "segments": segments}


# ----------------------------------------------------------------------------- where results go


class UnwritableFolder(ValueError):
    """A folder a command must write to cannot be written (one line: which and why)."""


def check_writable_folder(path: str | Path, setting: str = "results_dir") -> None:
    """``UnwritableFolder`` ("cannot write to results_dir=...: why") unless ``path`` is, or can be
    created as, a writable folder: it or a folder above it is a file, or the nearest existing
    folder is not writable (its permissions, a read-only file system). Nothing is created."""
    path = Path(path)
    for probe in [path, *path.absolute().parents]:
        if os.path.lexists(probe):
            break
    if not probe.is_dir():
        what = "is a file, not a folder" if probe.is_file() else "is not a folder (a broken link?)"
        raise UnwritableFolder(f"cannot write to {setting}={path}: {probe} {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UnwritableFolder(
            f"cannot write to {setting}={path}: {probe} is not writable (its permissions, or a "
            "read-only file system); choose another folder"
        )


def environment() -> dict[str, Any]:
    """The code (``code_state``: commit, and whether the imported code differs from it), torch
    version and device, recorded with every result."""
    import platform

    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        **code_state(),
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
    }
