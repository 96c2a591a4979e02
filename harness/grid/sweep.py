"""The whole grid: ``python -m harness grid grid=default scale=small [seeds=0,1] [k=v ...]``.

A grid is data, ``harness/conf/grid/<name>.yaml``::

    tasks: [listops, text]          # or all
    mechanisms: all                 # or a list, or glob(*former*), choice(a,b)
    seeds: null                     # null: the scale's seeds
    sweep:                          # any config key -> values, crossed with tasks x mechanisms x seeds
      task.max_len: [256, 1024]
    task_sweep:                     # per task, replaces `sweep` for that task: crossed keys as above,
      text: {task.max_len: [256, 1024]}
      pathfinder:                   # or named bundles, settings that move together (one cell config each)
        - {name: pathfinder_256, task.resolution: 16, task.max_len: 256}
        - {name: pathfinder_1k, task.resolution: 32, task.max_len: 1024}
    overrides: {train.max_steps: 300}          # fixed, for every cell
    task_overrides: {listops: {model.dim: 32}} # fixed, per task

A bundle is a mapping of config keys to values plus a ``name`` (for people: the dry run and the
progress lines show it); the bundles of one task set the same keys (a missing one is an error
naming the bundle and the file), and a key no config has is caught before anything runs (one cell
of every bundle is composed). The overrides of a cell, in order: ``overrides``, the task's
``task_overrides``, its bundle, the command line's, then the swept keys.

The grid expands into groups (a task and a bundle: mechanisms x seeds x swept values) and launches
every cell of every group through one Hydra multirun (``python -m harness.train --multirun``
with ``hydra/sweeper=cells``, which hands the launcher the list of cells), so ``n_jobs`` cells run
side by side until the last one, groups whose cells cost most (``cell_cost``) first. The launcher:
``launcher=process`` (default: each cell in its own fresh process, ``n_jobs=N`` side by side),
``launcher=joblib`` (Hydra's joblib launcher, ``n_jobs=N``), ``launcher=slurm``
(hydra-submitit-launcher, the ``[slurm]`` extra; ``harness/conf/hydra/launcher/slurm.yaml`` holds
partition, GPUs, time and memory; one job array). Every cell skips itself when recorded, so
re-running a grid resumes it; a failing or killed cell is recorded and the grid goes on;
``dry_run=true`` lists the cells, which are recorded, and an estimate of the time left. Any other
``key=value`` is a cell override for every cell, parsed by Hydra's override parser: one with
several values (``key=a,b``, ``choice(a,b)``, ``range(0,3)``) is swept, crossed with every group's
cells; ``hydra.*`` overrides (``hydra.launcher.partition=gpu``) go to the multirun, not the cells.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from harness.core.memory import total_memory_mb
from harness.train.config import RERUN, as_dict, conf_file, load_conf

GRID_KEYS = ("grid", "scale", "seeds", "tasks", "mechanisms", "launcher", "n_jobs", "results_dir", "dry_run")
# launcher= -> hydra/launcher=; submitit_local: the SLURM path's submitit machinery, run locally
# (tests/test_submitit.py)
LAUNCHERS = {
    "process": "process",
    "local": "process",
    "joblib": "joblib",
    "slurm": "slurm",
    "submitit_local": "submitit_local",
}
GRID_FILE_KEYS = ("tasks", "mechanisms", "seeds", "sweep", "task_sweep", "overrides", "task_overrides")
# config groups a cell chooses that are not keys of the composed config (protocol=lra picks settings)
CHOICE_GROUPS = ("protocol",)
# what a cell override of these names most likely meant
MISSPELLED = {"task": "tasks", "mechanism": "mechanisms", "seed": "seeds"}


@dataclass
class GridSettings:
    """``python -m harness grid`` settings; every other ``key=value`` is a cell override for every cell."""

    grid: str = "default"  # harness/conf/grid/<grid>.yaml
    scale: str = "auto"  # auto | tiny | small | lra (auto: lra on CUDA, else small)
    seeds: Any = None  # e.g. [0,1,2] or 0,1; null = the scale's seeds
    tasks: Any = None  # a list, all, or glob(...); null = the grid file's
    mechanisms: Any = None  # a list, all, glob(*former*) or choice(a,b); null = the grid file's
    launcher: str = "process"  # process | joblib | slurm | submitit_local
    n_jobs: Any = 1  # cells side by side, or auto
    results_dir: str = "results"  # records under <results_dir>/runs
    dry_run: bool = False  # list the cells, which are recorded, and the time left; run nothing


HELP = """Cell overrides: any other key=value (e.g. rerun=failed, train.max_steps=300) goes to every
cell; one with several values, key=a,b, is swept. python -m harness list names the tasks and
mechanisms; harness/conf/grid/ holds the grids."""


class GridError(SystemExit):
    """A grid that cannot run as asked: one line saying why (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Group:
    """The cells of one task and one bundle (or none): mechanisms x seeds x the swept values, with
    fixed overrides. ``hydra_overrides`` (the command line's ``hydra.*``) go to the multirun that
    launches the cells, not to each cell."""

    task: str
    mechanisms: list[str]
    seeds: list[int]
    sweep: dict[str, list[str]] = field(default_factory=dict)  # key -> values as override text, crossed
    overrides: list[str] = field(default_factory=list)
    bundle: str = ""  # the bundle's name ('' when the task has no bundles)
    source: str = ""  # where the bundle is written ("<grid file>, task_sweep.<task>"), for errors
    bundle_overrides: list[str] = field(default_factory=list)  # the bundle's own (part of ``overrides``)
    hydra_overrides: list[str] = field(default_factory=list)
    cost: float | None = None  # estimated training FLOPs of a cell (``cell_cost``), set by ``_check_overrides``

    def labelled_cells(self) -> list[tuple[str, list[str]]]:
        """Every cell as (label, overrides besides scale/results_dir); the label is the bundle's
        name and the swept values (``mqar_4k``, ``task.max_len=512``), for people."""
        keys = list(self.sweep)
        combos = list(itertools.product(*(self.sweep[k] for k in keys))) or [()]
        cells = []
        for m in self.mechanisms:
            for s in self.seeds:
                for combo in combos:
                    swept = [f"{k}={v}" for k, v in zip(keys, combo)]
                    label = ",".join([self.bundle, *swept] if self.bundle else swept)
                    cells.append((label, [f"task={self.task}", f"mechanism={m}", f"seed={s}", *self.overrides, *swept]))
        return cells

    def cells(self) -> list[list[str]]:
        """Every cell's overrides (besides scale/results_dir)."""
        return [overrides for _, overrides in self.labelled_cells()]


PLAIN = re.compile(r"[\w./:+*$%@-]+")  # a value Hydra's override grammar reads as is, unquoted


def _value(v: Any) -> str:
    """A YAML value as the text of a Hydra override (lists as ``[a,b]``, other strings quoted)."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str) and not PLAIN.fullmatch(v):
        return quoted(v)
    return str(v)


def quoted(value: Any) -> str:
    """A value for a Hydra override, quoted, so a path with spaces, non-ASCII letters or quotes
    (``results_dir=/data/my runs/é``) stays one value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_override(text: str, what: str | None = None):
    """One ``key=value`` through Hydra's override parser (sweeps, lists, quoting, glob/choice/range);
    a malformed one is a GridError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(text)
    except Exception as exc:  # Hydra's OverrideParseException: its first line says where
        raise GridError(f"{what or text}: not a Hydra override value ({str(exc).splitlines()[0]})") from None


def sweep_values(override, what: str) -> list[str]:
    """The values of a parsed sweep override as override text (``0,4`` -> ['0', '4'];
    ``choice(a,b)``, ``range(0,3)``); interval() and glob() cannot be listed here."""
    from hydra.core.override_parser.types import Glob

    if isinstance(override.value(), Glob) or not override.is_discrete_sweep():
        raise GridError(
            f"{what}: the grid sweeps lists of values (a,b), choice(...) or range(...); interval() "
            "and glob() it cannot list"
        )
    return list(override.sweep_string_iterator())


def _split(value: Any, what: str = "value") -> list[str]:
    """A list of names or numbers: a YAML list, or text as Hydra reads it (``a,b``, ``[a,b]``,
    ``choice(a,b)``, ``range(0,3)``, one value)."""
    if value is None:
        return []
    if not isinstance(value, str):
        return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not value.strip():
        return []
    override = parse_override(f"x={value}", f"{what}={value}")
    if override.is_sweep_override():
        return [v.strip("'\"") for v in sweep_values(override, f"{what}={value}")]
    parsed = override.value()
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into the grid's own (checked against ``GridSettings``, returned
    as their text) and the cells' overrides (checked when the cells are composed)."""
    from harness.core.overrides import UsageError, parse, split

    try:
        pairs = split(argv, "grid")
    except UsageError as exc:
        raise GridError(str(exc)) from None
    own, passthrough = {}, []
    for arg, (key, value) in zip(argv, pairs):
        if key in MISSPELLED:
            raise GridError(
                f"'{arg}' would run every cell with {key}={value}; the grid key is {MISSPELLED[key]}={value}"
            )
        if key in GRID_KEYS:
            own[key] = value
        else:
            passthrough.append(arg)
    try:
        parse(GridSettings, [f"{k}={v}" for k, v in own.items()], command="grid")
    except UsageError as exc:
        raise GridError(str(exc)) from None
    cell_keys = None
    for arg in passthrough:
        root = arg.partition("=")[0].lstrip("+~").split(".")[0].split("/")[0]
        if root in ("hydra", "preset") or arg.startswith("+"):
            continue
        if cell_keys is None:
            from harness.train.config import compose

            cell_keys = [str(k) for k in compose([]).keys()] + list(CHOICE_GROUPS)
        if root not in cell_keys:
            from harness.core.overrides import unknown_key

            valid = dict.fromkeys([*GRID_KEYS, *(k for k in cell_keys if k not in MISSPELLED)])
            raise GridError(str(unknown_key(root, valid, "grid")))
    return own, passthrough


def _names(value: Any, valid: list[str], kind: str) -> list[str]:
    """Names from a list, ``all``, or Hydra's override grammar (``a,b``, ``[a,b]``, ``glob(...)``,
    ``choice(...)``)."""
    from hydra.core.override_parser.types import Glob

    override = parse_override(f"x={value}", f"{kind}s={value}") if isinstance(value, str) and value.strip() else None
    if override is not None and isinstance(override.value(), Glob):
        names = override.value().filter(valid)
    else:
        names = _split(value, f"{kind}s")
        if names == ["all"]:
            names = list(valid)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise GridError(f"unknown {kind} {', '.join(repr(u) for u in unknown)}; registered {kind}s: {', '.join(valid)}")
    if not names:
        raise GridError(f"the grid has no {kind}s (pattern {value!r} matched none of: {', '.join(valid)})")
    return names


def _seeds(value: Any) -> list[int]:
    out = []
    for s in _split(value, "seeds"):
        try:
            out.append(int(s))
        except ValueError:
            raise GridError(f"seeds={','.join(_split(value, 'seeds'))}: seeds are integers, e.g. seeds=0,1,2") from None
    return out


def resolve_scale(scale: str) -> str:
    if scale == "auto":
        import torch

        scale = "lra" if torch.cuda.is_available() else "small"
        reason = f"a GPU is present ({torch.cuda.get_device_name()})" if scale == "lra" else "no GPU is present"
        print(f"scale=auto: using scale={scale} because {reason}; pass SCALE=... to choose", flush=True)
    try:
        conf_file("scale", scale)
    except ValueError as exc:
        raise GridError(str(exc)) from None
    return scale


CELL_MEMORY_GB = 4  # n_jobs=auto: the most a CPU cell was measured to need (peak RSS 2.9 GB, local at 1K) plus room


def resolve_n_jobs(
    value: str, *, cores: int | None = None, memory_gb: float | None = None, gpu: bool | None = None
) -> int:
    """``n_jobs=auto``: one cell at a time on a GPU (cells share nothing else there); on a CPU one
    cell per core (each then gets one thread: small models use a second thread poorly, so two
    one-thread cells finish about twice the work of one two-thread cell), at most one per
    ``CELL_MEMORY_GB`` of memory."""
    if value != "auto":
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise GridError(f"n_jobs={value}: a positive integer or auto")
        return n
    from harness.grid.launcher import available_cores

    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if gpu:
        n, reason = 1, "a GPU is present (cells take turns on it)"
    else:
        cores = cores or available_cores()
        if memory_gb is None:
            memory_gb = total_memory_mb() / 1024
        n = max(1, min(cores, int(memory_gb // CELL_MEMORY_GB)))
        reason = f"no GPU: {cores} core(s), {memory_gb:.0f} GB ({CELL_MEMORY_GB} GB per cell), one thread each"
    print(f"n_jobs=auto: {n} cell(s) side by side because {reason}; pass JOBS=... (n_jobs=...) to choose", flush=True)
    return n


def resolve_grid(name: str, scale: str) -> str:
    """``grid=auto``: the full ``default`` grid at scale=lra (a GPU), else ``cpu``, the CPU
    default that fits about 3 hours on 2 cores (the README says how to run the rest)."""
    if name != "auto":
        return name
    chosen = "default" if scale == "lra" else "cpu"
    print(f"grid=auto: using grid={chosen} at scale={scale}; pass GRID=... to choose", flush=True)
    return chosen


def grid_path(name: str) -> Path:
    """``harness/conf/grid/<name>.yaml``; GridError naming the valid grids when there is none."""
    try:
        return conf_file("grid", name)
    except ValueError as exc:
        raise GridError(str(exc)) from None


def load_grid(name: str) -> dict[str, Any]:
    path = grid_path(name)
    grid = as_dict(OmegaConf.load(path))
    unknown = sorted(set(grid) - set(GRID_FILE_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; a grid has {', '.join(GRID_FILE_KEYS)}")
    return grid


def bundles(entries: list[Any], where: str) -> list[tuple[str, list[str]]]:
    """Named bundles (``[{name: mqar_1k, task.max_len: 1024, ...}, ...]``) as (name, overrides):
    each a mapping with a ``name``, names unique, every bundle setting the same keys. ``where``
    (``<file>, task_sweep.<task>``) starts every error."""
    out: list[tuple[str, list[str]]] = []
    first: tuple[str, list[str]] | None = None
    if not entries:
        raise GridError(f"{where}: an empty list of bundles; give at least one {{name: NAME, key: value, ...}}")
    for number, bundle in enumerate(entries, 1):
        if not isinstance(bundle, dict):
            raise GridError(
                f"{where}: bundle {number} is {bundle!r}; a bundle is a mapping {{name: NAME, key: value, ...}}"
            )
        name = str(bundle.get("name") or "").strip()
        keys = [str(k) for k in bundle if k != "name"]
        if not name:
            raise GridError(f"{where}: bundle {number} ({', '.join(keys)}) has no name; add one: {{name: NAME, ...}}")
        if any(name == seen for seen, _ in out):
            raise GridError(f"{where}: two bundles are named '{name}'; names tell the bundles apart")
        bad = [k for k in keys if not k or any(c in k for c in ",= ")]
        if bad:
            raise GridError(
                f"{where}: bundle '{name}': {bad[0]!r} is not a config key (one key per entry, e.g. task.max_len: 1024)"
            )
        if not keys:
            raise GridError(f"{where}: bundle '{name}' sets nothing; a bundle is {{name: NAME, key: value, ...}}")
        if first is None:
            first = (name, keys)
        else:
            missing = [k for k in first[1] if k not in keys]
            extra = [k for k in keys if k not in first[1]]
            if missing or extra:
                what = [f"lacks {', '.join(missing)}"] if missing else []
                what += [f"sets {', '.join(extra)}, which bundle '{first[0]}' does not"] if extra else []
                raise GridError(
                    f"{where}: bundle '{name}' {' and '.join(what)} (the bundles of one task set the same "
                    f"keys: {', '.join(first[1])})"
                )
        out.append((name, [f"{k}={_value(bundle[k])}" for k in keys]))
    return out


def _old_positional_form(where: str, keys: str, values: Any) -> str:
    """The one-line refusal of ``"a,b": [[1, 2], ...]``, showing the bundle it becomes."""
    names = [k.strip() for k in keys.split(",")]
    first = values[0] if isinstance(values, list) and values and isinstance(values[0], list) else []
    settings = (
        ", ".join(f"{k}: {_value(v)}" for k, v in zip(names, first)) if first else ", ".join(f"{k}: ..." for k in names)
    )
    return (
        f"{where}: keys joined by a comma ('{keys}') are the old positional form; write one named bundle per "
        f"value instead: - {{name: NAME, {settings}}}"
    )


def sweep_entry(entry: Any, where: str) -> list[tuple[str, list[str], dict[str, list[str]]]]:
    """A ``sweep`` or ``task_sweep.<task>`` entry as groups (bundle name, bundle overrides, crossed
    keys): a mapping of keys to values is one unnamed group whose keys are crossed; a list of
    bundles is a group per bundle."""
    if entry is None:
        return [("", [], {})]
    if isinstance(entry, list):
        return [(name, overrides, {}) for name, overrides in bundles(entry, where)]
    if not isinstance(entry, dict):
        raise GridError(
            f"{where}: a mapping of keys to values (crossed) or a list of bundles "
            f"[{{name: NAME, key: value, ...}}], not {entry!r}"
        )
    crossed = {}
    for key, values in entry.items():
        if "," in str(key):
            raise GridError(_old_positional_form(where, str(key), values))
        crossed[str(key)] = [_value(v) for v in (values if isinstance(values, list) else [values])]
    return [("", [], crossed)]


def expand(own: dict[str, str], passthrough: list[str] | None = None) -> tuple[str, list[Group]]:
    """(scale, groups): the grid's cells, validated against the registry; a group per task and
    bundle."""
    from harness.core.registry import list_mechanisms, list_tasks

    scale = resolve_scale(own.get("scale", "auto"))
    name = resolve_grid(own.get("grid", "default"), scale)
    grid, path = load_grid(name), grid_path(name)
    valid_tasks = list_tasks()
    tasks = _names(own.get("tasks") or grid.get("tasks") or "all", valid_tasks, "task")
    mechanisms = _names(own.get("mechanisms") or grid.get("mechanisms") or "all", list_mechanisms(), "mechanism")
    seeds = _seeds(own.get("seeds")) or _seeds(grid.get("seeds"))
    if not seeds:
        seeds = [int(s) for s in load_conf("scale", scale)["scale"]["seeds"]]
    for key in ("task_sweep", "task_overrides"):
        unknown = sorted(set(grid.get(key) or {}) - set(valid_tasks))
        if unknown:
            raise GridError(
                f"{path}: {key} names unknown task(s) {', '.join(unknown)}; registered tasks: {', '.join(valid_tasks)}"
            )
    fixed = [f"{k}={_value(v)}" for k, v in (grid.get("overrides") or {}).items()]
    default_sweep = sweep_entry(grid.get("sweep"), f"{path}, sweep")
    task_sweeps = {
        task: sweep_entry(entry, f"{path}, task_sweep.{task}")  # every entry checked, used or not
        for task, entry in (grid.get("task_sweep") or {}).items()
    }
    cli_fixed, cli_swept = command_line_sweep(passthrough)
    cli_hydra = [o for o in cli_fixed if parse_override(o).is_hydra_override()]
    cli_cells = [o for o in cli_fixed if o not in cli_hydra]
    groups = []
    for task in tasks:
        per_task = [f"{k}={_value(v)}" for k, v in ((grid.get("task_overrides") or {}).get(task) or {}).items()]
        source = f"{path}, task_sweep.{task}" if task in task_sweeps else f"{path}, sweep"
        for bundle, bundle_overrides, crossed in task_sweeps.get(task, default_sweep):
            groups.append(
                Group(
                    task,
                    mechanisms,
                    seeds,
                    {**crossed, **cli_swept},
                    [*fixed, *per_task, *bundle_overrides, *cli_cells],
                    bundle=bundle,
                    source=source if bundle else "",
                    bundle_overrides=bundle_overrides,
                    hydra_overrides=cli_hydra,
                )
            )
    return scale, groups


def command_line_sweep(passthrough: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """Cell overrides as Hydra's override parser reads them: one with several values
    (``task.num_distractors=0,4``, ``choice(a,b)``, ``range(0,3)``) becomes a sweep crossed with
    every group's cells, as in a Hydra multirun; the rest (lists ``[1,2]``, quoted commas, any
    ``hydra.*`` override) stay fixed. ``interval()`` and ``glob()`` are refused (one line)."""
    fixed, swept = [], {}
    for arg in passthrough or []:
        override = parse_override(arg)
        if override.is_sweep_override() and not override.is_hydra_override():
            swept[override.get_key_element()] = sweep_values(override, arg)
        else:
            fixed.append(arg)
    return fixed, swept


def _check_overrides(scale: str, groups: list[Group], results_dir: str) -> None:
    """Compose one cell of each group (each bundle): a misspelled or mistyped override fails here,
    once, with Hydra's message, before anything runs; one a bundle brings names the bundle and its
    file. Notes each group's estimated cost (``cell_cost``), which orders the launch."""
    from harness.core.registry import UnknownNameError
    from harness.train.cells import resolve_cell
    from harness.train.config import check_protocol, compose_isolated
    from harness.train.run import check_config, check_run_settings

    def compose(overrides: list[str]):
        return compose_isolated([*overrides, f"scale={scale}", f"results_dir={quoted(results_dir)}"])

    for group in groups:
        overrides = group.cells()[0]
        where = f" in bundle '{group.bundle}' ({group.source})" if group.bundle else ""
        try:
            cfg = compose(overrides)
        except Exception as exc:
            why = str(exc).splitlines()[0]
            if where:  # the bundle's fault, or the rest's?
                try:
                    compose([o for o in overrides if o not in group.bundle_overrides])
                except Exception:
                    where = ""
            raise GridError(f"cell override rejected{where}: {why}") from None
        try:  # a protocol the scale lacks, an appended key no schema has, a value out of range: before anything runs
            check_protocol(cfg)
            check_run_settings(cfg)
            check_config(cfg)
            group.cost = cell_cost(resolve_cell(cfg).identity)["flops"]
        except (ValueError, UnknownNameError) as exc:
            raise GridError(f"{group.task}{where}: {exc}") from None


def plan(scale: str, groups: list[Group], results_dir: str) -> list[dict[str, Any]]:
    """Every cell with its path, recorded status, label and bundle (for dry runs and the summary)."""
    from harness.core.results import read_result
    from harness.train.cells import resolve_cell
    from harness.train.config import compose_isolated

    rows = []
    for group in groups:
        for label, overrides in group.labelled_cells():
            cell = resolve_cell(compose_isolated([*overrides, f"scale={scale}", f"results_dir={quoted(results_dir)}"]))
            record = read_result(cell.result_path)
            rows.append(
                {
                    "cell": cell,
                    "record": record,
                    "status": record["status"] if record else "todo",
                    "label": label,
                    "bundle": group.bundle,
                }
            )
    return rows


@dataclass
class Estimate:
    """The time the cells left would take, and what it rests on."""

    seconds: float  # summed over the cells estimated (one at a time)
    cells: int  # cells left that had a recorded peer to estimate from
    records: int  # distinct recorded cells the estimate rests on
    training_only: int  # of those, records with no process_wall_s (only their training time: too low)


def record_seconds(record: dict[str, Any]) -> float | None:
    """What a recorded cell cost: its process's whole wall time (``process_wall_s``: start-up,
    imports and data loading included), else (a record from before it was kept) ``wall_s``,
    its training and testing alone."""
    return record.get("process_wall_s") or record.get("wall_s") or None


def estimate_s(rows: list[dict[str, Any]], results_dir: str) -> Estimate:
    """The time of the cells not yet finished: the mean cost (``record_seconds``) of recorded
    cells of the same config (a rerun), else of the same task and overrides (``variant_label``,
    any mechanism: the grid's other cells), else of the same task and mechanism, else of the same
    task, else of all. The config comes first: a preset cell of the same mechanism says little
    about a cell with a 4x smaller model. Says how many distinct records it rests on."""
    from harness.core.results import FINISHED, read_results

    def peers(scale, task, mechanism, config_hash, label) -> list[tuple]:  # most to least alike
        return [(scale, task, mechanism, config_hash), (scale, task, label), (scale, task, mechanism), (task,), ()]

    walls: list[dict[tuple, list[tuple[float, str, bool]]]] = [{} for _ in peers("", "", "", "", "")]
    for r in read_results(results_dir):
        seconds = record_seconds(r)
        if seconds:
            keys = peers(r["scale"], r["task"], r["mechanism"], r.get("config_hash"), r.get("variant_label") or "")
            for key, table in zip(keys, walls):
                table.setdefault(key, []).append((seconds, r["_path"], not r.get("process_wall_s")))
    total, known, used = 0.0, 0, {}
    for row in rows:
        if row["status"] in FINISHED:
            continue
        c = row["cell"]
        keys = peers(c.scale, c.task, c.mechanism, c.config_hash, c.variant_label)
        found = next((table[key] for key, table in zip(keys, walls) if table.get(key)), None)
        if found:
            total += sum(f[0] for f in found) / len(found)
            known += 1
            used.update({path: training_only for _, path, training_only in found})
    return Estimate(total, known, len(used), sum(used.values()))


GPU_SUSTAINED_TFLOPS = 20.0  # an assumed sustained rate for LRA-sized models (widths 32-512) on one modern GPU


def cell_cost(identity: dict[str, Any]) -> dict[str, float]:
    """Training steps, tokens and an estimate of FLOPs and GPU hours of one cell, from its config.

    tokens = Σ steps × batch × L over the warm start, self-pretraining and the run proper (two
    documents per example for a matcher are not counted twice: a lower bound there). FLOPs =
    6 · tokens · depth · (4·d² + 2·d·mlp) for the projections and MLPs (forward + backward) plus
    12 · depth · L² · d per sequence for softmax attention's QKᵀ and AV: an upper bound for the
    efficient mechanisms, whose attention costs less. Hours at ``GPU_SUSTAINED_TFLOPS``; evaluation
    passes are left out. Use the figure to size a request, not as a measurement."""
    task, model, train = identity.get("task", {}), identity.get("model", {}), identity.get("train", {})
    caps = [int(task[k]) for k in ("max_len", "max_length") if isinstance(task.get(k), (int, float)) and task[k]]
    if task.get("resolution"):
        caps.append(int(task["resolution"]) ** 2)
    length = min(caps) if caps else 0
    d, depth, mlp = int(model.get("dim", 0)), int(model.get("depth", 0)), int(model.get("mlp_dim", 0))
    warm_steps = int(train.get("warmup_length_steps") or 0)
    phases = [
        (int(train.get("max_steps", 0)) - warm_steps, int(train.get("batch_size", 0)), length),
        (
            warm_steps,
            int(train.get("warmup_batch_size") or train.get("batch_size", 0)),
            int(train.get("warmup_length") or 0),
        ),
        (int(train.get("pretrain_steps") or 0), int(train.get("batch_size", 0)), length),
    ]
    steps = sum(p[0] for p in phases)
    tokens = sum(n * b * L for n, b, L in phases)
    flops = 6 * tokens * depth * (4 * d * d + 2 * d * mlp) + sum(12 * depth * L * L * d * n * b for n, b, L in phases)
    return {
        "steps": steps,
        "tokens": tokens,
        "flops": float(flops),
        "gpu_hours": flops / (GPU_SUSTAINED_TFLOPS * 1e12) / 3600,
    }


def dry_run(scale: str, groups: list[Group], results_dir: str, n_jobs: int) -> int:
    from harness.grid.progress import format_duration

    rows = plan(scale, groups, results_dir)
    total_hours = 0.0
    for row in rows:
        c = row["cell"]
        label = (f"  {row['bundle']}" if row["bundle"] else "") + (f"  [{c.variant_label}]" if c.variant_label else "")
        cost = cell_cost(c.identity)
        if row["status"] not in ("ok", "unsupported"):
            total_hours += cost["gpu_hours"]
        print(
            f"{row['status']:<11} {c.name}{label}  {cost['steps']:,} steps, {cost['tokens'] / 1e6:,.1f}M tokens, "
            f"~{cost['gpu_hours']:.2g} GPU-h"
        )
    counts = Counter(row["status"] for row in rows)
    todo = sum(v for k, v in counts.items() if k not in ("ok", "unsupported"))
    estimate = estimate_s(rows, results_dir)
    print(f"{len(rows)} cells: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(
        f"estimated GPU time of the cells left: ~{total_hours:.2g} GPU-h (training FLOPs from each config at "
        f"{GPU_SUSTAINED_TFLOPS:g} TFLOP/s sustained, softmax's attention cost as the upper bound; "
        f"harness.grid.sweep.cell_cost)"
    )
    if todo:
        print(
            "estimated time left: "
            f"{format_duration(estimate.seconds / max(1, n_jobs)) if estimate.cells else 'unknown'}"
            f" ({estimate_basis(estimate, todo)}, {n_jobs} at a time)"
        )
    return 0


def estimate_basis(estimate: Estimate, todo: int) -> str:
    """What an estimate rests on, in words: '14 of 14 cells left estimated from 2 recorded cells'
    whole process time' (one recorded cell behind 768 estimates is said, not hidden)."""
    if not estimate.cells:
        return "no recorded cells to estimate from"
    whose = "1 recorded cell's" if estimate.records == 1 else f"{estimate.records} recorded cells'"
    text = f"{estimate.cells} of {todo} cells left estimated from {whose} whole process time"
    if estimate.cells < todo:
        text += f"; {todo - estimate.cells} with no recorded peer are not counted"
    if estimate.training_only:
        text += (
            f"; {estimate.training_only} of those record{'s' if estimate.training_only == 1 else ''} only "
            "training time (an older record): too low"
        )
    return text


STOP_GRACE_S = 60  # how long a stopping grid waits for its cells to stop cleanly before SIGKILL


def launch_order(groups: list[Group]) -> list[tuple[str, list[str]]]:
    """Every cell of every group as (label, overrides), in the order they start: the groups whose
    cells cost most (``Group.cost``, from ``cell_cost``) first, so the last cells to finish are
    short ones; groups without an estimate keep their place after those with one."""
    ordered = sorted(groups, key=lambda g: -(g.cost or 0.0))
    return [cell for group in ordered for cell in group.labelled_cells()]


def write_cells(path: Path, cells: list[tuple[str, list[str]]]) -> None:
    """The cells file of ``hydra/sweeper=cells`` (``harness.grid.launcher.CellListSweeperBase``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"name": label, "overrides": overrides} for label, overrides in cells], indent=1))


def launch(scale: str, groups: list[Group], own: dict[str, str], results_dir: str) -> int:
    """Run every cell of every group through one Hydra multirun (``hydra/sweeper=cells`` hands the
    launcher the whole list, so ``n_jobs`` workers stay busy to the last cell), then summarize."""
    launcher = own.get("launcher", "process")
    if launcher not in LAUNCHERS:
        raise GridError(f"launcher={launcher}: valid launchers are {', '.join(sorted(set(LAUNCHERS)))}")
    n_jobs = int(own.get("n_jobs", 1))  # resolved by main()
    launcher = LAUNCHERS[launcher]
    if launcher in ("joblib", "slurm", "submitit_local") and os.environ.get("HARNESS_PLUGIN_PATH"):
        print(
            f"warning: launcher={launcher} pickles the configs to its workers; mechanisms loaded from "
            "$HARNESS_PLUGIN_PATH files can't be unpickled there. Use launcher=process (the default), or "
            "install them as a package with a harness.mechanisms entry point",
            file=sys.stderr,
        )
    if launcher in ("slurm", "submitit_local"):
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        except ImportError:
            raise GridError(f"launcher={launcher} needs hydra-submitit-launcher: pip install -e '.[slurm]'") from None
    if launcher == "joblib":
        try:
            import hydra_plugins.hydra_joblib_launcher  # noqa: F401
        except ImportError:
            raise GridError("launcher=joblib needs hydra-joblib-launcher: pip install -e '.[joblib]'") from None
    cells = launch_order(groups)
    total = len(cells)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    sweep_root = Path(results_dir) / "sweeps" / stamp
    cells_file = sweep_root / "cells.json"
    write_cells(cells_file, cells)
    env = {
        **os.environ,
        "HARNESS_GRID_TOTAL": str(total),
        "HARNESS_GRID_JOBS": str(n_jobs),
        "HARNESS_GRID_PROGRESS": str(sweep_root / "progress.tsv"),
    }
    launcher_args = [f"hydra/launcher={launcher}"]
    if launcher in ("process", "joblib") and "n_jobs" in own:
        launcher_args.append(f"hydra.launcher.n_jobs={n_jobs}")
    hydra_args = list(dict.fromkeys(o for g in groups for o in g.hydra_overrides))  # the command line's, once
    print(
        f"grid: {len({g.task for g in groups})} task(s), {total} cells at scale={scale}, launcher={launcher}"
        f"{f' x{n_jobs}' if n_jobs > 1 else ''} (recorded cells are skipped)",
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "harness.train",
        "--multirun",
        f"scale={scale}",
        f"results_dir={quoted(results_dir)}",
        f"hydra.sweep.dir={quoted(sweep_root)}",
        "hydra/sweeper=cells",
        f"hydra.sweeper.cells_file={quoted(cells_file)}",
        *launcher_args,
        *hydra_args,
    ]
    proc = subprocess.Popen(command, env=env, preexec_fn=_own_group_dying_with_parent)
    try:
        returncode = proc.wait()
    except BaseException:  # Ctrl-C or a kill of the grid: its cells stop, unrecorded, and resume on a rerun
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return summarize(scale, groups, results_dir, returncode)


def summarize(scale: str, groups: list[Group], results_dir: str, returncode: int) -> int:
    from harness.core.results import FINISHED

    rows = plan(scale, groups, results_dir)
    statuses = Counter(row["status"] if row["status"] != "todo" else "missing" for row in rows)
    print("grid done: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())), flush=True)
    unfinished = [row for row in rows if row["status"] not in FINISHED]
    for row in unfinished:
        error = (row["record"] or {}).get("error")
        print(f"  {row['cell'].name}: {row['status']}" + (f" ({error})" if error else ""))
    if any(row["record"] is not None for row in unfinished):  # a recorded failure: rerun=failed redoes it
        print("retry failed cells with: python -m harness grid ... rerun=failed")
    if any(row["record"] is None for row in unfinished):  # never recorded: a plain rerun runs them
        print(
            "cells without a record (interrupted, running elsewhere, or never started) run when the same command "
            "runs again"
        )
    return 0 if returncode == 0 and not unfinished else 1


def _own_group_dying_with_parent() -> None:
    """In the sweep process: its own process group (so the grid can stop it and its cells
    at once) and SIGKILL when the grid dies, even by kill -9."""
    from harness.grid.launcher import die_with_parent

    os.setsid()
    die_with_parent()


def _terminate_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """The grid (``--cfg job``: print its groups instead); exit 2 for a grid that cannot run as asked."""
    from harness.core.registry import describe

    argv = sys.argv[1:] if argv is None else argv
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a not in ("--cfg", "job", "all", "hydra")] if show_cfg else argv
    try:
        own, passthrough = parse_args(argv)
        if "dry_run" in own:
            own["dry_run"] = str(own["dry_run"].lower() in ("true", "yes", "on", "1")).lower()
        for arg in passthrough:
            key, _, value = arg.partition("=")
            if key == "rerun" and value not in RERUN:
                raise GridError(f"rerun={value!r} is not one of {', '.join(RERUN)}")
        results_dir = own.get("results_dir", "results")
        if "n_jobs" in own:
            own["n_jobs"] = str(resolve_n_jobs(own["n_jobs"]))
        scale, groups = expand(own, passthrough)
        if show_cfg:
            print(
                OmegaConf.to_yaml({"scale": scale, "results_dir": results_dir, "groups": [g.__dict__ for g in groups]})
            )
            return 0
        _check_overrides(scale, groups, results_dir)
        if own.get("dry_run") != "true":  # a dry run only reads
            from harness.core.results import UnwritableFolder, check_writable_folder

            try:
                check_writable_folder(results_dir, "results_dir")
            except UnwritableFolder as exc:
                raise GridError(str(exc)) from None
    except GridError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    for plugin, error in describe()["errors"].items():
        print(f"warning: plugin {plugin} failed to load: {error}", file=sys.stderr)
    if own.get("dry_run") == "true":
        return dry_run(scale, groups, results_dir, int(own.get("n_jobs", 1)))
    _terminate_on_sigterm()
    try:
        return launch(scale, groups, own, results_dir)
    except GridError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grid stopped; its running cells were stopped too (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
