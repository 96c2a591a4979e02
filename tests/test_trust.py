"""Numbers one can trust: a cell is its whole config, one process per cell, faults become
statuses (never a wrong or lost result). Real processes where the fault is a process."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from plugin_fixtures import ROOT

from harness.core.names import UnsafeName
from harness.core.registry import discover, plugin_errors
from harness.core.results import read_result, result_path, scan_results
from harness.train.cells import cell_lock, resolve_cell
from harness.train.config import compose
from harness.train.run import run_cell

TINY = ["scale=tiny", "trainer.progress_bar=false", "train.max_steps=12", "train.eval_every=6"]

FAULTS = '''
"""Mechanisms that fail in the ways a real one can."""
import time
from dataclasses import dataclass

import torch

from harness.core.attention import Attention
from harness.core.registry import register_mechanism


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


@dataclass
class AllocConfig:
    gigabytes: float = 16.0


@register_mechanism("allocates", AllocConfig, key_padding=True)
class Allocates(Attention):
    """Asks for `gigabytes` of memory at the third training step (beyond a `ulimit -v`)."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if self.training and context is not None and context.step >= 2:
            torch.empty(int(self.cfg.gigabytes * 2**30), dtype=torch.uint8)
        return v * 1.0


SIGNALLED = []


@dataclass
class SignalConfig:
    at_step: int = 4
    signum: int = 15


@register_mechanism("signals_itself", SignalConfig, key_padding=True)
class SignalsItself(Attention):
    """Sends its own process a signal at a training step, once per signal (as kill or Ctrl-C would)."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        at_step = context is not None and context.step == self.cfg.at_step
        if self.training and at_step and self.cfg.signum not in SIGNALLED:
            SIGNALLED.append(self.cfg.signum)
            import os
            os.kill(os.getpid(), self.cfg.signum)
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
    return compose(
        [
            *(TINY if tiny else ["scale=tiny", "trainer.progress_bar=false"]),
            f"results_dir={workdir / 'results'}",
            f"cache_dir={workdir / 'cache'}",
            *overrides,
        ]
    )


def cli(workdir, *args, timeout=300, **kwargs):
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
        **kwargs,
    )


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
    stale = {
        "task": "listops",
        "mechanism": "softmax",
        "scale": "tiny",
        "seed": 3,
        "status": "ok",
        "config_hash": "0123456789",
        "metrics": {"test": {"accuracy": 0.99}},
    }
    target.result_path.parent.mkdir(parents=True, exist_ok=True)
    target.result_path.write_text(json.dumps(stale))
    fresh = run_cell(cell(workdir, "mechanism=softmax", "seed=3", tiny=False))
    assert fresh["config_hash"] == target.config_hash and fresh["metrics"]["test"]["accuracy"] != 0.99
    kept = read_result(result_path(workdir / "results", "tiny", "listops", "softmax", 3, "0123456789"))
    assert kept["metrics"]["test"]["accuracy"] == 0.99 and kept["variant"] == "0123456789"


def test_a_skipped_cell_prints_its_result_path_last(workdir):
    first = cli(
        workdir,
        "run",
        "mechanism=softmax",
        "seed=4",
        *TINY,
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    path = first.stdout.strip().splitlines()[-1]
    again = cli(
        workdir,
        "run",
        "mechanism=softmax",
        "seed=4",
        *TINY,
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    )
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == path
    assert "skip" in again.stdout + again.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("rerun=sometimes", "rerun='sometimes' is not one of none, failed, all"),
        ("scale.name=../../escape", "is not a plain name"),
        ("mechanism.name=../x", "unknown mechanism"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(workdir, override, message):
    done = cli(
        workdir,
        "run",
        "mechanism=softmax",
        *TINY,
        f"results_dir={workdir / 'bad'}",
        f"cache_dir={workdir / 'cache'}",
        override,
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (workdir / "bad" / "runs").exists() and not (workdir.parent / "escape").exists()


def test_unsafe_names_are_refused_before_any_path_exists(workdir):
    with pytest.raises(UnsafeName, match=r"scale\.name='\.\./\.\./x' is not a plain name"):
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
    listing = subprocess.run(
        [sys.executable, "-m", "harness", "list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HARNESS_PLUGIN_PATH": str(tmp_path)},
        timeout=300,
    )
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
    torch.save(
        {"state_dict": {}, "evil": Evil()}, target.checkpoint_dir / "last.ckpt", pickle_protocol=pickle.HIGHEST_PROTOCOL
    )
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
        done = cli(
            workdir,
            "run",
            "mechanism=softmax",
            "seed=21",
            *TINY,
            f"results_dir={workdir / 'results'}",
            f"cache_dir={workdir / 'cache'}",
        )
    assert done.returncode == 0 and "running in another process" in done.stdout + done.stderr
    assert not target.result_path.exists()


@pytest.mark.slow
def test_two_processes_on_one_cell_train_it_once(workdir):
    args = [
        "run",
        "mechanism=slow",
        "mechanism.seconds=0.02",
        "seed=22",
        *TINY,
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    ]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "harness", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    trained = [o for o in outputs if "running in another process" not in o]
    skipped = [o for o in outputs if "running in another process" in o or "skip" in o]
    assert len(trained) >= 1 and len(trained) + len(skipped) >= 2
    records, _ = scan_results(workdir / "results")
    assert len([r for r in records if r["mechanism"] == "slow" and r["seed"] == 22]) == 1


def kill_after_a_checkpoint(args, env, target) -> None:
    """Run the cell as a real process and SIGKILL it (its whole group) once it has checkpointed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    last = target.checkpoint_dir / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and proc.poll() is None):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not target.result_path.exists()


