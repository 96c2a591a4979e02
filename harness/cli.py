"""``python -m harness COMMAND [key=value ...]``: the one front door (also the ``harness`` script).

  list     registered mechanisms and tasks; list task=T: its presets per scale and protocol;
           list mechanism=M: its config, defaults and protocol settings
  run      one grid cell (Hydra: task=, mechanism=, scale=, seed=, protocol=, results_dir=, ...)
  grid     the grid (grid=, scale=, seeds=, tasks=, mechanisms=, launcher=, n_jobs=, dry_run=)
  evaluate test a kept checkpoint of a cell (the cell's overrides, checkpoint=PATH)
  data     prepare a task's data into the cache and print its statistics
  report   results -> <results_dir>/leaderboard.md and plots/
  speed    the speed/memory sweep; speed compare=A:B: alternating A/B timing; speed overhead:
           the harness's own overhead
  tool     a task's or the data cache's tool: listops-generate, pathfinder-generate,
           spider-evaluate, debian-fetch

One grammar for every command: key=value arguments, values read as Hydra reads them
(lists [a,b], quoting 'a b', null, numbers, booleans), checked against the command's
settings. COMMAND --help lists them (type, default, description); COMMAND --cfg job prints
the composed settings. Exit status: 0 done, 1 a failure (a cell, a measurement, a refusal),
2 a usage error (one line on stderr: unknown key, bad value, unknown name).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from harness.core.overrides import UsageError, first_paragraph, parse, schema_help, to_yaml

PROG = "python -m harness"


# ============================================================================= list


@dataclass
class ListSettings:
    """``python -m harness list`` settings."""

    task: str | None = None  # a task: its config, sources, and presets per scale and protocol
    mechanism: str | None = None  # a mechanism: its config with defaults, capabilities, protocol settings
    json: bool = False  # print everything registered as one JSON object


def cmd_list(settings: ListSettings) -> int:
    """Registered mechanisms (capabilities, config, first docstring line) and tasks (sources,
    required capabilities), and plugins that failed to load; or one task's presets per scale and
    protocol (task=T), or one mechanism's config and protocol settings (mechanism=M)."""
    from harness.core.registry import describe

    if settings.task is not None:
        return list_task(settings.task, settings.json)
    if settings.mechanism is not None:
        return list_mechanism(settings.mechanism, settings.json)
    info = describe()
    if settings.json:
        print(json.dumps(info, indent=2))
        return 0
    flags = ("causal", "cross", "key_padding", "relations")
    rows = [
        [
            name,
            m["family"],
            *("✓" if m["capabilities"][f] else "" for f in flags),
            ", ".join(f"{k}={v}" for k, v in m["config"].items()),
            m["doc"][:70],
        ]
        for name, m in info["mechanisms"].items()
    ]
    print(f"Mechanisms ({len(rows)}):")
    print(
        tabulate(
            rows,
            headers=["name", "family", *flags, "config", "doc"],
            tablefmt="simple",
            maxcolwidths=[None] * 6 + [48, 48],
        )
    )
    rows = [
        [name, ", ".join(t["sources"]), ", ".join(t["requires"]) or "–", t["doc"][:70]]
        for name, t in info["tasks"].items()
    ]
    print(f"\nTasks ({len(rows)}):")
    print(tabulate(rows, headers=["name", "sources (default first)", "requires", "doc"], tablefmt="simple"))
    print(f"\n{PROG} list task=NAME: a task's presets per scale; list mechanism=NAME: a mechanism's config")
    if info["errors"]:
        print("\nPlugins that failed to load:")
        for plugin, error in info["errors"].items():
            print(f"  {plugin}: {error}")
    return 0


