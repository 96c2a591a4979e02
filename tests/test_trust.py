"""Numbers one can trust: a cell is its whole config, one process per cell, faults become
statuses (never a wrong or lost result). Real processes where the fault is a process."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from plugin_fixtures import ROOT

from harness.cells import UnsafeName, cell_lock, resolve_cell
from harness.config import compose
from harness.registry import discover, plugin_errors
from harness.results import read_result, result_path, scan_results
from harness.run import run_cell

TINY = ["scale=tiny", "trainer.progress_bar=false", "train.max_steps=12", "train.eval_every=6"]

FAULTS = '''
"""Mechanisms that fail in the ways a real one can."""
import time
from dataclasses import dataclass

import torch

from harness.attention import Attention
from harness.registry import register_mechanism


@dataclass
class FaultConfig:
    seconds: float = 15.0


@register_mechanism("nan_at_eval", FaultConfig, key_padding=True)
class NaNAtEval(Attention):
    """Fine while training, NaN at validation and test."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        return v * 1.0 if self.training else v * float("nan")


@register_mechanism("wrong_shape", FaultConfig, key_padding=True)
class WrongShape(Attention):
    """Returns (B, H, 1, D): one output for the whole sequence."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        return v.mean(-2, keepdim=True)


@register_mechanism("hangs", FaultConfig, key_padding=True)
class Hangs(Attention):
    """A forward that hangs for `seconds` at the third step."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if self.training and context is not None and context.step >= 2:
            time.sleep(self.cfg.seconds)
        return v * 1.0


