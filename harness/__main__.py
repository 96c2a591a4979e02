"""``python -m harness COMMAND``: the one front door.

  list [--json]        registered mechanisms (capabilities, config) and tasks (sources)
  run  k=v ...         one grid cell (Hydra overrides: task=, mechanism=, scale=, seed=, ...)
  grid k=v ...         the grid (grid=, scale=, seeds=, tasks=, mechanisms=, launcher=)
  data task=NAME ...   prepare one task's data into the cache and print its statistics
  report               results → results/leaderboard.md and results/plots/
  speed k=v ...        the speed/memory benchmark (harness.speed)
"""

from __future__ import annotations

import json
import sys

from tabulate import tabulate


def cmd_list(argv: list[str]) -> int:
    from harness.registry import describe

    info = describe()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    flags = ("causal", "cross", "key_padding", "relations")
    rows = [
        [name, *("✓" if m["capabilities"][f] else "" for f in flags),
         ", ".join(f"{k}={v}" for k, v in m["config"].items()), m["doc"][:70]]
        for name, m in info["mechanisms"].items()
    ]
    print(f"Mechanisms ({len(rows)}):")
    print(tabulate(rows, headers=["name", *flags, "config", "doc"], tablefmt="simple", maxcolwidths=[None] * 5 + [48, 48]))
    rows = [[name, ", ".join(t["sources"]), ", ".join(t["requires"]) or "–", t["doc"][:70]] for name, t in info["tasks"].items()]
    print(f"\nTasks ({len(rows)}):")
    print(tabulate(rows, headers=["name", "sources (default first)", "requires", "doc"], tablefmt="simple"))
    if info["errors"]:
        print("\nPlugins that failed to load:")
        for plugin, error in info["errors"].items():
            print(f"  {plugin}: {error}")
    return 0


def cmd_run(argv: list[str]) -> int:
    from harness import run

    sys.argv = [f"{sys.argv[0]} run", *argv]
    run.main()
    return 0


def cmd_data(argv: list[str]) -> int:
    """Prepare data: ``task=NAME`` (with any task./scale= overrides) or ``task=all``."""
    from omegaconf import OmegaConf

    from harness.config import compose
    from harness.debian import fetch_package
    from harness.registry import create_task, get_task, list_tasks

    names = [a.partition("=")[2] for a in argv if a.startswith("task=")]
    rest = [a for a in argv if not a.startswith("task=")]
    tasks = list_tasks() if names in ([], ["all"]) else names
    status = 0
    for name in tasks:
        cfg = compose([f"task={name}", *rest])
        task_cfg = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
        try:
            if task_cfg.get("source") == get_task(name).sources[0]:  # the offline default: its Debian packages
                for package in getattr(get_task(name).cls, "debian_packages", ()):
                    fetch_package(package)
            _, info = create_task(name, scale=cfg.scale.name, **task_cfg).load(cfg.cache_dir)
        except Exception as exc:  # one task's broken source doesn't stop the others
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"task": name, **info.as_dict()}, indent=2), flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        return cmd_list(rest)
    if command == "run":
        return cmd_run(rest)
    if command == "data":
        return cmd_data(rest)
    if command == "grid":
        from harness import grid

        return grid.main(rest)
    if command == "report":
        from harness import report

        return report.main(rest)
    if command == "speed":
        from harness import speed

        return speed.main(rest)
    print(f"unknown command '{command}'; valid: list, run, grid, data, report, speed", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from harness.registry import UnknownNameError

    try:
        sys.exit(main())
    except UnknownNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