def task_presets(name: str) -> dict[str, Any]:
    """A task's settings as plain data: its config defaults, its own presets per scale
    (``register_task(scales=...)``, composed after ``harness/conf/scale/<scale>.yaml``) and per
    scale=lra protocol (``harness/conf/protocol/<protocol>/<task>.yaml``)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from harness.core.registry import describe, get_task
    from harness.train.config import CONF_DIR, protocol_preset

    spec = get_task(name)  # UnknownNameError: one line with the registered tasks
    info = describe()["tasks"][name]
    stored = ConfigStore.instance().repo.get("task_scale", {})
    scales = sorted(p.stem for p in (CONF_DIR / "scale").glob("*.yaml"))
    presets = {
        s: OmegaConf.to_container(stored[f"{name}_{s}.yaml"].node) if f"{name}_{s}.yaml" in stored else {}
        for s in scales
    }
    protocols = {}
    for folder in sorted(p for p in (CONF_DIR / "protocol").iterdir() if p.is_dir()):
        path = protocol_preset(folder.name, name)
        if path.exists():
            protocols[folder.name] = OmegaConf.to_container(OmegaConf.load(path))
    return {
        "task": name,
        "doc": spec.doc,
        "sources": info["sources"],
        "requires": info["requires"],
        "config": info["config"],
        "scales": presets,
        "protocols": protocols,
    }


def list_task(name: str, as_json: bool) -> int:
    data = task_presets(name)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"# task {name}: {data['doc']}")
    print(f"# sources (default first): {', '.join(data['sources'])}; requires: {', '.join(data['requires']) or '-'}")
    print("# scales: the task's own presets, composed after harness/conf/scale/<scale>.yaml (overrides win)")
    print("# protocols: at scale=lra with protocol=P, harness/conf/protocol/P/<task>.yaml")
    print(to_yaml({k: data[k] for k in ("config", "scales", "protocols")}), end="")
    return 0


def list_mechanism(name: str, as_json: bool) -> int:
    from harness.core.overrides import schema_rows
    from harness.core.registry import describe, get_mechanism

    spec = get_mechanism(name)  # UnknownNameError: one line with the registered mechanisms
    info = describe()["mechanisms"][name]
    if as_json:
        print(json.dumps({"mechanism": name, **info}, indent=2, default=str))
        return 0
    caps = [c for c, on in info["capabilities"].items() if on]
    print(f"mechanism {name} ({info['family']}): {info['doc']}")
    print(f"capabilities: {', '.join(caps) or '-'}; module: {info['module']}")
    rows = [list(r) for r in schema_rows(spec.config_class)]
    table = tabulate(
        rows, headers=["key", "type", "default", "description"], tablefmt="plain", maxcolwidths=[None, 24, 28, 70]
    )
    print(f"\nconfig (mechanism.KEY=VALUE):\n{table}")
    if info["protocols"]:
        print("\nprotocol settings (composed into that protocol's preset cells; overrides win):")
        print(to_yaml(info["protocols"]), end="")
    return 0


# ============================================================================= data


@dataclass
class DataSettings:
    """``python -m harness data`` settings; ``task.KEY=VALUE`` and other cell keys are composed as ``run``'s."""

    task: str = "all"  # a task name, a list of them, or all
    scale: str = "tiny"  # the task's sizes at this scale (harness/conf/scale/)


def cmd_data(argv: list[str], show_cfg: bool = False) -> int:
    """Prepare a task's data into the cache (building it the first time, fetching the Debian
    packages an offline source needs) and print its statistics: source, fingerprint, split sizes,
    lengths, majority baseline, warnings. Exit 1 when a task failed."""
    from omegaconf import OmegaConf

    from harness.core.registry import create_task, get_task, list_tasks
    from harness.data.debian import fetch_package
    from harness.train.config import as_dict
    from harness.train.run import compose_checked

    own = [a for a in argv if a.partition("=")[0] in ("task", "scale")]
    cell = [a for a in argv if a not in own]
    settings = parse(DataSettings, own, command="data")
    names = settings.task if isinstance(settings.task, list) else [settings.task]
    tasks = list_tasks() if names == ["all"] else [str(n) for n in names]
    configs = {name: compose_checked([f"task={name}", f"scale={settings.scale}", *cell], "data") for name in tasks}
    if show_cfg:
        print(to_yaml({name: OmegaConf.to_container(cfg.task, resolve=True) for name, cfg in configs.items()}), end="")
        return 0
    status = 0
    for name, cfg in configs.items():
        task_cfg = {k: v for k, v in as_dict(cfg.task).items() if k != "name"}
        try:
            if task_cfg.get("source") == get_task(name).sources[0]:  # the offline default: its Debian packages
                for package in getattr(get_task(name).cls, "debian_packages", ()):
                    fetch_package(package)
            task = create_task(name, scale=cfg.scale.name, **task_cfg)
            dsd, info = task.load(cfg.cache_dir)
        except Exception as exc:  # one task's broken source doesn't stop the others
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        extra = {"stats": task.stats(dsd)} if hasattr(task, "stats") else {}  # e.g. Spider's hardness mix
        print(json.dumps({"task": name, **info.as_dict(), **extra}, indent=2, default=str), flush=True)
    return status


# ============================================================================= tool


@dataclass
class Tool:
    """A tool of a task or of the data cache: its settings dataclass and its function."""

    module: str
    schema: str
    function: str

    def load(self) -> tuple[type, Callable[[Any], int]]:
        import importlib

        module = importlib.import_module(self.module)
        return getattr(module, self.schema), getattr(module, self.function)


TOOLS = {
    "listops-generate": Tool("tasks.listops", "GenerateSettings", "generate"),
    "pathfinder-generate": Tool("tasks.pathfinder", "GenerateSettings", "generate"),
    "spider-evaluate": Tool("tasks.spider", "EvaluateSettings", "evaluate_command"),
    "debian-fetch": Tool("harness.data.debian", "FetchSettings", "fetch"),
}


