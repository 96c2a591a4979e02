"""``python -m harness COMMAND``: the one front door.

  list [--json]        registered mechanisms (capabilities, config) and tasks (sources)
  run  k=v ...         one grid cell (Hydra overrides: task=, mechanism=, scale=, seed=, ...;
                       at scale=lra protocol=lra|pytorch|nystromformer, docs/protocols.md)
  grid k=v ...         the grid (grid=, scale=, seeds=, tasks=, mechanisms=, launcher=, dry_run=)
  evaluate k=v ...     test a kept checkpoint of a cell (the cell's overrides, checkpoint=PATH)
  data task=NAME ...   prepare one task's data into the cache and print its statistics
  report               results → results/leaderboard.md and results/plots/
  speed k=v ...        the speed/memory benchmark (harness.bench.speed); speed compare=A:B ... times
                       two mechanisms in alternating rounds (harness.bench.compare)

Every command takes --help; run, grid, evaluate and data take --cfg job (the composed config).
"""

from __future__ import annotations

import json
import sys

from tabulate import tabulate


def cmd_list(argv: list[str]) -> int:
    """Every registered mechanism (capabilities, config fields, first docstring line) and
    task (sources, required capabilities); plugins that failed to load, with their error."""
    from harness.core.registry import describe

    info = describe()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    flags = ("causal", "cross", "key_padding", "relations")
    rows = [
        [name, m["family"], *("✓" if m["capabilities"][f] else "" for f in flags),
         ", ".join(f"{k}={v}" for k, v in m["config"].items()), m["doc"][:70]]
        for name, m in info["mechanisms"].items()
    ]
    print(f"Mechanisms ({len(rows)}):")
    print(tabulate(rows, headers=["name", "family", *flags, "config", "doc"], tablefmt="simple",
                   maxcolwidths=[None] * 6 + [48, 48]))
    rows = [[name, ", ".join(t["sources"]), ", ".join(t["requires"]) or "–", t["doc"][:70]] for name, t in info["tasks"].items()]
    print(f"\nTasks ({len(rows)}):")
    print(tabulate(rows, headers=["name", "sources (default first)", "requires", "doc"], tablefmt="simple"))
    if info["errors"]:
        print("\nPlugins that failed to load:")
        for plugin, error in info["errors"].items():
            print(f"  {plugin}: {error}")
    return 0


def cmd_run(argv: list[str]) -> int:
    from harness.train import run

    sys.argv = [f"{sys.argv[0]} run", *argv]
    run.main()
    return 0


def cmd_data(argv: list[str]) -> int:
    """python -m harness data task=NAME|all [scale=S] [task.KEY=VALUE ...] [--cfg job]

Prepare a task's data into the cache (building it the first time, fetching the Debian
packages an offline source needs) and print its statistics: source, fingerprint, split
sizes, lengths, majority baseline, warnings. task=all (the default) prepares every task."""
    from omegaconf import OmegaConf

    from harness.core.registry import create_task, get_task, list_tasks
    from harness.data.debian import fetch_package
    from harness.train.config import compose

    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a not in ("--cfg", "job")]
    names = [a.partition("=")[2] for a in argv if a.startswith("task=")]
    rest = [a for a in argv if not a.startswith("task=")]
    tasks = list_tasks() if names in ([], ["all"]) else names
    status = 0
    for name in tasks:
        cfg = compose([f"task={name}", *rest])
        if show_cfg:
            print(OmegaConf.to_yaml(cfg.task))
            continue
        task_cfg = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
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


def cmd_evaluate(argv: list[str]) -> int:
    """python -m harness evaluate <the cell's overrides> [checkpoint=PATH] [split=test|validation]

Tests a kept checkpoint (a cell run with keep_checkpoints=true keeps best.ckpt and
last.ckpt under results/checkpoints/...) and prints the metrics as JSON; writes nothing.
Without checkpoint=, the cell's own best.ckpt is used."""
    from harness.train.evaluate import main as evaluate_main

    return evaluate_main(argv)


def cmd_speed(argv: list[str]) -> int:
    """The speed benchmark: ``speed overhead ...`` (the harness's own overhead), ``speed compare=A:B ...``
    (alternating A/B timing), else the sweep (then the overhead too with ``overhead=true``)."""
    from harness.bench import compare, overhead, speed

    if argv and argv[0] == "overhead":
        return overhead.main(argv[1:])
    if any(a.startswith("compare=") for a in argv):
        return compare.main(argv)
    cfg = speed.parse_config(argv)
    status = speed.main(argv)
    if cfg.overhead:  # asked for with overhead=true; never run unannounced
        overhead.after_sweep(cfg)
    return status


def _help(command: str) -> str:
    """The help text of a subcommand (the module's docstring for the Hydra-like ones)."""
    if command == "list":
        return "python -m harness list [--json]\n\n" + (cmd_list.__doc__ or "registered mechanisms and tasks")
    if command == "data":
        return cmd_data.__doc__ or ""
    if command == "evaluate":
        return cmd_evaluate.__doc__ or ""
    if command == "grid":
        from harness.grid import sweep

        return sweep.HELP
    if command == "report":
        from harness.report import leaderboard

        return "python -m harness report [results_dir=DIR] [force=true]\n\n" + (leaderboard.__doc__ or "")
    if command == "speed":
        from harness.bench import speed

        return "python -m harness speed [overhead] [key=value ...]\n\n" + (speed.__doc__ or "")
    return __doc__ or ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if "=" in argv[0] and not argv[0].startswith("-"):  # overrides alone: a cell (how Lightning's DDP re-runs us)
        argv = ["run", *argv]
    command, rest = argv[0], argv[1:]
    if command != "run" and any(a in ("-h", "--help") for a in rest):  # run: Hydra's own --help
        print(_help(command))
        return 0
    if command == "evaluate":
        return cmd_evaluate(rest)
    if command == "list":
        return cmd_list(rest)
    if command == "report" and "--cfg" in rest:
        print(f"results_dir: {next((a.partition('=')[2] for a in rest if a.startswith('results_dir=')), 'results')}")
        return 0
    if command == "speed" and "--cfg" in rest:
        from dataclasses import asdict

        from omegaconf import OmegaConf

        from harness.bench import compare, speed

        args = [a for a in rest if a not in ("--cfg", "job")]
        parse = compare.parse_config if any(a.startswith("compare=") for a in args) else speed.parse_config
        settings = asdict(parse(args))
        if "compare" in settings:
            settings["compare"] = [f"{a}:{b}" for a, b in settings["compare"]]
        print(OmegaConf.to_yaml(settings))
        return 0
    if command == "run":
        return cmd_run(rest)
    if command == "data":
        return cmd_data(rest)
    if command == "grid":
        from harness.grid import sweep

        return sweep.main(rest)
    if command == "report":
        from harness.report import leaderboard

        return leaderboard.main(rest)
    if command == "speed":
        return cmd_speed(rest)
    print(f"unknown command '{command}'; valid: list, run, grid, evaluate, data, report, speed", file=sys.stderr)
    return 2


def entry() -> None:
    """The ``harness`` console script and ``python -m harness``: ``main`` with its one-line errors."""
    from harness.core.registry import UnknownNameError

    try:
        sys.exit(main())
    except UnknownNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
