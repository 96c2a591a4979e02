"""One cell end to end: the result record, failure statuses, resume, the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_fixtures import FAULTY, ROOT, readme_mechanism

from harness.core.registry import discover
from harness.core.results import SCHEMA_VERSION, STATUSES, read_results, result_path
from harness.report.leaderboard import write_report
from harness.train.config import compose
from harness.train.run import run_cell

TINY = ["scale=tiny", "trainer.progress_bar=false", "train.max_steps=12", "train.eval_every=6"]
KEYS = {
    "task",
    "mechanism",
    "config",
    "scale",
    "seed",
    "status",
    "error",
    "metrics",
    "params",
    "tokens_per_s",
    "peak_memory_mb",
    "wall_s",
    "data",
    "env",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "faulty.py").write_text(FAULTY)
    (plugins / "tempered.py").write_text(readme_mechanism())
    discover(extra_paths=[plugins])
    return root


def cell(workdir, *overrides):
    return compose([*TINY, f"results_dir={workdir / 'results'}", f"cache_dir={workdir / 'cache'}", *overrides])


def test_tiny_cell_writes_a_valid_result(workdir, capsys):
    result = run_cell(cell(workdir, "mechanism=softmax", "seed=0"))
    assert KEYS <= set(result)
    assert result["status"] == "ok" and result["error"] is None
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1 and 0 <= result["metrics"]["val"]["accuracy"] <= 1
    assert result["params"] > 0 and result["tokens_per_s"] > 0 and result["peak_memory_mb"] > 0
    assert result["data"]["source"] == "generated" and len(result["data"]["fingerprint"]) == 16
    assert 0 < result["data"]["majority_accuracy"] < 1
    assert result["env"]["torch"] and result["env"]["device"]
    assert result["variant"] and result["config_hash"] == result["variant"]  # TINY's overrides: not the presets
    assert "train.max_steps=12" in result["variant_label"]
    path = result_path(workdir / "results", "tiny", "listops", "softmax", 0, result["variant"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)  # last line printed: the path
    written = json.loads(path.read_text())
    assert (
        written["status"] == "ok" and written["schema_version"] == SCHEMA_VERSION == 2
    )  # the record's layout, versioned
    from harness.report.frames import load_frame

    frame = load_frame(workdir / "results")  # the documented loader reads it back
    assert frame[["task", "mechanism", "seed", "status"]].values.tolist() == [["listops", "softmax", 0, "ok"]]
    assert frame.test.iloc[0] == result["metrics"]["test"]["accuracy"]


def test_same_seed_reproduces_the_same_numbers(workdir):
    a = run_cell(cell(workdir, "mechanism=softmax", "seed=5", "rerun=all"))
    b = run_cell(cell(workdir, "mechanism=softmax", "seed=5", "rerun=all"))
    assert a["metrics"] == b["metrics"]


def test_recorded_cell_is_skipped_unless_asked(workdir):
    first = run_cell(cell(workdir, "mechanism=tempered", "seed=1"))
    again = run_cell(cell(workdir, "mechanism=tempered", "seed=1"))
    assert again["wall_s"] == first["wall_s"]  # the record, not a new run
    redo = run_cell(cell(workdir, "mechanism=tempered", "seed=1", "rerun=all"))
    assert redo["status"] == "ok"


@pytest.mark.parametrize(
    "mechanism,status,error",
    [
        ("raises", "failed", "deliberate failure"),
        ("makes_nan", "nan", "non-finite training loss"),
        ("no_padding", "unsupported", "key_padding"),
    ],
)
def test_failures_are_recorded_with_status_and_error(workdir, mechanism, status, error):
    result = run_cell(cell(workdir, f"mechanism={mechanism}"))
    assert result["status"] == status and error in result["error"]
    assert status in STATUSES


def test_failed_cell_retried_only_when_asked(workdir):
    first = run_cell(cell(workdir, "mechanism=raises", "seed=2"))
    path = result_path(workdir / "results", "tiny", "listops", "raises", 2, first["variant"])
    stamp = path.stat().st_mtime_ns
    skipped = run_cell(cell(workdir, "mechanism=raises", "seed=2"))
    assert skipped["status"] == "failed" and path.stat().st_mtime_ns == stamp  # not re-run
    retried = run_cell(cell(workdir, "mechanism=raises", "seed=2", "rerun=failed"))
    assert retried["status"] == "failed" and path.stat().st_mtime_ns != stamp  # re-run, same config, same fault
    other = run_cell(cell(workdir, "mechanism=raises", "seed=2", "mechanism.fail_at_step=1000"))
    assert other["status"] == "ok" and other["variant"] != first["variant"]  # another config: its own record
    assert read_results(workdir / "results") and path.exists()


def test_report_renders_ok_failed_and_unsupported(workdir):
    for mechanism in ("softmax", "raises", "no_padding"):
        run_cell(cell(workdir, f"mechanism={mechanism}"))
    path = write_report(workdir / "results")
    text = path.read_text()
    assert "| baseline: majority" in text
    accuracy_section = text.split("## Accuracy", 1)[1].split("###", 1)[0]
    rows: dict[str, list[str]] = {}  # mechanism -> its rows (other tests of this module add variants)
    for line in accuracy_section.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip().split(" [")[0], []).append(line)
    assert any("✗ failed" in line for line in rows["raises"]) and any("n/a" in line for line in rows["no_padding"])
    records = read_results(workdir / "results")
    softmax = [r for r in records if r["mechanism"] == "softmax" and r["status"] == "ok"]
    by_config: dict[str, list[float]] = {}  # a row shows its config's mean over seeds
    for r in softmax:
        by_config.setdefault(r["config_hash"], []).append(r["metrics"]["test"]["accuracy"])
    assert softmax and any(f"{100 * sum(a) / len(a):.1f}" in accuracy_section for a in by_config.values())
    assert "## Run details" in text and "generated" in text
    details = text.split("## Run details", 1)[1]
    assert "raises" in details and "[log]" in details  # a non-ok cell is listed with its log


def test_cli_run_exits_nonzero_on_a_failed_cell(workdir):
    env_plugins = str(workdir / "plugins")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "run",
            "mechanism=raises",
            "seed=7",
            *TINY,
            f"results_dir={workdir / 'results'}",
            f"cache_dir={workdir / 'cache'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "HARNESS_PLUGIN_PATH": env_plugins},
    )
    assert done.returncode == 1
    path = Path(done.stdout.strip().splitlines()[-1])
    record = json.loads(path.read_text())
    assert record["status"] == "failed"
    # one log per cell, in the cell's own folder (Hydra writes no second copy as run.log)
    folder = workdir / "results" / "logs" / record["scale"] / record["task"] / "raises"
    logs = [p.relative_to(folder).as_posix() for p in folder.rglob("*.log") if "seed7" in p.parts]
    assert logs == [f"{record['variant']}/seed7/cell.log"]
    logs = [folder / p for p in logs]
    assert "raises" in logs[0].read_text()


@pytest.mark.slow
def test_grid_runs_every_cell_records_failures_and_resumes(workdir):
    import os

    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins")}
    args = [
        sys.executable,
        "-m",
        "harness",
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,raises",
        "seeds=11,12",
        f"results_dir={workdir / 'grid'}",
        f"cache_dir={workdir / 'cache'}",
        "trainer.progress_bar=false",
        "train.max_steps=8",
    ]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode == 1, first.stderr[-2000:]  # the failing cells make the grid report failure
    records = read_results(workdir / "grid")
    assert sorted((r["mechanism"], r["seed"], r["status"]) for r in records) == [
        ("raises", 11, "failed"),
        ("raises", 12, "failed"),
        ("softmax", 11, "ok"),
        ("softmax", 12, "ok"),
    ]
    second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert second.stdout.count("skip") + second.stderr.count("skip") >= 4  # resumed: nothing re-run