def test_a_killed_cell_resumes_and_records_it(workdir):
    args = [
        "run",
        "mechanism=slow",
        "mechanism.seconds=0.15",
        "seed=23",
        "scale=tiny",
        "trainer.progress_bar=false",
        "train.max_steps=30",
        "train.eval_every=5",
        "keep_checkpoints=false",
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    ]
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
    args = [
        "run",
        "task=mqar",
        "mechanism=slow",
        "mechanism.seconds=0.1",
        "seed=25",
        "scale=tiny",
        "trainer.progress_bar=false",
        "train.max_steps=20",
        "train.eval_every=4",
        "train.warmup_length=32",
        "train.warmup_length_steps=12",
        "train.eval_batches=1",
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    ]
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
    args = [
        "run",
        "mechanism=slow",
        "mechanism.seconds=0.15",
        "seed=24",
        "scale=tiny",
        "trainer.progress_bar=false",
        "train.max_steps=30",
        "train.eval_every=5",
        "rerun=failed",
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    ]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    target = resolve_cell(compose(args[1:]))
    from harness.core.results import write_json_atomic

    failed = {
        "task": target.task,
        "mechanism": target.mechanism,
        "scale": target.scale,
        "seed": target.seed,
        "status": "timeout",
        "error": "an earlier time limit",
        "config_hash": target.config_hash,
        "variant": target.variant,
        "variant_label": target.variant_label,
        "metrics": {},
    }
    write_json_atomic(target.result_path, failed)
    kill_after_a_checkpoint(args, env, target)
    kept = list((target.log_dir / "replaced").glob("*-timeout.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["error"] == "an earlier time limit"
    done = cli(workdir, *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(target.result_path.read_text())
    assert record["status"] == "ok" and record["resumed_from_step"] >= 5 and record["steps"] == 30


# ----------------------------------------------------------------------------- appended keys and values (issue 25)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+train.max_step=10", "train.max_step is not a train setting; did you mean max_steps"),
        ("+task.max_lenn=64", "task.max_lenn is not a task setting; did you mean max_len"),
        ("+mechanism.dropuot=0.1", "mechanism.dropuot is not a mechanism setting"),
        ("+model.dimm=8", "model.dimm is not a model setting; did you mean dim"),
        ("+trainer.precison=bf16", "trainer.precison is not a trainer setting; did you mean precision"),
        ("+seeed=1", "seeed is not a setting; did you mean seed"),
        ("train.max_steps=0", "train.max_steps=0 must be a number >= 1"),
        ("train.time_limit_s=-1", "train.time_limit_s=-1"),
        ("train.batch_size=-4", "train.batch_size=-4 must be a number >= 1"),
    ],
)
def test_unknown_keys_and_nonsense_values_are_one_line_before_anything_runs(workdir, tmp_path, override, message):
    done = cli(
        workdir,
        "run",
        "mechanism=softmax",
        *TINY,
        f"results_dir={tmp_path / 'r'}",
        f"cache_dir={tmp_path / 'cache'}",
        override,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r" / "runs").exists() and not (tmp_path / "cache").exists()  # no data read, no record


def test_trainer_passthrough_is_part_of_the_identity_and_the_test_size_is_recorded(workdir, tmp_path):
    plain = resolve_cell(cell(workdir, "mechanism=softmax"))
    limited = resolve_cell(cell(workdir, "mechanism=softmax", "+trainer.limit_test_batches=1"))
    assert limited.config_hash != plain.config_hash and limited.variant
    assert "trainer.limit_test_batches=1" in limited.variant_label
    done = run_cell(
        cell(
            workdir,
            "mechanism=softmax",
            "+trainer.limit_test_batches=1",
            "train.batch_size=4",
            f"results_dir={tmp_path}",
        )
    )
    assert done["status"] == "ok" and done["variant"]
    assert done["data"]["test_examples_evaluated"] == 4 < done["data"]["sizes"]["test"]


@pytest.mark.parametrize("scale", ["small", "lra"])
def test_a_task_default_of_none_or_auto_is_not_a_nonsense_value(scale):
    """Pathfinder's num_distractors: 0 (none, its small preset) and -1 (auto, its default) are
    settings, not errors; a count that defaults to a positive number still must stay positive."""
    from harness.train.run import check_config

    check_config(compose(["task=pathfinder", f"scale={scale}"]))
    check_config(compose(["task=pathfinder", "task.num_distractors=0"]))
    with pytest.raises(ValueError, match="task.num_train=0 must be >= 1"):
        check_config(compose(["task=pathfinder", "task.num_train=0"]))


# ----------------------------------------------------------------------------- interrupts (issue 25)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_cell_records_nothing_keeps_its_checkpoints_and_resumes(workdir, tmp_path, signum):
    """In process (fast): the signal arrives at step 4, after the step-2 checkpoint."""
    overrides = [
        "mechanism=signals_itself",
        f"mechanism.signum={int(signum)}",
        "train.eval_every=2",
        f"results_dir={tmp_path}",
    ]
    target = resolve_cell(cell(workdir, *overrides))
    stopped = None
    try:
        run_cell(cell(workdir, *overrides))
    except BaseException as exc:  # noqa: BLE001 - the interrupt is what is tested
        stopped = exc
    assert not target.result_path.exists(), read_result(target.result_path)  # no failed record
    assert getattr(stopped, "exit_code", None) == 128 + signum, repr(stopped)
    assert (target.checkpoint_dir / "last.ckpt").exists()
    done = run_cell(cell(workdir, *overrides))  # the plain rerun
    assert done["status"] == "ok" and done["resumed_from_step"] >= 2 and done["steps"] == 12


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_resumed_cell_ends_at_the_uninterrupted_cells_number(workdir, tmp_path, dropout):
    """Interrupted at step 5 (after the step-4 checkpoint, in the third epoch: 8 train examples in
    batches of 4) and resumed, the cell ends with the validation curve, metrics and per-item
    outcomes of the same cell run without interruption: it trains on the same batches (each
    epoch's order from the seed and the epoch, the resumed iterator starting at the next batch)
    and, with dropout, makes the same draws (the generators' states are in the checkpoint).
    Before, the resumed cell restarted its epoch in another order, from generators at the seed."""
    from harness.core.registry import get_mechanism

    signalled = sys.modules[get_mechanism("signals_itself").cls.__module__].SIGNALLED
    signalled.clear()
    overrides = [
        "mechanism=signals_itself",
        "mechanism.at_step=5",
        "train.eval_every=2",
        f"model.dropout={dropout}",
        "train.batch_size=4",
        "task.num_train=8",
    ]
    resumed_dir, plain_dir = tmp_path / "resumed", tmp_path / "plain"
    with pytest.raises(BaseException) as stopped:
        run_cell(cell(workdir, *overrides, f"results_dir={resumed_dir}"))
    assert getattr(stopped.value, "exit_code", None) == 128 + signal.SIGTERM, repr(stopped.value)
    resumed = run_cell(cell(workdir, *overrides, f"results_dir={resumed_dir}"))
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == 4 and resumed["steps"] == 12
    plain = run_cell(cell(workdir, *overrides, f"results_dir={plain_dir}"))  # signalled already: runs through
    assert plain["status"] == "ok" and not plain.get("resumed_from_step")
    assert resumed["val_curve"] == plain["val_curve"] and [s for s, _ in plain["val_curve"]] == [2, 4, 6, 8, 10, 12]
    assert resumed["metrics"] == plain["metrics"] and resumed["test_items"] == plain["test_items"]


def signal_after_a_checkpoint(command, env, last, signum, *, group=False):
    """Start a real process, send it (or its group) ``signum`` once ``last`` exists; its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not last.exists() and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists() and proc.poll() is None, "no checkpoint before the process ended"
    time.sleep(0.5)
    (os.killpg if group else os.kill)(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


SLOW_CELL = [
    "mechanism=slow",
    "mechanism.seconds=0.15",
    "scale=tiny",
    "trainer.progress_bar=false",
    "train.max_steps=30",
    "train.eval_every=5",
    "keep_checkpoints=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_stopped_by_a_signal_resumes_on_a_plain_rerun(workdir, signum):
    args = [
        "run",
        *SLOW_CELL,
        f"seed={30 + int(signum)}",
        f"results_dir={workdir / 'results'}",
        f"cache_dir={workdir / 'cache'}",
    ]
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(workdir / "plugins"), "OMP_NUM_THREADS": "1"}
    target = resolve_cell(compose(args[1:]))
    rc, err = signal_after_a_checkpoint(args, env, target.checkpoint_dir / "last.ckpt", signum)
    assert rc == 128 + signum, err[-3000:]
    assert "nothing recorded" in err and not target.result_path.exists()
    assert (target.checkpoint_dir / "last.ckpt").exists()
    done = cli(workdir, *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(target.result_path.read_text())
    assert record["status"] == "ok" and record["resumed_from_step"] >= 5 and record["steps"] == 30


@pytest.mark.slow
@pytest.mark.parametrize(
    "how,signum",
    [("grid", signal.SIGTERM), ("grid", signal.SIGINT), ("multirun", signal.SIGINT), ("multirun", signal.SIGTERM)],
)
def test_a_sweep_stopped_by_a_signal_resumes_its_cell_on_a_plain_rerun(workdir, tmp_path, how, signum):
    """SIGTERM (kill, preemption) or SIGINT (Ctrl-C) to the grid, or to a hand-started sweep's
    whole process group (a terminal's Ctrl-C, SLURM's SIGTERM to every process): the cell stops
    unrecorded with its checkpoints, and the same command resumes it."""
    if how == "grid":
        command = ["grid", "tasks=listops", "mechanisms=slow", "seeds=0", f"results_dir={tmp_path}", *SLOW_CELL[1:]]
    else:
        command = [
            "run",
            "--multirun",
            "task=listops",
            "mechanism=slow",
            "seed=0",
            f"results_dir={tmp_path}",
            *SLOW_CELL[1:],
        ]
    env = {
        **os.environ,
        "HARNESS_PLUGIN_PATH": str(workdir / "plugins"),
        "OMP_NUM_THREADS": "1",
        "HARNESS_CACHE_DIR": str(workdir / "cache"),
    }
    target = resolve_cell(compose(["mechanism=slow", "task=listops", *SLOW_CELL[1:], f"results_dir={tmp_path}"]))
    rc, err = signal_after_a_checkpoint(
        command, env, target.checkpoint_dir / "last.ckpt", signum, group=how == "multirun"
    )
    assert rc != 0 and "Traceback" not in err, err[-3000:]
    if how == "multirun":
        assert rc == 128 + signum and "rerun the same command to resume" in err.splitlines()[-1], err[-3000:]
    records, unreadable = scan_results(tmp_path)
    assert not records and not unreadable, records  # no failed record of the interrupted cell
    assert (target.checkpoint_dir / "last.ckpt").exists()
    done = cli(workdir, *command, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(target.result_path.read_text())
    assert record["status"] == "ok" and record["resumed_from_step"] >= 5 and record["steps"] == 30


# ----------------------------------------------------------------------------- records that cannot mislead (issue 25)


def a_record(**changes):
    record = {
        "task": "listops",
        "mechanism": "softmax",
        "mechanism_config": {},
        "scale": "tiny",
        "seed": 0,
        "status": "ok",
        "error": None,
        "metrics": {"val": {"accuracy": 0.2}, "test": {"accuracy": 0.1875, "accuracy_ci95": [0.13, 0.26]}},
        "params": 1000,
        "tokens_per_s": 100.0,
        "peak_memory_mb": 10.0,
        "wall_s": 5.0,
        "data": {
            "source": "generated",
            "fingerprint": "fp",
            "majority_accuracy": 0.15,
            "sizes": {"train": 10, "validation": 5, "test": 128},
        },
        "env": {"commit": "abc1234"},
        "variant": "",
        "variant_label": "",
        "config_hash": "h0",
    }
    record.update(changes)
    return record


def test_copies_misplaced_records_and_seed_file_name_disagreements_are_listed_not_counted(tmp_path):
    from harness.core.results import write_json_atomic

    softmax = tmp_path / "runs" / "tiny" / "listops" / "softmax"
    write_json_atomic(softmax / "seed0.json", a_record())
    write_json_atomic(softmax / "seed0 copy.json", a_record())  # a copy made in a file manager
    write_json_atomic(softmax / "seed1.json", a_record(seed=0))  # the seed disagrees with the file name
    write_json_atomic(tmp_path / "runs" / "tiny" / "listops" / "performer" / "seed0.json", a_record())  # misplaced
    write_json_atomic(softmax / "abcdef1234" / "seed0.json", a_record())  # presets record in a variant folder
    write_json_atomic(tmp_path / "runs" / "tiny" / "seed0.json", a_record())  # too shallow
    records, unreadable = scan_results(tmp_path)
    assert [r["_path"] for r in records] == [str(softmax / "seed0.json")]
    reasons = {os.path.relpath(u["path"], tmp_path / "runs"): u["reason"] for u in unreadable}
    assert reasons == {
        "tiny/listops/softmax/seed0 copy.json": "file name 'seed0 copy.json' is not seed<k>.json (a copy?)",
        "tiny/listops/softmax/seed1.json": "record's seed is 0 but the file is seed1.json",
        "tiny/listops/performer/seed0.json": (
            "record's mechanism is 'softmax' but it lies in folder 'performer' (a misplaced record)"
        ),
        "tiny/listops/softmax/abcdef1234/seed0.json": (
            "record's variant is '' but it lies in folder 'abcdef1234' (a misplaced record)"
        ),
        "tiny/seed0.json": "lies 1 folders below runs/, not at <scale>/<task>/<mechanism>/[<variant>/]",
    }


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"metrics": {"test": {"accuracy": 1.7}}}, "metrics.test.accuracy is 1.7, outside [0, 1]"),
        ({"metrics": {"test": {"accuracy": -0.1}}}, "metrics.test.accuracy is -0.1, outside [0, 1]"),
        ({"metrics": {"test": {"accuracy": "0.5"}}}, "metrics.test.accuracy is '0.5', not a number"),
        ({"metrics": {"test": {"accuracy": [0.5]}}}, "metrics.test.accuracy is [0.5], not a number"),
        (
            {"metrics": {"test": {"accuracy_ci95": [0.4, 1.2]}}},
            "metrics.test.accuracy_ci95 is [0.4, 1.2], outside [0, 1]",
        ),
        (
            {"metrics": {"test": {"accuracy_ci95": [0.6, 0.4]}}},
            "metrics.test.accuracy_ci95 is [0.6, 0.4], not an interval",
        ),
        ({"metrics": {"test": {"accuracy": True}}}, "metrics.test.accuracy is true, not a number"),
        ({"metrics": {"test": {"exact_hard": 2.0}}}, "metrics.test.exact_hard is 2.0, outside [0, 1]"),
        ({"metrics": {"test": {"loss": -1.0}}}, "metrics.test.loss is -1.0, negative"),
        ({"metrics": {"test": 0.5}}, "metrics.test is 0.5, not an object"),
        ({"metrics": [0.5]}, "metrics is [0.5], not an object"),
        ({"seed": "0"}, "seed is '0', not a whole number >= 0"),
        ({"seed": -1}, "seed is -1, not a whole number >= 0"),
        ({"seed": 0.5}, "seed is 0.5, not a whole number >= 0"),
        ({"wall_s": "5"}, "wall_s is '5', not a number >= 0"),
        ({"params": "1000"}, "params is '1000', not a whole number >= 0"),
        ({"tokens_per_s": -3.0}, "tokens_per_s is -3.0, not a number >= 0"),
        ({"scale": None}, "scale is null, not text"),
        ({"task": ""}, "task is empty"),
        ({"status": "done"}, "unknown status 'done'"),
        ({"error": 3}, "error is 3, not text"),
        ({"data": {"majority_accuracy": 1.5}}, "data.majority_accuracy is 1.5, not a number in [0, 1]"),
        ({"data": "generated"}, "data is 'generated', not an object"),
        ({"test_items": {"correct": [1, "x"]}}, "test_items.correct is not a list of whole numbers >= 0"),
    ],
)
def test_a_record_against_the_schema_is_listed_with_its_reason_and_the_report_survives(tmp_path, changes, reason):
    from harness.core.results import write_json_atomic
    from harness.report.leaderboard import write_report

    folder = tmp_path / "runs" / "tiny" / "listops" / "softmax"
    write_json_atomic(folder / "seed0.json", a_record())
    write_json_atomic(folder / "seed1.json", a_record(**{"seed": 1, **changes}))
    records, unreadable = scan_results(tmp_path)
    assert [r["seed"] for r in records] == [0]
    assert len(unreadable) == 1 and unreadable[0]["reason"].startswith(reason), unreadable
    text = write_report(tmp_path).read_text()  # one bad record never stops the report
    assert "unreadable result files: 1" in text


def report_under_a_file_size_limit(results, limit):
    """``write_report`` in a real process whose files cannot grow past ``limit`` bytes (as on a
    full disk: the write fails with EFBIG part-way)."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", f"from harness.report.leaderboard import write_report; write_report({str(results)!r})"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=cap,
        timeout=300,
    )


def test_the_leaderboard_and_plots_survive_a_write_that_fails_part_way(tmp_path):
    """A report that cannot finish writing leaves the previous leaderboard and plots whole."""
    from harness.core.results import write_json_atomic
    from harness.report.leaderboard import write_report

    folder = tmp_path / "runs" / "tiny" / "listops" / "softmax"
    write_json_atomic(folder / "seed0.json", a_record())
    for seed in range(1, 151):  # many failures with long errors: a leaderboard larger than its plot
        write_json_atomic(
            folder / f"seed{seed}.json",
            a_record(seed=seed, status="failed", metrics={}, error=f"RuntimeError {seed}: " + "x" * 2000),
        )
    board = write_report(tmp_path)
    plot = tmp_path / "plots" / "accuracy_vs_length_tiny.png"
    before_board, before_plot = board.read_bytes(), plot.read_bytes()
    assert len(before_board) > 40_000 > len(before_plot) > 10_000
    write_json_atomic(folder / "seed151.json", a_record(seed=151))  # the next report differs
    failed = report_under_a_file_size_limit(tmp_path, 40_000)  # the plot fits, the leaderboard does not
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert board.read_bytes() == before_board  # not cut at 40,000 bytes
    failed = report_under_a_file_size_limit(tmp_path, 10_000)  # not even the plot fits
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert plot.read_bytes().endswith(b"IEND\xaeB`\x82") and len(plot.read_bytes()) > 10_000  # a whole PNG
    assert board.read_bytes() == before_board
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temp file left behind


# ----------------------------------------------------------------------------- baselines from any folder (issue 25)


def test_a_record_names_its_data_cache_relative_to_the_cache_root_and_the_report_finds_it_from_anywhere(
    tmp_path, monkeypatch
):
    """A cell run with the default relative cache (.cache/data) in one folder; the report run
    from another still computes the baselines from that cell's cached splits."""
    from harness.core.registry import create_task
    from harness.core.results import record_cache_path, write_json_atomic
    from harness.report.leaderboard import write_report

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    monkeypatch.chdir(project)
    task = {k: v for k, v in compose(["scale=tiny", "task=listops"]).task.items() if k != "name"}
    _, info = create_task("listops", scale="tiny", **task).load(".cache/data")
    data = info.as_record()
    assert data["cache_root"] == str(project / ".cache" / "data")
    assert data["cache_path"] == f"listops/generated-{info.cache_path.rsplit('-', 1)[1]}"  # below the root
    record = a_record(data={**data, "majority_accuracy": 0.15}, scale="tiny")
    write_json_atomic(tmp_path / "results" / "runs" / "tiny" / "listops" / "softmax" / "seed0.json", record)
    monkeypatch.chdir(elsewhere)
    records, _ = scan_results(tmp_path / "results")
    assert record_cache_path(records[0]) == str(project / ".cache" / "data" / data["cache_path"])
    text = write_report(tmp_path / "results").read_text()
    assert "| baseline: bag-of-n-grams LR" in text  # computed from the cache, not only the recorded majority
    # the cache moved to another root (another machine, $HARNESS_CACHE_DIR): found there
    (project / ".cache").rename(tmp_path / "moved")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "moved" / "data"))
    assert record_cache_path(records[0]) == str(tmp_path / "moved" / "data" / data["cache_path"])


