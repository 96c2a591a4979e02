"""The grid on real processes: a cell killed by the kernel, two grids on one results
folder, a killed grid takes its cells along, DDP with 2 CPU processes, the CLI's help and
Hydra's override grammar."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from plugin_fixtures import ROOT

from harness.core.results import scan_results

CELL = ["trainer.progress_bar=false", "train.max_steps=4", "train.eval_every=2"]

KILLER = '''
"""Mechanisms for grid tests: one whose process the 'kernel' kills, one that is slow."""
import os
import signal
import time
from dataclasses import dataclass

from harness.core.attention import Attention
from harness.core.registry import register_mechanism


@dataclass
class KillConfig:
    at_step: int = 2
    seconds: float = 0.5


@register_mechanism("killed_by_kernel", KillConfig, key_padding=True)
class KilledByKernel(Attention):
    """SIGKILLs its own process at a training step, as the OOM killer would."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if self.training and context is not None and context.step >= self.cfg.at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return v * 1.0


@register_mechanism("sleepy", KillConfig, key_padding=True)
class Sleepy(Attention):
    """Sleeps in every call (a long cell)."""

    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        time.sleep(self.cfg.seconds)
        return v * 1.0
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    (root / "plugins").mkdir()
    (root / "plugins" / "killer.py").write_text(KILLER)
    return root, {
        **os.environ,
        "HARNESS_PLUGIN_PATH": str(root / "plugins"),
        "OMP_NUM_THREADS": "1",
        "HARNESS_CACHE_DIR": str(root / "cache"),
    }


def harness(env, *args, timeout=600, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env[1],
        timeout=timeout,
        **kwargs,
    )


def test_a_cell_killed_by_the_kernel_is_recorded_and_the_grid_goes_on(env):
    results = env[0] / "killed"
    done = harness(
        env,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,killed_by_kernel,linear",
        "seeds=0",
        f"results_dir={results}",
        *CELL,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # a cell did not finish
    records, unreadable = scan_results(results)
    status = {r["mechanism"]: r for r in records}
    assert not unreadable and set(status) == {"softmax", "killed_by_kernel", "linear"}
    assert status["softmax"]["status"] == "ok" and status["linear"]["status"] == "ok"  # the one after it ran too
    killed = status["killed_by_kernel"]
    assert killed["status"] == "oom" and "SIGKILL" in killed["error"] and "last log line" in killed["error"]
    # one progress line per finished cell, from the Hydra callback
    lines = [x for x in done.stdout.splitlines() if x.startswith("[")]
    assert any(x.startswith("[1/3] ok") for x in lines) and any(x.startswith("[2/3] oom") for x in lines)
    assert any(x.startswith("[3/3] ok") for x in lines)
    # peak memory is each cell's own, not the sweep's
    assert status["softmax"]["peak_memory_mb"] > 0 and status["linear"]["peak_memory_mb"] > 0


def test_two_grids_on_one_results_folder_record_each_cell_once(env):
    results = env[0] / "two"
    args = [
        sys.executable,
        "-m",
        "harness",
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,linear",
        "seeds=0,1",
        f"results_dir={results}",
        *CELL,
    ]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env[1])
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    records, unreadable = scan_results(results)
    assert not unreadable
    keys = sorted((r["mechanism"], r["seed"]) for r in records)
    assert keys == [("linear", 0), ("linear", 1), ("softmax", 0), ("softmax", 1)], outputs
    assert all(r["status"] == "ok" for r in records), outputs  # nothing overwritten with failed, nothing lost
    ran = sum(o.count("ok          listops") for o in outputs)
    assert ran >= 4
    # a third run of the same grid finds everything recorded
    again = harness(
        env,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,linear",
        "seeds=0,1",
        f"results_dir={results}",
        "dry_run=true",
        *CELL,
    )
    assert again.returncode == 0 and again.stdout.count("ok ") >= 4 and "todo" not in again.stdout


