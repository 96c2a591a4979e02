"""The SLURM path's machinery, run here: ``launcher=submitit_local`` sends a grid's cells through
hydra-submitit-launcher and submitit (pickled job, a process per cell, results collected by
submitit) with submitit's local executor instead of sbatch; ``launcher=slurm`` composes
harness/conf/hydra/launcher/slurm.yaml onto the plugin's SLURM schema. Skipped only when
hydra-submitit-launcher is not installed (it is in the ``dev`` and ``slurm`` extras); without it,
``launcher=submitit_local`` is one line naming the extra."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]', or make install)",
)


def test_submitit_local_without_the_package_names_the_extra(monkeypatch, tmp_path):
    from harness.grid.sweep import GridError, expand, launch

    scale, groups = expand({"scale": "tiny", "tasks": "listops", "mechanisms": "softmax", "seeds": "0"})
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)  # import fails as if absent
    with pytest.raises(GridError, match="^launcher=submitit_local needs hydra-submitit-launcher") as raised:
        launch(scale, groups, {"launcher": "submitit_local"}, str(tmp_path))
    assert raised.value.message == ("launcher=submitit_local needs hydra-submitit-launcher: pip install -e '.[slurm]'")
    assert not (tmp_path / "sweeps").exists()


@needs_submitit
def test_slurm_launcher_config_composes_onto_the_plugins_schema():
    from hydra import compose, initialize_config_dir

    from harness.core.registry import discover
    from harness.train.config import CONF_DIR

    discover()  # the task and mechanism config groups
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["task=listops", "mechanism=softmax", "hydra/launcher=slurm"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.array_parallelism, launcher.timeout_min) == (1, 64, 720)


@needs_submitit
@pytest.mark.slow
def test_two_cell_grid_through_submitit_local(tmp_path):
    results = tmp_path / "results"
    env = {
        **os.environ,
        "HARNESS_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "grid",
            "grid=smoke",
            "tasks=listops",
            "mechanisms=softmax,linear",
            "scale=tiny",
            "launcher=submitit_local",
            f"results_dir={results}",
            "train.max_steps=2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "launcher=submitit_local" in done.stdout and "grid done: ok 2" in done.stdout, done.stdout
    records = {
        json.loads(p.read_text())["mechanism"]: json.loads(p.read_text())
        for p in (results / "runs").rglob("seed0.json")
    }
    assert sorted(records) == ["linear", "softmax"]
    assert {r["status"] for r in records.values()} == {"ok"}
    assert {r["steps"] for r in records.values()} == {2}
    # submitit's own folder: each cell ran as a submitit job (a pickled call and its result)
    submitted = list((results / "sweeps").rglob(".submitit/*/*_result.pkl"))
    assert len(submitted) == 2, sorted(str(p) for p in (results / "sweeps").rglob("*"))