# ----------------------------------------------------------------------------- the committed leaderboard (issue 25)


def test_a_report_of_fewer_results_does_not_replace_a_leaderboard_built_from_more(workdir, tmp_path):
    """A fresh clone has the committed leaderboard (built from N cells) but no runs: `make report`
    there refuses with one line and leaves it as it is; force=true replaces it."""
    import re

    from harness.core.results import write_json_atomic

    committed = (ROOT / "results" / "leaderboard.md").read_bytes()
    built_from = int(re.search(rb" from (\d+) cell results ", committed).group(1))
    assert built_from > 1
    (tmp_path / "leaderboard.md").write_bytes(committed)
    refused = cli(workdir, "report", f"results_dir={tmp_path}", timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'leaderboard.md'} was built from {built_from} cell results and only 0 exist now; "
        "not overwritten (force=true replaces it)"
    ]
    assert (tmp_path / "leaderboard.md").read_bytes() == committed and not (tmp_path / "plots").exists()
    write_json_atomic(tmp_path / "runs" / "tiny" / "listops" / "softmax" / "seed0.json", a_record())
    assert cli(workdir, "report", f"results_dir={tmp_path}", timeout=120).returncode == 1  # 1 < N: still refused
    forced = cli(workdir, "report", f"results_dir={tmp_path}", "force=true", timeout=120)
    assert forced.returncode == 0, forced.stderr[-2000:]
    text = (tmp_path / "leaderboard.md").read_text()
    assert " from 1 cell results " in text
    again = cli(workdir, "report", f"results_dir={tmp_path}", timeout=120)  # as many as before: no question
    assert again.returncode == 0, again.stderr[-2000:]


