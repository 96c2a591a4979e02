"""The whole grid: ``python -m harness grid grid=default scale=small [seeds=0,1] [...]``.

Expands ``conf/grid/<name>.yaml`` (tasks, mechanisms or ``all``, seeds or the scale's)
into one Hydra multirun over ``task × mechanism × seed`` and launches it through Hydra's
configured launcher (basic by default; ``launcher=joblib`` for local parallel cells;
``hydra/launcher=submitit_slurm`` with the ``slurm`` extra for clusters). Each cell
skips itself when already recorded, so re-running the grid resumes it; a failing cell
is recorded and the sweep goes on. Any other ``key=value`` is passed to every cell.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from omegaconf import OmegaConf

from harness.config import CONF_DIR
from harness.registry import describe, get_mechanism, get_task, list_mechanisms, list_tasks
from harness.results import FINISHED, read_result, result_path

GRID_KEYS = ("grid", "scale", "seeds", "tasks", "mechanisms", "launcher", "results_dir")


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into the grid's own and the cells' overrides."""
    own, passthrough = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"grid arguments are key=value, got '{arg}'")
        (own.__setitem__(key, value) if key in GRID_KEYS else passthrough.append(arg))
    return own, passthrough


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return [str(v) for v in value]


def expand(own: dict[str, str]) -> dict[str, list[str] | str]:
    """The grid's tasks, mechanisms, seeds and scale, validated against the registry."""
    name = own.get("grid", "default")
    path = CONF_DIR / "grid" / f"{name}.yaml"
    if not path.exists():
        valid = ", ".join(sorted(p.stem for p in (CONF_DIR / "grid").glob("*.yaml")))
        raise SystemExit(f"unknown grid '{name}'; grids in conf/grid: {valid}")
    grid = OmegaConf.load(path)
    scale = own.get("scale", "auto")
    if scale == "auto":
        import torch

        scale = "lra" if torch.cuda.is_available() else "small"
        reason = f"a GPU is present ({torch.cuda.get_device_name()})" if scale == "lra" else "no GPU is present"
        print(f"scale=auto: using scale={scale} because {reason}; pass SCALE=... to choose", flush=True)
    if not (CONF_DIR / "scale" / f"{scale}.yaml").exists():
        valid = ", ".join(sorted(p.stem for p in (CONF_DIR / "scale").glob("*.yaml")))
        raise SystemExit(f"unknown scale '{scale}'; scales: {valid}")
    tasks = _split(own.get("tasks")) or _split(grid.get("tasks"))
    mechanisms = _split(own.get("mechanisms")) or _split(grid.get("mechanisms"))
    if tasks == ["all"]:
        tasks = list_tasks()
    if mechanisms == ["all"]:
        mechanisms = list_mechanisms()
    for task in tasks:
        get_task(task)  # unknown names fail here, listing the valid ones
    for mechanism in mechanisms:
        get_mechanism(mechanism)
    seeds = _split(own.get("seeds")) or _split(grid.get("seeds"))
    if not seeds:
        seeds = [str(s) for s in OmegaConf.load(CONF_DIR / "scale" / f"{scale}.yaml").scale.seeds]
    return {"tasks": tasks, "mechanisms": mechanisms, "seeds": seeds, "scale": scale}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = parse_args(argv)
    cells = expand(own)
    results_dir = own.get("results_dir", "results")
    errors = describe()["errors"]
    for plugin, error in errors.items():
        print(f"warning: plugin {plugin} failed to load: {error}", file=sys.stderr)
    n = len(cells["tasks"]) * len(cells["mechanisms"]) * len(cells["seeds"])
    print(
        f"grid: {len(cells['tasks'])} tasks × {len(cells['mechanisms'])} mechanisms × {len(cells['seeds'])} seeds "
        f"= {n} cells at scale={cells['scale']} (recorded cells are skipped)",
        flush=True,
    )
    command = [
        sys.executable, "-m", "harness.run", "--multirun",
        f"task={','.join(cells['tasks'])}",
        f"mechanism={','.join(cells['mechanisms'])}",
        f"seed={','.join(cells['seeds'])}",
        f"scale={cells['scale']}",
        f"results_dir={results_dir}",
        *([f"hydra/launcher={own['launcher']}"] if own.get("launcher") else []),
        *passthrough,
    ]
    launched = subprocess.run(command)
    statuses: Counter[str] = Counter()
    unfinished = []
    for task in cells["tasks"]:
        for mechanism in cells["mechanisms"]:
            for seed in cells["seeds"]:
                record = read_result(result_path(results_dir, cells["scale"], task, mechanism, int(seed)))
                status = record["status"] if record else "missing"
                statuses[status] += 1
                if status not in FINISHED:
                    unfinished.append(f"{task}/{mechanism}/seed{seed}: {status}" + (f" ({record['error']})" if record else ""))
    print("grid done: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())), flush=True)
    for line in unfinished:
        print(f"  {line}")
    if unfinished:
        print("retry failed cells with: python -m harness grid ... rerun=failed")
    return 0 if launched.returncode == 0 and not unfinished else 1


if __name__ == "__main__":
    sys.exit(main())