def _tool(argv: list[str]) -> tuple[str, list[str]]:
    from harness.core.overrides import did_you_mean

    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise UsageError(f"tool needs a name first: {PROG} tool NAME [key=value ...]; tools: {', '.join(TOOLS)}")
    if argv[0] not in TOOLS:
        raise UsageError(f"unknown tool '{argv[0]}'{did_you_mean(argv[0], TOOLS)}; tools: {', '.join(TOOLS)}")
    return argv[0], argv[1:]


def tool_help(argv: list[str]) -> str:
    if not argv or argv[0] not in TOOLS:
        rows = [[name, first_paragraph(TOOLS[name].load()[0].__doc__)] for name in TOOLS]
        return schema_help(
            f"{PROG} tool NAME [key=value ...]",
            "Tools of the tasks and of the data cache, one "
            "per NAME; each takes key=value settings (tool NAME --help lists them).",
            None,
            extra="tools:\n" + tabulate(rows, tablefmt="plain").replace("\n", "\n  ").join(["  ", ""]),
        )
    name = argv[0]
    schema, _ = TOOLS[name].load()
    return schema_help(f"{PROG} tool {name} [key=value ...]", first_paragraph(schema.__doc__), schema)


# ============================================================================= the commands


@dataclass
class Command:
    """A subcommand: its usage line, its paragraph (the first of ``doc``), its settings schema and
    how it runs (``run(argv)``) and shows its composed settings (``cfg(argv)``)."""

    usage: str
    doc: str
    schema: Callable[[list[str]], type | None]
    run: Callable[[list[str]], int]
    cfg: Callable[[list[str]], str]
    extra: str = ""


def _speed_module(argv: list[str]):
    from harness.bench import compare, overhead, speed

    if argv and argv[0] == "overhead":
        return overhead, argv[1:]
    if any(a.startswith("compare=") for a in argv):
        return compare, argv
    return speed, argv


def _speed_schema(argv: list[str]) -> type:
    from harness.bench import compare, overhead

    module, _ = _speed_module(argv)
    return {overhead: overhead.OverheadConfig, compare: compare.CompareConfig}.get(module) or module.SpeedConfig


def cmd_speed(argv: list[str]) -> int:
    """The speed benchmark: ``speed overhead ...`` (the harness's own overhead), ``speed compare=A:B ...``
    (alternating A/B timing), else the sweep (then the overhead too with ``overhead=true``)."""
    from harness.bench import overhead, speed

    module, rest = _speed_module(argv)
    if module is not speed:
        return module.main(rest)
    cfg = speed.parse_config(rest)
    status = speed.main(rest)
    if cfg.overhead:  # asked for with overhead=true; never run unannounced
        overhead.after_sweep(cfg)
    return status


def _speed_cfg(argv: list[str]) -> str:
    module, rest = _speed_module(argv)
    settings = module.parse_config(rest)
    if hasattr(settings, "compare"):
        settings.compare = [f"{a}:{b}" for a, b in settings.compare]
    return to_yaml(settings)


def _evaluate_cfg(argv: list[str]) -> str:
    from omegaconf import OmegaConf

    from harness.train.evaluate import parse as parse_evaluate
    from harness.train.run import compose_checked

    settings, cell = parse_evaluate(argv)
    return to_yaml(settings) + OmegaConf.to_yaml(compose_checked(cell, "evaluate"))


def _grid_cfg(argv: list[str]) -> str:
    import contextlib
    import io

    from harness.grid import sweep

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = sweep.main(["--cfg", "job", *argv])
    if status:
        raise UsageError(err.getvalue().strip().removeprefix("error: ") or f"grid exited {status}")
    return out.getvalue()