# ----------------------------------------------------------------------------- one classification of errors (issue 25)


def test_one_classification_of_errors_for_cells_and_the_speed_sweep():
    from harness.bench import speed
    from harness.core.results import status_of
    from harness.train import run
    from harness.train.training import CellTimeout, NonFiniteLoss

    assert run.status_of is status_of and speed.status_of is status_of  # one place
    try:
        torch.empty(2**50, dtype=torch.uint8)  # what the CPU allocator says when memory runs out
    except RuntimeError as exc:
        cpu_oom = exc
    assert "can't allocate memory" in str(cpu_oom) and status_of(cpu_oom) == "oom"
    assert status_of(MemoryError()) == "oom" and status_of(torch.cuda.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert status_of(speed.MeasurementTimeout()) == "timeout" == status_of(CellTimeout())
    assert status_of(NonFiniteLoss()) == "nan" and status_of(ValueError("shape")) == "failed"


@pytest.mark.slow
def test_a_cell_out_of_memory_under_ulimit_v_is_oom_with_its_peak_memory(workdir, tmp_path):
    """A real cell process under `ulimit -v 8G` that asks for 16 GB: status oom, and the record
    still has the process's peak memory."""
    import resource

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    done = cli(
        workdir,
        "run",
        "mechanism=allocates",
        *TINY,
        f"results_dir={tmp_path}",
        f"cache_dir={workdir / 'cache'}",
        preexec_fn=limit_address_space,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    records, _ = scan_results(tmp_path)
    assert len(records) == 1 and records[0]["status"] == "oom", records
    assert "can't allocate memory" in records[0]["error"] and records[0]["peak_memory_mb"] > 0


# ----------------------------------------------------------------------------- plugins (issue 25)

PLUGIN = """
from dataclasses import dataclass

from harness.core.attention import Attention
from harness.core.registry import register_mechanism
{imports}

@dataclass
class Config:
    scale: float = {scale}


@register_mechanism({name!r}, Config, key_padding=True)
class Plugin(Attention):
    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        return v * {factor}
"""


def plugin(name, scale=1.0, imports="", factor="self.cfg.scale"):
    return PLUGIN.format(name=name, scale=scale, imports=imports, factor=factor)


def test_two_plugin_files_registering_one_name_is_an_error_naming_both(tmp_path):
    from harness.core.registry import UnknownNameError, get_mechanism, list_mechanisms

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "twice.py").write_text(plugin("twice_registered", scale=1.0))
    (second / "twice.py").write_text(plugin("twice_registered", scale=2.0))  # same file name, other code
    discover(extra_paths=[first, second])
    error = plugin_errors()[str(second / "twice.py")]
    assert "mechanism 'twice_registered' is registered twice" in error
    assert str(first / "twice.py") in error and str(second / "twice.py") in error
    assert "twice_registered" not in list_mechanisms()  # mechanisms=all leaves it out
    with pytest.raises(UnknownNameError, match="registered twice"):
        get_mechanism("twice_registered")  # neither silently wins


@pytest.mark.parametrize("name", ["My Mech", "../../evil", "a/b", ".hidden", "all,of,them"])
def test_a_name_that_cannot_be_a_path_is_refused_at_registration(tmp_path, name):
    from harness.core.registry import list_mechanisms

    (tmp_path / "bad_name.py").write_text(plugin(name))
    discover(extra_paths=[tmp_path])
    error = plugin_errors()[str(tmp_path / "bad_name.py")]
    assert "is not a plain name" in error and str(tmp_path / "bad_name.py") in error
    assert name not in list_mechanisms()


def test_a_plugin_imports_its_own_helper_module_and_is_imported_once_per_run(workdir, tmp_path):
    """Through the CLI: the helper beside the plugin imports, and a cell's run imports the plugin once."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "_helper_of_uses_helper.py").write_text("FACTOR = 1.0\n")
    count = tmp_path / "imports.txt"
    imports = (
        f"from _helper_of_uses_helper import FACTOR\nwith open({str(count)!r}, 'a') as _f:\n"
        "    _f.write('imported\\n')\n"
    )
    (folder / "uses_helper.py").write_text(plugin("uses_helper", imports=imports, factor="FACTOR"))
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(folder), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "run",
            "mechanism=uses_helper",
            *TINY,
            f"results_dir={tmp_path / 'r'}",
            f"cache_dir={workdir / 'cache'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records, _ = scan_results(tmp_path / "r")
    assert [r["status"] for r in records] == ["ok"]
    assert count.read_text().count("imported") == 1


# ----------------------------------------------------------------------------- a seed reproduces its number (issue 25)


def _builtin_mechanisms():
    from harness.core.registry import get_mechanism, list_mechanisms

    return [n for n in list_mechanisms() if not get_mechanism(n).module.startswith("harness_plugin_")]


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", _builtin_mechanisms())
def test_the_same_seed_gives_the_same_record_twice(workdir, tmp_path, mechanism):
    """One tiny cell of each mechanism trained twice (trainer.deterministic=true, CPU): the
    records' metrics and per-item results are identical, not merely close."""
    first, second = (
        run_cell(cell(workdir, f"mechanism={mechanism}", f"results_dir={tmp_path / name}"))
        for name in ("first", "second")
    )
    assert first["status"] == second["status"]
    assert first["metrics"] == second["metrics"] and first["test_items"] == second["test_items"]


# ----------------------------------------------------------------------------- which code made a record (round two)


def git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_code_state_names_the_imported_files_that_differ_from_the_commit(tmp_path):
    """A real git repository: a file edited, one never committed and one ignored differ from the
    commit; a file not imported does not count, whatever its state; a file in no repository does."""
    from harness.core.results import code_state

    repo = tmp_path / "repo"
    (repo / "mechanisms").mkdir(parents=True)
    for name in ("committed", "edited", "not_imported"):
        (repo / "mechanisms" / f"{name}.py").write_text(f"NAME = {name!r}\n")
    (repo / ".gitignore").write_text("mechanisms/ignored_*.py\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    commit = git(repo, "rev-parse", "--short", "HEAD")
    (repo / "mechanisms" / "edited.py").write_text("NAME = 'changed'\n")
    (repo / "mechanisms" / "not_imported.py").write_text("NAME = 'changed too'\n")
    (repo / "mechanisms" / "untracked.py").write_text("NAME = 'new'\n")
    (repo / "mechanisms" / "ignored_x.py").write_text("NAME = 'ignored'\n")
    outside = tmp_path / "elsewhere" / "plugin.py"
    outside.parent.mkdir()
    outside.write_text("NAME = 'outside'\n")
    m = repo / "mechanisms"

    clean = code_state([m / "committed.py"], root=repo)
    assert clean["commit"] == commit and clean["dirty"] is False and clean["dirty_files"] == []
    state = code_state(
        [m / "committed.py", m / "edited.py", m / "untracked.py", m / "ignored_x.py", outside], root=repo
    )
    assert state["commit"] == commit and state["dirty"] is True
    assert state["dirty_files"] == sorted(
        ["mechanisms/edited.py", "mechanisms/untracked.py", "mechanisms/ignored_x.py", str(outside.resolve())]
    )
    git(repo, "add", "mechanisms/edited.py")  # staged, not committed: still not the commit's code
    assert "mechanisms/edited.py" in code_state([m / "edited.py"], root=repo)["dirty_files"]


def test_the_imported_code_is_the_projects_and_the_plugins_not_tests_or_packages(workdir):
    from harness.core.results import PROJECT_ROOT, imported_code_files

    files = imported_code_files()
    assert (
        PROJECT_ROOT / "harness" / "train" / "run.py" in files and PROJECT_ROOT / "mechanisms" / "softmax.py" in files
    )
    assert workdir / "plugins" / "faults.py" in files  # a $HARNESS_PLUGIN_PATH plugin this process imported
    assert "tests" not in {f.relative_to(PROJECT_ROOT).parts[0] for f in files if f.is_relative_to(PROJECT_ROOT)}
    assert not [f for f in files if "site-packages" in f.parts] and all(f.is_file() for f in files)
    assert Path(pytest.__file__) not in files and Path(__file__).resolve() not in files


def test_a_plugin_file_in_no_commit_makes_the_record_dirty_and_names_it(workdir, tmp_path):
    """The faults plugin is in no git repository: the record says its code is not the commit's
    (it said dirty: false, looking only at tracked files of the checkout)."""
    record = run_cell(cell(workdir, "mechanism=slow", "mechanism.seconds=0", f"results_dir={tmp_path}"))
    assert record["status"] == "ok"
    env = record["env"]
    assert env["dirty"] is True and str((workdir / "plugins" / "faults.py").resolve()) in env["dirty_files"]
    assert env["commits"] == [env["commit"]] and len(env["segments"]) == 1
    assert env["segments"][0]["from_step"] == 0 and env["segments"][0]["dirty"] is True
    assert json.loads(result_path(tmp_path, "tiny", "listops", "slow", 0, record["variant"]).read_text())["env"] == env


SLOW_IN_GIT = '''"""A slow mechanism committed in the project (for the provenance test)."""
import time
from dataclasses import dataclass

from harness.core.attention import Attention
from harness.core.registry import register_mechanism


@dataclass
class SlowConfig:
    seconds: float = 0.05


@register_mechanism("slow_in_git", SlowConfig, key_padding=True)
class SlowInGit(Attention):
    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        time.sleep(self.cfg.seconds)
        return v * 1.0
'''


def test_a_cell_resumed_across_a_code_change_records_every_commit_it_trained_under(workdir, tmp_path):
    """A copy of the project in a real git repository: a cell runs at commit A (clean) and is killed
    after a checkpoint; a mechanism file is then changed and committed (B) and an uncommitted
    mechanism file added; the resumed cell records both commits, and the dirty file of its second run."""
    import shutil

    repo = tmp_path / "project"
    for name in ("harness", "mechanisms", "tasks", "hydra_plugins"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text("__pycache__/\n")
    (repo / "mechanisms" / "slow_in_git.py").write_text(SLOW_IN_GIT)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "A")
    first = git(repo, "rev-parse", "--short", "HEAD")
    results = tmp_path / "results"
    args = [
        "run",
        "mechanism=slow_in_git",
        "scale=tiny",
        "trainer.progress_bar=false",
        "train.max_steps=16",
        "train.eval_every=4",
        f"results_dir={results}",
        f"cache_dir={workdir / 'cache'}",
    ]  # a variant
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_PLUGIN_PATH"}
    env["OMP_NUM_THREADS"] = "1"
    checkpoints = results / "checkpoints" / "tiny" / "listops" / "slow_in_git"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=repo,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.rglob("last.ckpt")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    runs = results / "runs"
    assert list(checkpoints.rglob("last.ckpt")) and not list(runs.rglob("seed0.json"))

    changed = SLOW_IN_GIT.replace('"""A slow', '"""A changed slow')  # the same config, other code
    (repo / "mechanisms" / "slow_in_git.py").write_text(changed)
    git(repo, "commit", "-q", "-am", "B")
    second = git(repo, "rev-parse", "--short", "HEAD")
    (repo / "mechanisms" / "uncommitted.py").write_text(SLOW_IN_GIT.replace('"slow_in_git"', '"uncommitted"'))
    done = subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=repo, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [record_path] = runs.rglob("seed0.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok" and record["resumed_from_step"] >= 4 and record["steps"] == 16
    env_record = record["env"]
    assert env_record["commit"] == second and env_record["commits"] == [first, second]
    segments = env_record["segments"]
    assert [s["commit"] for s in segments] == [first, second]
    assert segments[0]["from_step"] == 0 and segments[1]["from_step"] == record["resumed_from_step"]
    in_project = [[f for f in s["dirty_files"] if not os.path.isabs(f)] for s in segments]
    assert in_project == [[], ["mechanisms/uncommitted.py"]]  # the first run's code was exactly commit A
    assert segments[1]["dirty"] is True and env_record["dirty"] is True
    assert "mechanisms/uncommitted.py" in env_record["dirty_files"]


def test_the_leaderboard_header_says_when_a_cells_code_is_not_one_commit(tmp_path):
    from harness.core.results import write_json_atomic
    from harness.report.leaderboard import write_report

    folder = tmp_path / "runs" / "tiny" / "listops" / "softmax"
    write_json_atomic(
        folder / "seed0.json", a_record(env={"commit": "abc1234", "commits": ["abc1234"], "dirty": False})
    )
    text = write_report(tmp_path).read_text()
    assert "**commit(s)**: abc1234\n" in text
    write_json_atomic(
        folder / "seed1.json",
        a_record(
            seed=1,
            env={
                "commit": "def5678",
                "commits": ["abc1234", "def5678"],
                "dirty": True,
                "dirty_files": ["mechanisms/x.py"],
            },
        ),
    )
    text = write_report(tmp_path).read_text()
    assert (
        "**commit(s)**: abc1234, def5678 (1 cell(s) ran code that differs from its commit (env.dirty_files); "
        "1 cell(s) trained under several commits (env.segments))"
    ) in text


# ----------------------------------------------------------------------------- a results folder that cannot be written


def test_a_results_folder_under_a_file_is_one_line_before_anything_runs(workdir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    results = blocker / "results"
    expected = f"error: cannot write to results_dir={results}: {blocker} is a file, not a folder"
    done = cli(
        workdir,
        "run",
        "mechanism=softmax",
        *TINY,
        f"results_dir={results}",
        f"cache_dir={tmp_path / 'cache'}",
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [expected], done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # nothing read or built
    grid = cli(
        workdir,
        "grid",
        "tasks=listops",
        "mechanisms=softmax",
        "seeds=0",
        *TINY,
        f"results_dir={results}",
        f"cache_dir={tmp_path / 'cache'}",
        timeout=120,
    )
    assert grid.returncode == 2 and grid.stderr.strip().splitlines() == [expected], grid.stderr[-3000:]
    assert "rerun=failed" not in grid.stdout + grid.stderr and "Traceback" not in grid.stderr


def test_a_results_folder_without_write_permission_is_one_line(tmp_path, monkeypatch, capsys):
    """Tests may run as root, where permissions are not enforced: os.access says what a user would meet."""
    from harness.core.results import UnwritableFolder, check_writable_folder
    from harness.grid import sweep as grid
    from harness.train.run import check_before_hydra

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode)
    )
    results = locked / "results"
    expected = f"cannot write to results_dir={results}: {locked} is not writable"
    with pytest.raises(UnwritableFolder, match="^" + expected):
        check_writable_folder(results)
    check_writable_folder(tmp_path / "fine" / "results")  # a folder that can be made: no error, nothing made
    assert not (tmp_path / "fine").exists()
    with pytest.raises(SystemExit) as stopped:
        check_before_hydra(["mechanism=softmax", "scale=tiny", f"results_dir={results}"])
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith("error: " + expected)
    assert grid.main(["scale=tiny", "tasks=listops", "mechanisms=softmax", "seeds=0", f"results_dir={results}"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: " + expected) and "rerun=failed" not in out.out + out.err
    assert not results.exists()


def test_a_mistyped_key_leaves_no_folder_behind(workdir, tmp_path):
    """Hydra created the cell's log folder (and the grid its sweep folder) before the keys were checked."""
    for command in (["run", "mechanism=softmax"], ["grid", "tasks=listops", "mechanisms=softmax", "seeds=0"]):
        done = cli(
            workdir,
            *command,
            *TINY,
            "+train.max_step=10",
            f"results_dir={tmp_path / 'r'}",
            f"cache_dir={tmp_path / 'cache'}",
            timeout=120,
        )
        assert done.returncode == 2 and "train.max_step is not a train setting" in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def test_a_grid_advises_rerun_failed_only_for_recorded_failures(tmp_path, capsys):
    from harness.core.results import write_json_atomic
    from harness.grid.sweep import expand, summarize

    scale, groups = expand(
        {"grid": "default", "scale": "tiny", "tasks": "listops", "mechanisms": "softmax,linear", "seeds": "0"}
    )
    assert summarize(scale, groups, str(tmp_path), 0) == 1  # nothing recorded: a plain rerun runs them
    out = capsys.readouterr().out
    assert "rerun=failed" not in out and "run when the same command runs again" in out
    write_json_atomic(
        tmp_path / "runs" / "tiny" / "listops" / "softmax" / "seed0.json",
        a_record(status="failed", metrics={}, error="RuntimeError: boom"),
    )
    assert summarize(scale, groups, str(tmp_path), 0) == 1
    assert "rerun=failed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- estimates that are true


def test_a_cell_records_its_process_whole_wall_time(workdir, tmp_path):
    started = time.time()
    done = cli(workdir, "run", "mechanism=softmax", *TINY, f"results_dir={tmp_path}", f"cache_dir={workdir / 'cache'}")
    elapsed = time.time() - started
    assert done.returncode == 0, done.stderr[-3000:]
    records, _ = scan_results(tmp_path)
    record = records[0]
    # start-up, imports and data loading are in it, not in wall_s; no more than the process lived
    assert record["wall_s"] + 1.0 < record["process_wall_s"] <= elapsed + 0.5, (record["wall_s"], elapsed)


def test_the_dry_run_estimates_from_whole_process_times_and_says_from_how_many_records(tmp_path, capsys):
    from harness.core.results import write_json_atomic
    from harness.grid.sweep import dry_run, expand

    scale, groups = expand(
        {
            "grid": "default",
            "scale": "tiny",
            "tasks": "listops",
            "mechanisms": "softmax,linear,performer",
            "seeds": "0,1",
        }
    )
    runs = tmp_path / "runs" / "tiny" / "listops"
    write_json_atomic(runs / "softmax" / "seed0.json", a_record(wall_s=5.0, process_wall_s=20.0))
    dry_run(scale, groups, str(tmp_path), 1)
    out = capsys.readouterr().out
    # 5 cells left, each from the one recorded cell's 20 s (its wall_s, 5 s, leaves out start-up and data)
    assert (
        "estimated time left: 100 s (5 of 5 cells left estimated from 1 recorded cell's whole process time, "
        "1 at a time)" in out
    ), out
    write_json_atomic(runs / "linear" / "seed0.json", a_record(mechanism="linear", wall_s=6.0))  # an older record
    dry_run(scale, groups, str(tmp_path), 2)
    out = capsys.readouterr().out
    assert (
        "4 of 4 cells left estimated from 2 recorded cells' whole process time; 1 of those records only "
        "training time" in out
    ), out


@pytest.mark.parametrize(
    "rerun,status,starts",
    [
        ("none", "ok", False),
        ("none", "failed", False),
        ("failed", "ok", False),
        ("failed", "failed", True),
        ("all", "ok", True),
    ],
)
def test_the_grid_skips_a_standing_record_without_starting_a_process(workdir, monkeypatch, rerun, status, starts):
    """A recorded cell whose record stands (run's own rule, ``record_stands``) is skipped by the launcher
    itself, so resuming a grid costs no process start per recorded cell; anything else starts one."""
    from harness.core.results import write_json_atomic
    from harness.grid import launcher

    target = resolve_cell(cell(workdir, "mechanism=softmax", "seed=11", f"rerun={rerun}"))
    record = {**run_cell(cell(workdir, "mechanism=softmax", "seed=11")), "status": status}
    record.pop("_path", None)
    write_json_atomic(target.result_path, record)

    class Started(Exception):
        pass

    def popen(*args, **kwargs):
        raise Started

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    runner = launcher.ProcessLauncherBase(n_jobs=1)
    if starts:
        with pytest.raises(Started):
            runner._run_cell_process(target, [], rerun)
    else:
        kept = runner._run_cell_process(target, [], rerun)
        assert kept["_skipped"] is True and kept["status"] == status and kept["seed"] == 11