@register_mechanism("slow", FaultConfig, key_padding=True)
class Slow(Attention):
    """Sleeps `seconds` per call: long enough to kill a cell in the middle."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        time.sleep(self.cfg.seconds)
        return v * 1.0
'''

EXITS = "import sys\nsys.exit('this plugin exits on import')\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "faults.py").write_text(FAULTS)
    discover(extra_paths=[plugins])
    return root


def cell(workdir, *overrides, tiny=True):
    return compose([*(TINY if tiny else ["scale=tiny", "trainer.progress_bar=false"]),
                    f"results_dir={workdir / 'results'}", f"cache_dir={workdir / 'cache'}", *overrides])


def cli(workdir, *args, timeout=300, **kwargs):
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout, **kwargs)


# ----------------------------------------------------------------------------- identity


def test_a_changed_config_is_another_record_not_a_stale_result(workdir):
    base = run_cell(cell(workdir, "mechanism=performer", tiny=False))
    assert base["status"] == "ok" and base["variant"] == ""  # the presets: the short path
    changed = run_cell(cell(workdir, "mechanism=performer", "mechanism.num_features=16", "model.depth=2", tiny=False))
    assert changed["status"] == "ok" and changed["wall_s"] != base["wall_s"]  # trained, not skipped
    assert changed["variant"] == changed["config_hash"] != base["config_hash"]
    assert changed["variant_label"] == "mechanism.num_features=16, model.depth=2"
    assert changed["config"]["mechanism"]["num_features"] == 16 and changed["config"]["model"]["depth"] == 2
    again = run_cell(cell(workdir, "mechanism=performer", tiny=False))
    assert again["wall_s"] == base["wall_s"]  # the preset record is untouched and skipped


def test_source_and_data_dir_are_part_of_the_identity(workdir):
    generated = resolve_cell(cell(workdir, "mechanism=softmax"))
    lra = resolve_cell(cell(workdir, "mechanism=softmax", "task.source=lra", f"task.data_dir={workdir}/lra"))
    other = resolve_cell(cell(workdir, "mechanism=softmax", "task.source=lra", f"task.data_dir={workdir}/lra2"))
    assert len({generated.config_hash, lra.config_hash, other.config_hash}) == 3
    assert len({generated.result_path, lra.result_path, other.result_path}) == 3
    # paths and progress settings are not part of it
    moved = resolve_cell(cell(workdir, "mechanism=softmax", "trainer.progress_bar=true", "train.time_limit_s=5"))
    assert moved.config_hash == generated.config_hash


def test_a_record_of_older_presets_is_set_aside_not_reused(workdir):
    target = resolve_cell(cell(workdir, "mechanism=softmax", "seed=3", tiny=False))
    stale = {"task": "listops", "mechanism": "softmax", "scale": "tiny", "seed": 3, "status": "ok",
             "config_hash": "0123456789", "metrics": {"test": {"accuracy": 0.99}}}
    target.result_path.parent.mkdir(parents=True, exist_ok=True)
    target.result_path.write_text(json.dumps(stale))
    fresh = run_cell(cell(workdir, "mechanism=softmax", "seed=3", tiny=False))
    assert fresh["config_hash"] == target.config_hash and fresh["metrics"]["test"]["accuracy"] != 0.99
    kept = read_result(result_path(workdir / "results", "tiny", "listops", "softmax", 3, "0123456789"))
    assert kept["metrics"]["test"]["accuracy"] == 0.99 and kept["variant"] == "0123456789"


def test_a_skipped_cell_prints_its_result_path_last(workdir):
    first = cli(workdir, "run", "mechanism=softmax", "seed=4", *TINY, f"results_dir={workdir / 'results'}",
                f"cache_dir={workdir / 'cache'}")
    assert first.returncode == 0, first.stderr[-2000:]
    path = first.stdout.strip().splitlines()[-1]
    again = cli(workdir, "run", "mechanism=softmax", "seed=4", *TINY, f"results_dir={workdir / 'results'}",
                f"cache_dir={workdir / 'cache'}")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == path
    assert "skip" in again.stdout + again.stderr


@pytest.mark.parametrize("override,message", [("rerun=sometimes", "rerun='sometimes' is not one of none, failed, all"),
                                              ("scale.name=../../escape", "is not a plain name"),
                                              ("mechanism.name=../x", "unknown mechanism")])
def test_bad_settings_are_one_line_and_write_nothing(workdir, override, message):
    done = cli(workdir, "run", "mechanism=softmax", *TINY, f"results_dir={workdir / 'bad'}",
               f"cache_dir={workdir / 'cache'}", override)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (workdir / "bad" / "runs").exists() and not (workdir.parent / "escape").exists()


def test_unsafe_names_are_refused_before_any_path_exists(workdir):
    with pytest.raises(UnsafeName):
        resolve_cell(cell(workdir, "mechanism=softmax", "scale.name=../../x"))


# ----------------------------------------------------------------------------- faults → statuses


def test_nan_at_validation_is_status_nan_and_the_json_is_valid(workdir):
    result = run_cell(cell(workdir, "mechanism=nan_at_eval"))
    assert result["status"] == "nan" and "validation loss" in result["error"]
    path = result_path(workdir / "results", "tiny", "listops", "nan_at_eval", 0, result["variant"])
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["status"] == "nan"


def test_a_wrong_output_shape_fails_the_cell(workdir):
    result = run_cell(cell(workdir, "mechanism=wrong_shape"))
    assert result["status"] == "failed" and "contract is (B, H, Lq, D)" in result["error"]


def test_time_limit_stops_a_hanging_forward(workdir):
    start = time.perf_counter()
    result = run_cell(cell(workdir, "mechanism=hangs", "train.time_limit_s=2"))
    assert result["status"] == "timeout"
    assert time.perf_counter() - start < 12  # the 15 s forward was interrupted


def test_a_plugin_that_exits_on_import_is_reported_not_fatal(tmp_path):
    (tmp_path / "exits.py").write_text(EXITS)
    discover(extra_paths=[tmp_path])
    errors = plugin_errors()
    assert any("exits.py" in k and "SystemExit" in v for k, v in errors.items())
    listing = subprocess.run([sys.executable, "-m", "harness", "list"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "HARNESS_PLUGIN_PATH": str(tmp_path)}, timeout=300)
    assert listing.returncode == 0 and "softmax" in listing.stdout and "exits.py" in listing.stdout


def test_unreadable_result_files_are_listed_not_fatal(tmp_path):
    runs = tmp_path / "runs" / "tiny" / "listops" / "softmax"
    runs.mkdir(parents=True)
    (runs / "seed0.json").write_text('{"task": "listops", "mech')
    (runs / "seed1.json").write_text("")
    (runs / "seed2.json").write_bytes(b"\x89PNG\x00\xff\xfe")
    (runs / "seed3.json").write_text('{"hello": 1}')
    records, unreadable = scan_results(tmp_path)
    assert records == [] and len(unreadable) == 4
    reasons = " ".join(u["reason"] for u in unreadable)
    assert "not valid JSON" in reasons and "empty" in reasons and "binary" in reasons and "not a result" in reasons


def test_checkpoints_are_loaded_weights_only(workdir, tmp_path):
    """A doctored last.ckpt (a pickle that runs code) is never executed on resume."""
    target = resolve_cell(cell(workdir, "mechanism=softmax", "seed=9"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "evil": Evil()}, target.checkpoint_dir / "last.ckpt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    marker_json = target.checkpoint_dir.with_name(target.checkpoint_dir.name + ".cell.json")
    marker_json.write_text(json.dumps({"config_hash": target.config_hash}))
    result = run_cell(cell(workdir, "mechanism=softmax", "seed=9"))
    assert not marker.exists()
    assert result["status"] == "failed"  # refused to unpickle, recorded; nothing ran


def test_checkpoints_of_another_config_are_never_resumed(workdir):
    """A checkpoint folder whose marker names another config is cleared, not resumed (a
    resumed cell with other settings used to train on, or crash with a size mismatch)."""
    target = resolve_cell(cell(workdir, "mechanism=softmax", "seed=10"))
    target.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (target.checkpoint_dir / "last.ckpt").write_bytes(b"a checkpoint of another config")
    marker = target.checkpoint_dir.with_name(target.checkpoint_dir.name + ".cell.json")
    marker.write_text(json.dumps({"config_hash": "another0000"}))
    result = run_cell(cell(workdir, "mechanism=softmax", "seed=10"))
    assert result["status"] == "ok" and result["resumed_from_step"] is None
    assert json.loads(marker.read_text())["config_hash"] == target.config_hash


# ----------------------------------------------------------------------------- processes


def test_a_locked_cell_is_skipped_by_a_second_process(workdir):
    target = resolve_cell(cell(workdir, "mechanism=softmax", "seed=21"))
    with cell_lock(target):
        done = cli(workdir, "run", "mechanism=softmax", "seed=21", *TINY, f"results_dir={workdir / 'results'}",
                   f"cache_dir={workdir / 'cache'}")
    assert done.returncode == 0 and "running in another process" in done.stdout + done.stderr
    assert not target.result_path.exists()


@pytest.mark.slow
def test_two_processes_on_one_cell_train_it_once(workdir):
    args = ["run", "mechanism=slow", "mechanism.seconds=0.02", "seed=22", *TINY, f"results_dir={workdir / 'results'}",
            f"cache_dir={workdir / 'cache'}"]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "harness", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    trained = [o for o in outputs if "running in another process" not in o]
    skipped = [o for o in outputs if "running in another process" in o or "skip" in o]
    assert len(trained) >= 1 and len(trained) + len(skipped) >= 2
    records, _ = scan_results(workdir / "results")
    assert len([r for r in records if r["mechanism"] == "slow" and r["seed"] == 22]) == 1


def kill_after_a_checkpoint(args, env, target) -> None:
    """Run the cell as a real process and SIGKILL it (its whole group) once it has checkpointed."""
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True)
    last = target.checkpoint_dir / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and proc.poll() is None):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not target.result_path.exists()


def test_a_killed_cell_resumes_and_records_it(workdir):
    args = ["run", "mechanism=slow", "mechanism.seconds=0.15", "seed=23", "scale=tiny", "trainer.progress_bar=false",
            "train.max_steps=30", "train.eval_every=5", "keep_checkpoints=false",
            f"results_dir={workdir / 'results'}", f"cache_dir={workdir / 'cache'}"]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    target = resolve_cell(compose(args[1:]))
    kill_after_a_checkpoint(args, env, target)
    curves = target.log_dir / "curves" / "metrics.csv"
    before = curves.read_text().splitlines() if curves.exists() else []
    done = cli(workdir, *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(target.result_path.read_text())
    assert record["status"] == "ok" and record["resumed_from_step"] >= 5 and record["steps"] == 30
    import csv

    with open(curves, newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f) if row.get("step")]
    assert len(before) >= 2  # the killed run had logged something
    assert min(steps) < record["resumed_from_step"] <= max(steps)  # its rows kept ahead of the new ones


def test_a_killed_warm_start_resumes_without_repeating_its_warm_up(workdir):
    """A warm-start cell (mqar: 12 steps at 32 tokens, then 256) killed after its first checkpoint
    resumes and trains only the warm-up batches the killed run had not (issue 20)."""
    args = ["run", "task=mqar", "mechanism=slow", "mechanism.seconds=0.1", "seed=25", "scale=tiny",
            "trainer.progress_bar=false", "train.max_steps=20", "train.eval_every=4", "train.warmup_length=32",
            "train.warmup_length_steps=12", "train.eval_batches=1",
            f"results_dir={workdir / 'results'}", f"cache_dir={workdir / 'cache'}"]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    target = resolve_cell(compose(args[1:]))
    kill_after_a_checkpoint(args, env, target)
    done = cli(workdir, *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(target.result_path.read_text())
    resumed = record["resumed_from_step"]
    assert record["status"] == "ok" and resumed >= 4 and record["steps"] == 20
    assert record["data"]["warmup"]["short_batches_this_run"] == max(0, 12 - resumed)


def test_a_redo_of_a_failed_cell_killed_half_way_resumes(workdir):
    """rerun=failed moves the failed record out of the results before training, so killing the
    redo leaves an unrecorded cell that the next run resumes instead of starting over."""
    args = ["run", "mechanism=slow", "mechanism.seconds=0.15", "seed=24", "scale=tiny", "trainer.progress_bar=false",
            "train.max_steps=30", "train.eval_every=5", "rerun=failed", f"results_dir={workdir / 'results'}",
            f"cache_dir={workdir / 'cache'}"]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    target = resolve_cell(compose(args[1:]))
    from harness.results import write_json_atomic

    failed = {"task": target.task, "mechanism": target.mechanism, "scale": target.scale, "seed": target.seed,
              "status": "timeout", "error": "an earlier time limit", "config_hash": target.config_hash,
              "variant": target.variant, "variant_label": target.variant_label, "metrics": {}}
    write_json_atomic(target.result_path, failed)
    kill_after_a_checkpoint(args, env, target)
    kept = list((target.log_dir / "replaced").glob("*-timeout.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["error"] == "an earlier time limit"
    done = cli(workdir, *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(target.result_path.read_text())
    assert record["status"] == "ok" and record["resumed_from_step"] >= 5 and record["steps"] == 30


# ----------------------------------------------------------------------------- appended keys and values (issue 25)


@pytest.mark.parametrize("override,message", [
    ("+train.max_step=10", "train.max_step is not a train setting; did you mean max_steps"),
    ("+task.max_lenn=64", "task.max_lenn is not a task setting; did you mean max_len"),
    ("+mechanism.dropuot=0.1", "mechanism.dropuot is not a mechanism setting"),
    ("+model.dimm=8", "model.dimm is not a model setting; did you mean dim"),
    ("+trainer.precison=bf16", "trainer.precison is not a trainer setting; did you mean precision"),
    ("+seeed=1", "seeed is not a setting; did you mean seed"),
    ("train.max_steps=0", "train.max_steps=0 must be a number >= 1"),
    ("train.time_limit_s=-1", "train.time_limit_s=-1"),
    ("train.batch_size=-4", "train.batch_size=-4 must be a number >= 1")])
def test_unknown_keys_and_nonsense_values_are_one_line_before_anything_runs(workdir, tmp_path, override, message):
    done = cli(workdir, "run", "mechanism=softmax", *TINY, f"results_dir={tmp_path / 'r'}",
               f"cache_dir={tmp_path / 'cache'}", override, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r" / "runs").exists() and not (tmp_path / "cache").exists()  # no data read, no record


def test_trainer_passthrough_is_part_of_the_identity_and_the_test_size_is_recorded(workdir, tmp_path):
    plain = resolve_cell(cell(workdir, "mechanism=softmax"))
    limited = resolve_cell(cell(workdir, "mechanism=softmax", "+trainer.limit_test_batches=1"))
    assert limited.config_hash != plain.config_hash and limited.variant
    assert "trainer.limit_test_batches=1" in limited.variant_label
    done = run_cell(cell(workdir, "mechanism=softmax", "+trainer.limit_test_batches=1", "train.batch_size=4",
                         f"results_dir={tmp_path}"))
    assert done["status"] == "ok" and done["variant"]
    assert done["data"]["test_examples_evaluated"] == 4 < done["data"]["sizes"]["test"]


@pytest.mark.parametrize("scale", ["small", "lra"])
def test_a_task_default_of_none_or_auto_is_not_a_nonsense_value(scale):
    """Pathfinder's num_distractors: 0 (none, its small preset) and -1 (auto, its default) are
    settings, not errors; a count that defaults to a positive number still must stay positive."""
    from harness.run import check_config

    check_config(compose(["task=pathfinder", f"scale={scale}"]))
    check_config(compose(["task=pathfinder", "task.num_distractors=0"]))
    with pytest.raises(ValueError, match="task.num_train=0 must be >= 1"):
        check_config(compose(["task=pathfinder", "task.num_train=0"]))
