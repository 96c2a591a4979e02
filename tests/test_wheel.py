"""The package as a user installs it: wheels built from this tree (the project and the peers
plugin), installed non-editable into a fresh virtual environment, run from an empty folder:
``harness list`` and one tiny cell, whose record must say ``ok``.

The fresh environment gets the dependencies (torch, lightning, ...) of the interpreter running
the tests through a ``.pth`` line naming its site-packages, written after the wheels are
installed (so pip sees no other ``longbench``); a ``.pth`` file's folder is only appended to
``sys.path``, its own ``.pth`` files (the editable install's finder) are not run, so the
wheel's copy of ``harness`` is the one imported, which the tests check. ``make wheel-test``
runs this file (CI runs it through ``make test``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _source_copy(dest: Path) -> Path:
    """The files of this checkout a commit would hold (tracked and untracked-not-ignored), copied
    to ``dest``: the wheel is built from them without writing build/ or *.egg-info into the tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.fail(f"git ls-files failed in {ROOT}: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not in the wheel either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder, environment, empty working folder) of a fresh venv holding the wheels."""
    tmp = tmp_path_factory.mktemp("wheel")
    # no PYTHONPATH: a checkout on it (its longbench.egg-info from an editable install) would pass for the wheel
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HARNESS_PLUGIN_PATH", "HARNESS_CACHE_DIR")}
    clean["PYTHONNOUSERSITE"] = "1"
    source = _source_copy(tmp / "src")
    wheels = tmp / "wheels"
    for project in (source, source / "plugins" / "peers"):
        built = _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-w",
                str(wheels),
                str(project),
            ],
            tmp,
            clean,
        )
        assert built.returncode == 0, (
            f"pip wheel {project.name} failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
        )
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, clean)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    wheel_files = sorted(str(w) for w in wheels.glob("*.whl"))
    assert len(wheel_files) == 2, wheel_files
    done = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            *wheel_files,
        ],
        tmp,
        clean,
    )
    assert done.returncode == 0, f"pip install failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, clean
        ).stdout.strip()
    )
    for package in ("harness", "tasks", "mechanisms", "harness_peers", "hydra_plugins/harness_launcher"):
        assert (site / package).is_dir(), f"the wheels installed no {package}/ in {site}:\n{done.stdout[-3000:]}"
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_test_wheel_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    env = dict(clean)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    empty = tmp / "cwd"
    empty.mkdir()
    return python, venv, env, empty


def test_the_wheels_code_and_configs_are_the_ones_imported(installed):
    python, venv, env, empty = installed
    code = (
        "import harness, tasks, mechanisms, harness_peers, hydra_plugins.harness_launcher as hl;"
        "from harness.train.config import CONF_DIR;"
        "print(harness.__file__, tasks.__file__, mechanisms.__file__, harness_peers.__file__, hl.__file__);"
        "print(CONF_DIR, (CONF_DIR / 'config.yaml').is_file())"
    )
    done = _run([str(python), "-c", code], empty, env)
    assert done.returncode == 0, done.stderr
    files, conf = done.stdout.splitlines()
    for file in files.split():
        assert Path(file).is_relative_to(venv), f"{file} is not the wheel's copy (venv {venv})"
    conf_dir, has_config = conf.split()
    assert Path(conf_dir).is_relative_to(venv) and has_config == "True", conf


def test_harness_list_from_an_empty_folder(installed):
    python, venv, env, empty = installed
    done = _run([str(venv / "bin" / "harness"), "list"], empty, env)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("listops", "softmax", "performer_pytorch"):
        assert name in done.stdout, f"`harness list` does not list {name}:\n{done.stdout}"
    assert "failed to load" not in done.stdout + done.stderr, done.stdout[-2000:]
    assert list(empty.iterdir()) == []


def test_one_tiny_cell_from_an_empty_folder(installed, tmp_path):
    python, venv, env, empty = installed
    results = tmp_path / "results"
    done = _run(
        [
            str(python),
            "-m",
            "harness",
            "run",
            "task=listops",
            "mechanism=softmax",
            "scale=tiny",
            "train.max_steps=2",
            f"results_dir={results}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        empty,
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = list((results / "runs").rglob("seed0.json"))
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    assert (record["status"], record["task"], record["mechanism"], record["scale"]) == (
        "ok",
        "listops",
        "softmax",
        "tiny",
    )
    assert record["steps"] == 2
    assert list(empty.iterdir()) == [], "the cell wrote into the working folder"