def _commands() -> dict[str, Command]:
    from harness.bench import speed
    from harness.grid import sweep
    from harness.report import leaderboard
    from harness.train import evaluate

    return {
        "list": Command(
            f"{PROG} list [task=NAME | mechanism=NAME] [json=true]",
            cmd_list.__doc__ or "",
            lambda a: ListSettings,
            lambda a: cmd_list(parse(ListSettings, a, command="list")),
            lambda a: to_yaml(parse(ListSettings, a, command="list")),
        ),
        "run": Command(f"{PROG} run [key=value ...]", "", lambda a: None, lambda a: cmd_run(a), lambda a: ""),
        "grid": Command(
            f"{PROG} grid [key=value ...]",
            sweep.__doc__ or "",
            lambda a: sweep.GridSettings,
            lambda a: sweep.main(a),
            _grid_cfg,
            extra=sweep.HELP,
        ),
        "evaluate": Command(
            f"{PROG} evaluate <the cell's overrides> [checkpoint=PATH] [split=test|validation]",
            evaluate.__doc__ or "",
            lambda a: evaluate.EvaluateSettings,
            evaluate.main,
            _evaluate_cfg,
            extra="Cell keys: as run's (python -m harness run --help); the cell is composed from them.",
        ),
        "data": Command(
            f"{PROG} data [task=NAME|all] [scale=S] [task.KEY=VALUE ...]",
            cmd_data.__doc__ or "",
            lambda a: DataSettings,
            cmd_data,
            lambda a: _capture(lambda: cmd_data(a, show_cfg=True)),
            extra="Cell keys: task.KEY=VALUE (the task's config: list task=NAME shows it), cache_dir=DIR.",
        ),
        "report": Command(
            f"{PROG} report [key=value ...]",
            leaderboard.__doc__ or "",
            lambda a: leaderboard.ReportSettings,
            leaderboard.main,
            lambda a: to_yaml(parse(leaderboard.ReportSettings, a, command="report")),
        ),
        "speed": Command(
            f"{PROG} speed [overhead | compare=A:B] [key=value ...]",
            speed.__doc__ or "",
            _speed_schema,
            cmd_speed,
            _speed_cfg,
            extra=f"Forms: {PROG} speed compare=A:B --help and {PROG} speed overhead --help list their own keys.",
        ),
        "tool": Command(f"{PROG} tool NAME [key=value ...]", "", lambda a: None, cmd_tool, _tool_cfg),
    }


def _capture(function: Callable[[], int]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        function()
    return out.getvalue()


def cmd_tool(argv: list[str]) -> int:
    name, rest = _tool(argv)
    schema, function = TOOLS[name].load()
    return function(parse(schema, rest, command=f"tool {name}"))


def _tool_cfg(argv: list[str]) -> str:
    name, rest = _tool(argv)
    schema, _ = TOOLS[name].load()
    return to_yaml(parse(schema, rest, command=f"tool {name}"))


def cmd_run(argv: list[str]) -> int:
    from harness.train import run

    sys.argv = [f"{sys.argv[0]} run", *argv]
    run.main()
    return 0


def help_text(command: str, argv: list[str]) -> str:
    """The ``--help`` of a subcommand other than ``run``: usage, one paragraph, its keys."""
    if command == "tool":
        return tool_help(argv)
    spec = _commands()[command]
    usage = spec.usage
    schema = spec.schema(argv)
    if schema is None:
        raise ValueError(f"{command} has no key=value settings of its own")
    doc = spec.doc
    if command == "speed" and schema.__name__ != "SpeedConfig":
        from harness.bench import compare, overhead

        module = compare if schema.__name__ == "CompareConfig" else overhead
        usage = f"{PROG} speed {'compare=A:B' if module is compare else 'overhead'} [key=value ...]"
        doc = module.__doc__ or ""
    paragraph = first_paragraph(doc).removeprefix("``").strip()
    return schema_help(usage, paragraph, schema, extra=spec.extra if schema.__name__ != "CompareConfig" else "")


COMMANDS = ("list", "run", "grid", "evaluate", "data", "report", "speed", "tool")


def dispatch(argv: list[str]) -> int:
    """One command line: ``--help``, ``--cfg job``, or the command itself."""
    from harness.core.overrides import did_you_mean

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if "=" in argv[0] and not argv[0].startswith("-"):  # overrides alone: a cell (how Lightning's DDP re-runs us)
        argv = ["run", *argv]
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UsageError(f"unknown command '{command}'{did_you_mean(command, COMMANDS)}; valid: {', '.join(COMMANDS)}")
    if command == "run":  # Hydra's own --help (harness/conf/config.yaml's hydra.help) and --cfg
        return cmd_run(rest)
    if any(a in ("-h", "--help") for a in rest):
        print(help_text(command, [a for a in rest if a not in ("-h", "--help")]), end="")
        return 0
    spec = _commands()[command]
    if "--cfg" in rest:
        index = rest.index("--cfg")
        if rest[index + 1 : index + 2] != ["job"]:
            raise UsageError(f"{command}: --cfg takes job (--cfg job prints the composed settings)")
        print(spec.cfg(rest[:index] + rest[index + 2 :]), end="")
        return 0
    return spec.run(rest)


def main(argv: list[str] | None = None) -> int:
    """``python -m harness``'s exit status: 0 done, 1 a failure, 2 a usage error (one line on stderr)."""
    from harness.core.names import UnsafeName
    from harness.core.registry import UnknownNameError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except (UsageError, UnknownNameError, UnsafeName) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``harness`` console script and ``python -m harness``: ``main``'s exit status (a reader that
    closed the pipe early, ``| head``, ends it quietly, as Python's documentation advises)."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)
