"""The layout of harness/: rooms by layer with no import circles (the import-linter contracts in
pyproject.toml), no module reaching into another's private names, every module importable alone."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "harness"
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in HARNESS.rglob("*.py")
)


def test_the_rooms_keep_their_layers_and_no_module_imports_in_a_circle():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in HARNESS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness"):
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "room",
    ["harness.core", "harness.data", "harness.train", "harness.grid", "harness.bench", "harness.report", "harness.cli"],
)
def test_every_room_imports_alone_in_a_fresh_interpreter(room):
    """A room's public names come from its __init__, and importing it first (nothing else loaded)
    works: no module relies on another having been imported before it."""
    inside = [m for m in MODULES if m == room or m.startswith(room + ".")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in inside)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_harness_type_checks_clean():
    """mypy on harness/ with the settings of pyproject.toml's [tool.mypy] finds nothing (``make lint``
    runs it too); its cache goes to a temporary folder, not the work tree."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", os.devnull],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.startswith("Success: no issues found")