def test_killing_the_grid_kills_its_cells(env):
    results = env[0] / "orphans"
    marker = f"results_dir={results}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "grid",
            "scale=tiny",
            "tasks=listops",
            "mechanisms=sleepy",
            "seeds=0",
            marker,
            "trainer.progress_bar=false",
            "train.max_steps=200",
            "mechanism.seconds=0.5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env[1],
    )
    deadline = time.time() + 300
    folder = str(results)  # the grid hands it on quoted (results_dir='...'): look for the path itself
    while time.time() < deadline and not _processes_with(folder, "harness.train\x00task="):
        time.sleep(0.5)
    assert _processes_with(folder, "harness.train\x00task="), "the cell never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _processes_with(folder):
        time.sleep(0.5)
    assert not _processes_with(folder), "a cell outlived its grid"


def _processes_with(*needles: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            found.append(int(pid))
    return found


def test_ddp_with_two_cpu_processes_writes_exactly_one_result(env):
    results = env[0] / "ddp"
    done = harness(
        env,
        "run",
        "task=listops",
        "mechanism=softmax",
        "scale=tiny",
        "trainer=ddp_cpu",
        f"results_dir={results}",
        *CELL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records, unreadable = scan_results(results)
    assert len(records) == 1 and not unreadable and records[0]["status"] == "ok"
    assert records[0]["config"]["trainer"]["precision"] == "32-true"


@pytest.mark.parametrize("command", ["list", "run", "grid", "evaluate", "data", "report", "speed"])
def test_every_subcommand_has_help(env, command):
    done = harness(env, command, "--help", timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert len(done.stdout.strip()) > 40


def test_cfg_job_shows_the_composed_config(env):
    done = harness(
        env, "run", "task=listops", "mechanism=performer", "mechanism.num_features=32", "--cfg", "job", timeout=120
    )
    assert done.returncode == 0 and "num_features: 32" in done.stdout


def test_hydra_glob_and_choice_select_mechanisms(env):
    done = harness(
        env,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=glob(*nystrom*)",
        "seeds=0",
        f"results_dir={env[0] / 'glob'}",
        "dry_run=true",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    cells = [x for x in done.stdout.splitlines() if x.startswith("todo")]
    assert cells and all("nystrom" in x for x in cells)
    assert any("/nystrom/" in x for x in cells) and any("rela_nystrom" in x for x in cells)
    choice = harness(
        env,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=choice(softmax,linear)",
        "seeds=0",
        f"results_dir={env[0] / 'glob'}",
        "dry_run=true",
        timeout=300,
    )
    assert [x.split()[1] for x in choice.stdout.splitlines() if x.startswith("todo")] == [
        "tiny/listops/softmax/seed0",
        "tiny/listops/linear/seed0",
    ]


def test_a_grid_sweeps_any_key(env, tmp_path):
    from harness.grid.sweep import expand

    scale, groups = expand({"grid": "length", "scale": "tiny", "tasks": "listops", "mechanisms": "softmax"})
    cells = groups[0].cells()
    keys = {o.partition("=")[0] for c in cells for o in c}
    assert len(cells) > 1 and any(k.startswith("task.") for k in keys - {"task", "mechanism", "seed"})


@pytest.mark.parametrize(
    "args,message",
    [
        (["mechanism=softmax"], "the grid key is mechanisms=softmax"),
        (["seeds=a"], "seeds are integers"),
        (["rerun=maybe"], "rerun='maybe' is not one of"),
        (["modle.depth=2"], "unknown key 'modle' for grid (did you mean 'model'?)"),
        (["model.depht=2"], "cell override rejected"),
        (["mechanisms=nope"], "unknown mechanism 'nope'"),
        (["n_jobs=lots"], "n_jobs=lots: a positive integer or auto"),
    ],
)
def test_grid_mistakes_are_one_line(env, args, message):
    done = harness(env, "grid", "scale=tiny", "tasks=listops", *args, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_dry_run_estimates_from_recorded_cells(env):
    results = env[0] / "killed"  # recorded by the first test (or empty: then no estimate)
    done = harness(
        env,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,linear,killed_by_kernel",
        "seeds=0,1",
        f"results_dir={results}",
        "dry_run=true",
        *CELL,
        timeout=300,
    )
    assert done.returncode == 0
    assert "6 cells" in done.stdout and "estimated time left" in done.stdout
    records = [json.loads(p.read_text()) for p in results.rglob("seed*.json")]
    if records:
        assert "ok " in done.stdout and "unknown" not in done.stdout.split("estimated time left")[1]


def test_joblib_launcher_runs_cells_side_by_side(env):
    """Hydra's joblib launcher pickles the config store to its workers, so mechanisms loaded
    from $HARNESS_PLUGIN_PATH files (not importable by name) can't travel: run it without them."""
    results = env[0] / "joblib"
    plain = (env[0], {k: v for k, v in env[1].items() if k != "HARNESS_PLUGIN_PATH"})
    done = harness(
        plain,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,linear",
        "seeds=0",
        "launcher=joblib",
        "n_jobs=2",
        f"results_dir={results}",
        *CELL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records, _ = scan_results(results)
    assert sorted(r["mechanism"] for r in records) == ["linear", "softmax"] and all(
        r["status"] == "ok" for r in records
    )
    lines = [x for x in done.stdout.splitlines() if re.match(r"\[\s*\d+/2\] ok ", x)]
    assert len(lines) == 2  # the progress callback runs in joblib's workers too


def test_cells_side_by_side_share_the_cores():
    from harness.grid.launcher import cell_environment

    assert cell_environment(2, environ={}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert cell_environment(3, environ={}, cores=16)["MKL_NUM_THREADS"] == "5"
    assert cell_environment(4, environ={}, cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert "OMP_NUM_THREADS" not in cell_environment(1, environ={}, cores=2)  # one cell: torch's default
    assert cell_environment(2, environ={"OMP_NUM_THREADS": "3"}, cores=2)["OMP_NUM_THREADS"] == "3"  # the caller wins


def test_process_launcher_gives_each_cell_its_share_of_threads(env):
    results = env[0] / "threads"
    unset = (env[0], {k: v for k, v in env[1].items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    done = harness(
        unset,
        "grid",
        "scale=tiny",
        "tasks=listops",
        "mechanisms=softmax,linear",
        "seeds=0",
        "n_jobs=2",
        f"results_dir={results}",
        *CELL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records, _ = scan_results(results)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert len(records) == 2 and all(r["env"]["device"].endswith(f", {share} threads)") for r in records)


def test_the_estimate_prefers_cells_of_the_same_config(tmp_path):
    from types import SimpleNamespace

    from harness.core.results import result_path, write_json_atomic
    from harness.grid.sweep import estimate_s

    def put(mechanism, variant, label, wall):
        record = {
            "task": "listops",
            "mechanism": mechanism,
            "scale": "small",
            "seed": 0,
            "status": "ok",
            "wall_s": wall,
            "config_hash": variant or "preset",
            "variant": variant,
            "variant_label": label,
        }
        write_json_atomic(result_path(tmp_path, "small", "listops", mechanism, 0, variant), record)

    put("softmax", "", "", 900.0)  # the preset: a big model
    put("linear", "a1", "model.dim=32", 20.0)  # the grid's smaller model, another mechanism
    put("linear", "", "", 800.0)

    def row(mechanism, config_hash, label):
        return {
            "status": "todo",
            "cell": SimpleNamespace(
                scale="small", task="listops", mechanism=mechanism, config_hash=config_hash, variant_label=label
            ),
        }

    def estimate(*rows):
        found = estimate_s(list(rows), str(tmp_path))
        return found.seconds, found.cells

    assert estimate(row("softmax", "b2", "model.dim=32")) == (20.0, 1)  # same overrides
    assert estimate(row("linear", "a1", "model.dim=32")) == (20.0, 1)  # the same config
    assert estimate(row("softmax", "c3", "model.depth=9")) == (900.0, 1)  # else the mechanism
    assert estimate(row("softmax", "c3", "model.depth=9"), row("linear", "a1", "model.dim=32")) == (920.0, 2)


def test_the_cpu_grid_sweeps_length_end_to_end_and_the_report_has_a_column_per_length(env):
    """grid=cpu at scale=tiny for one task and mechanism: a cell per length, then the report."""
    results = env[0] / "lengths"
    done = harness(
        env,
        "grid",
        "grid=cpu",
        "scale=tiny",
        "tasks=mqar",
        "mechanisms=softmax",
        "seeds=0",
        f"results_dir={results}",
        *CELL,
        "task.num_train=64",
        "task.num_val=16",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records, _ = scan_results(results)
    assert sorted(r["config"]["task"]["max_len"] for r in records) == [1024, 4096]
    assert len({r["config_hash"] for r in records}) == 2 and all(r["status"] == "ok" for r in records)
    done = harness(env, "report", f"results_dir={results}")
    assert done.returncode == 0, done.stderr[-3000:]
    text = (results / "leaderboard.md").read_text()
    accuracy = text[text.index("## Accuracy — scale `tiny`") :]
    assert "mqar L=1K" in accuracy and "mqar L=4K" in accuracy
    assert (results / "plots" / "accuracy_vs_length_tiny.png").exists()


def test_a_command_line_override_with_several_values_is_swept():
    """Hydra's override parser reads the command line: a,b / choice() / range() sweep; lists, quoted
    commas and hydra.* overrides stay fixed (hydra.* go to the multirun, not the cells)."""
    from harness.grid.sweep import command_line_sweep, expand

    fixed, swept = command_line_sweep(
        [
            "task.num_distractors=0,4",
            "train.lr=1e-3",
            "model.dims=[1,2]",
            "+trainer.x=1,2",
            "task.source='a,b'",
            "train.batch_size=range(2,5)",
            "task.data_dir=choice(a,'b c')",
            "hydra.launcher.partition=gpu",
        ]
    )
    assert swept == {
        "task.num_distractors": ["0", "4"],
        "+trainer.x": ["1", "2"],
        "train.batch_size": ["2", "3", "4"],
        "task.data_dir": ["a", "b\\ c"],
    }  # Hydra's escape of 'b c'
    assert fixed == ["train.lr=1e-3", "model.dims=[1,2]", "task.source='a,b'", "hydra.launcher.partition=gpu"]
    _, groups = expand(
        {"scale": "tiny", "tasks": "listops", "mechanisms": "softmax", "seeds": "0"},
        ["train.max_steps=4,8", "train.lr=1e-3", "hydra.launcher.n_jobs=3"],
    )
    cells = groups[0].cells()
    assert len(cells) == 2 and {c[-1] for c in cells} == {"train.max_steps=4", "train.max_steps=8"}
    assert all("train.lr=1e-3" in c for c in cells)
    assert groups[0].hydra_overrides == ["hydra.launcher.n_jobs=3"] and not any("hydra" in o for c in cells for o in c)
    assert [label for label, _ in groups[0].labelled_cells()] == ["train.max_steps=4", "train.max_steps=8"]


@pytest.mark.parametrize(
    "arg,message",
    [
        (
            "train.lr=interval(0,1)",
            "train.lr=interval(0,1): the grid sweeps lists of values (a,b), choice(...) or range(...)",
        ),
        ("task.name=glob(*a*)", "task.name=glob(*a*): the grid sweeps lists of values"),
        ("train.lr=[1,", "train.lr=[1,: not a Hydra override value"),
    ],
)
def test_a_command_line_sweep_the_grid_cannot_list_is_one_line(arg, message):
    from harness.grid.sweep import GridError, command_line_sweep

    with pytest.raises(GridError, match="^" + re.escape(message)) as raised:
        command_line_sweep([arg])
    assert raised.value.message.startswith(message) and "\n" not in raised.value.message


def test_grid_keys_are_read_by_hydras_parser():
    from harness.grid.sweep import _names, _seeds

    assert _seeds("range(0,3)") == [0, 1, 2] and _seeds("0,2") == [0, 2] and _seeds([1]) == [1]
    assert _names("[mqar,listops]", ["listops", "mqar", "text"], "task") == ["mqar", "listops"]
    assert _names("glob(*s)", ["listops", "mqar", "text"], "task") == ["listops"]
    assert _names("choice(text,mqar)", ["listops", "mqar", "text"], "task") == ["text", "mqar"]


def a_grid_file(monkeypatch, tmp_path, text):
    """A grid file of one's own: ``grid=mine`` reads ``tmp_path/mine.yaml``."""
    from harness.grid import sweep

    (tmp_path / "mine.yaml").write_text(text)
    monkeypatch.setattr(sweep, "grid_path", lambda name: tmp_path / f"{name}.yaml")
    return tmp_path / "mine.yaml"


def test_named_bundles_are_groups_with_their_names(monkeypatch, tmp_path):
    from harness.grid.sweep import expand

    a_grid_file(
        monkeypatch,
        tmp_path,
        """
tasks: [listops, mqar]
mechanisms: [softmax]
seeds: [0]
overrides: {train.max_steps: 5}
task_sweep:
  listops:
    - {name: short, task.max_length: 64, train.batch_size: 4}
    - {name: long, task.max_length: 128, train.batch_size: 2}
  mqar: {task.max_len: [64, 128]}
""",
    )
    scale, groups = expand({"grid": "mine", "scale": "tiny"}, ["train.lr=1e-3"])
    assert [(g.task, g.bundle) for g in groups] == [("listops", "short"), ("listops", "long"), ("mqar", "")]
    assert groups[1].cells() == [
        [
            "task=listops",
            "mechanism=softmax",
            "seed=0",
            "train.max_steps=5",
            "task.max_length=128",
            "train.batch_size=2",
            "train.lr=1e-3",
        ]
    ]
    assert groups[1].source == f"{tmp_path / 'mine.yaml'}, task_sweep.listops"
    assert [label for label, _ in groups[2].labelled_cells()] == ["task.max_len=64", "task.max_len=128"]
    _, swept = expand({"grid": "mine", "scale": "tiny", "tasks": "listops"}, ["train.lr=1e-3,1e-2"])
    assert [label for label, _ in swept[0].labelled_cells()] == ["short,train.lr=0.001", "short,train.lr=0.01"]


@pytest.mark.parametrize(
    "sweep,message",
    [
        (
            "[{name: a, task.max_length: 64, train.batch_size: 4}, {name: b, task.max_length: 128}]",
            "task_sweep.listops: bundle 'b' lacks train.batch_size (the bundles of one task set the same keys: "
            "task.max_length, train.batch_size)",
        ),
        (
            "[{name: a, task.max_length: 64}, {name: b, task.max_length: 128, train.lr: 0.1}]",
            "task_sweep.listops: bundle 'b' sets train.lr, which bundle 'a' does not",
        ),
        ("[{task.max_length: 64}]", "task_sweep.listops: bundle 1 (task.max_length) has no name"),
        (
            "[{name: a, task.max_length: 64}, {name: a, task.max_length: 128}]",
            "task_sweep.listops: two bundles are named 'a'",
        ),
        ("[]", "task_sweep.listops: an empty list of bundles"),
        (
            '{"task.max_length,train.batch_size": [[64, 4], [128, 2]]}',
            "task_sweep.listops: keys joined by a comma ('task.max_length,train.batch_size') are the old positional "
            "form; write one named bundle per value instead: - {name: NAME, task.max_length: 64, train.batch_size: 4}",
        ),
    ],
)
def test_a_malformed_bundle_is_one_line_naming_it_and_its_file(monkeypatch, tmp_path, sweep, message):
    from harness.grid.sweep import GridError, expand

    path = a_grid_file(monkeypatch, tmp_path, f"tasks: [mqar]\ntask_sweep:\n  listops: {sweep}\n")
    # listops's entry is checked though the grid runs mqar only
    with pytest.raises(GridError, match="^" + re.escape(f"{path}, {message}")) as raised:
        expand({"grid": "mine", "scale": "tiny"})
    assert raised.value.message.startswith(f"{path}, {message}"), raised.value.message
    assert "\n" not in raised.value.message


def test_a_bundle_key_no_config_has_is_caught_before_anything_runs(monkeypatch, tmp_path):
    from harness.grid import sweep

    path = a_grid_file(
        monkeypatch,
        tmp_path,
        """
tasks: [listops]
task_sweep:
  listops:
    - {name: typo, task.max_lenght: 64}
""",
    )
    scale, groups = sweep.expand({"grid": "mine", "scale": "tiny", "mechanisms": "softmax", "seeds": "0"})
    with pytest.raises(sweep.GridError, match=r"^cell override rejected in bundle 'typo'") as raised:
        sweep._check_overrides(scale, groups, str(tmp_path / "results"))
    assert raised.value.message.startswith(
        f"cell override rejected in bundle 'typo' ({path}, task_sweep.listops): Could not override 'task.max_lenght'"
    )
    assert "\n" not in raised.value.message
    # a mistake on the command line is not blamed on the bundle
    scale, groups = sweep.expand(
        {"grid": "mine", "scale": "tiny", "mechanisms": "softmax", "seeds": "0"}, ["modle.depth=2"]
    )
    with pytest.raises(sweep.GridError, match="^cell override rejected: ") as raised:
        sweep._check_overrides(scale, groups, str(tmp_path / "results"))
    assert raised.value.message.startswith("cell override rejected: ") and "bundle" not in raised.value.message
    assert not (tmp_path / "results").exists()


def test_the_dry_run_lists_bundle_names_and_the_launch_puts_costly_groups_first(tmp_path, capsys):
    from harness.grid import sweep

    scale, groups = sweep.expand({"grid": "cpu", "scale": "small", "mechanisms": "softmax", "seeds": "0"})
    assert [g.bundle for g in groups] == ["mqar_1k", "mqar_4k"]
    sweep._check_overrides(scale, groups, str(tmp_path))
    assert groups[1].cost > groups[0].cost > 0  # 4K tokens cost more than 1K
    assert [label for label, _ in sweep.launch_order(groups)] == ["mqar_4k", "mqar_1k"]
    sweep.dry_run(scale, groups, str(tmp_path), 1)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("todo")]
    assert len(lines) == 2 and "small/mqar/softmax/seed0  mqar_1k  360 steps" in lines[0]
    assert "mqar_4k  [task.max_len=4096, task.num_test=250, train.batch_size=4, train.eval_batches=8]" in lines[1]


@pytest.mark.slow
def test_one_launch_keeps_two_workers_busy_across_groups(env):
    """Two groups (listops, mqar), each a short and a long cell, n_jobs=2, all in one launch: the
    second group's first cell starts when the first group's short cell ends, while its long one still
    runs (one multirun per group would leave a worker idle until the long one ended)."""
    results = env[0] / "busy"
    done = harness(
        env,
        "grid",
        "scale=tiny",
        "tasks=listops,mqar",
        "mechanisms=sleepy",
        "seeds=0",
        "n_jobs=2",
        f"results_dir={results}",
        "trainer.progress_bar=false",
        "train.max_steps=2,120",
        "train.eval_every=100",
        "train.eval_batches=1",
        "mechanism.seconds=0.1",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len([x for x in done.stdout.splitlines() if re.match(r"\[\d/4\] ok ", x)]) == 4
    (sweep,) = (results / "sweeps").iterdir()  # one multirun for both groups
    assert len(json.loads((sweep / "cells.json").read_text())) == 4
    spans = {}  # task -> [(start, end)] from the progress file: status, seconds, ran, name, finished at
    for line in (sweep / "progress.tsv").read_text().splitlines():
        status, seconds, ran, name, finished = line.split("\t")
        spans.setdefault(name.split("/")[0], []).append((float(finished) - float(seconds), float(finished)))
    first, second = sorted(spans, key=lambda task: min(start for start, _ in spans[task]))
    assert len(spans[first]) == len(spans[second]) == 2
    assert min(start for start, _ in spans[second]) < max(end for _, end in spans[first]), spans


def test_n_jobs_auto_is_one_cell_per_core_within_memory_and_one_on_a_gpu():
    from harness.grid.sweep import GridError, resolve_n_jobs

    assert resolve_n_jobs("auto", cores=2, memory_gb=24, gpu=False) == 2
    assert resolve_n_jobs("auto", cores=64, memory_gb=32, gpu=False) == 8  # 4 GB per cell
    assert resolve_n_jobs("auto", cores=4, memory_gb=2, gpu=False) == 1  # never 0
    assert resolve_n_jobs("auto", cores=16, memory_gb=128, gpu=True) == 1
    assert resolve_n_jobs("3") == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(GridError, match="a positive integer or auto") as raised:
            resolve_n_jobs(bad)
        assert "a positive integer or auto" in raised.value.message


def test_the_cpu_grid_runs_mqar_at_the_presets_with_per_length_bundles(tmp_path):
    """harness/conf/grid/cpu.yaml: mqar 1K is the `small` preset itself; mqar 4K is its bundle (batch 4,
    250 test sequences) on the same model and warm start; three seeds. ListOps 128 had no accuracy
    signal at this budget and is not in it; `tasks=` adds it back at its preset."""
    from harness.grid.sweep import expand, plan

    scale, groups = expand({"grid": "cpu", "scale": "small", "mechanisms": "softmax"})
    rows = plan(scale, groups, str(tmp_path))
    cells = [row["cell"] for row in rows]
    assert sorted({c.seed for c in cells}) == [0, 1, 2]
    lengths = {(c.task, c.identity["task"]["max_len"]): c for c in cells if c.seed == 0}
    assert sorted(lengths) == [("mqar", 1024), ("mqar", 4096)]
    assert lengths["mqar", 1024].variant == ""  # the preset
    long = lengths["mqar", 4096].identity
    assert long["train"]["batch_size"] == 4 and long["task"]["num_test"] == 250 and long["model"]["short_conv"] == 2
    assert long["train"]["warmup_length"] == 64 == lengths["mqar", 1024].identity["train"]["warmup_length"]
    _, groups = expand({"grid": "cpu", "scale": "small", "mechanisms": "softmax", "tasks": "mqar,listops"})
    listops = [row["cell"] for row in plan(scale, groups, str(tmp_path)) if row["cell"].task == "listops"]
    assert {c.identity["task"]["max_len"] for c in listops} == {128} and len(listops) == 3


def test_a_results_folder_with_spaces_quotes_and_accents_works(env):
    """The grid hands results_dir to Hydra as an override: quoted, a path with a space, a quote and
    a non-ASCII letter is one value (it was a LexerNoViableAltException before any cell ran)."""
    results = env[0] / "my runs" / "é'q"
    done = harness(
        env, "grid", "scale=tiny", "tasks=listops", "mechanisms=softmax", "seeds=0", f"results_dir={results}", *CELL
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records, unreadable = scan_results(results)
    assert not unreadable and [r["status"] for r in records] == ["ok"]
    from harness.grid.sweep import quoted

    assert quoted("a b/é'q\\\\x") == "'a b/é\\'q\\\\\\\\x'"  # a b/é'q\\x -> 'a b/é\'q\\\\x'


def test_a_cells_training_cost_is_estimated_from_its_config():
    """The dry run's steps, tokens and GPU hours (issue 23), against hand-computed values."""
    from harness.grid.sweep import GPU_SUSTAINED_TFLOPS, cell_cost

    plain = {
        "task": {"max_len": 100},
        "model": {"dim": 8, "depth": 2, "mlp_dim": 16},
        "train": {"max_steps": 10, "batch_size": 4},
    }
    cost = cell_cost(plain)
    dense = 6 * 4000 * 2 * (4 * 64 + 2 * 8 * 16)  # 24,576,000
    attention = 12 * 2 * 100**2 * 8 * 10 * 4  # 76,800,000
    assert cost["steps"] == 10 and cost["tokens"] == 4000 and cost["flops"] == dense + attention
    assert cost["gpu_hours"] == pytest.approx((dense + attention) / (GPU_SUSTAINED_TFLOPS * 1e12 * 3600))
    warm = {
        **plain,
        "train": {
            "max_steps": 10,
            "batch_size": 4,
            "warmup_length": 10,
            "warmup_length_steps": 4,
            "warmup_batch_size": 8,
        },
    }
    assert cell_cost(warm)["tokens"] == 6 * 4 * 100 + 4 * 8 * 10 and cell_cost(warm)["steps"] == 10
    assert cell_cost({**plain, "task": {"resolution": 8, "max_len": 1000}})["tokens"] == 10 * 4 * 64


def test_the_smoke_grid_is_two_tasks_by_softmax_and_one_mechanism_per_family(tmp_path):
    """`make smoke` (harness/conf/grid/smoke.yaml at scale=tiny): 14 preset cells, one seed, generated data
    only, a peer plugin among them: minutes on 2 cores, not the default grid's 264 cells."""
    from harness.grid.sweep import expand, plan

    scale, groups = expand({"grid": "smoke", "scale": "tiny"})
    cells = [row["cell"] for row in plan(scale, groups, str(tmp_path))]
    assert scale == "tiny" and len(cells) == 14
    assert sorted({c.task for c in cells}) == ["listops", "mqar"] and {c.seed for c in cells} == {0}
    assert sorted({c.mechanism for c in cells}) == [
        "bigbird",
        "nystrom",
        "nystrom_attention",
        "performer",
        "reformer",
        "s4d",
        "softmax",
    ]
    assert all(c.variant == "" for c in cells)  # the scale's presets
    makefile = (ROOT / "Makefile").read_text()
    assert "-m harness grid grid=smoke scale=tiny " in makefile


def test_an_opt_in_launcher_without_its_package_names_the_extra(monkeypatch, tmp_path):
    """hydra-joblib-launcher is an extra now (launcher=process needs nothing): without it,
    launcher=joblib is one line naming the extra, before any cell runs."""
    from harness.grid.sweep import GridError, expand, launch

    scale, groups = expand({"scale": "tiny", "tasks": "listops", "mechanisms": "softmax", "seeds": "0"})
    for package, extra in (("hydra_joblib_launcher", "joblib"), ("hydra_submitit_launcher", "slurm")):
        monkeypatch.setitem(sys.modules, f"hydra_plugins.{package}", None)  # import fails as if absent
        launcher = "joblib" if extra == "joblib" else "slurm"
        with pytest.raises(GridError, match=re.escape(f"pip install -e '.[{extra}]'")) as raised:
            launch(scale, groups, {"launcher": launcher}, str(tmp_path))
        assert f"pip install -e '.[{extra}]'" in raised.value.message
    assert not (tmp_path / "sweeps").exists()
