"""The one command-line grammar: every subcommand of ``python -m harness`` as a user types it.

``harness.cli.main([...])`` in-process for most (its return value is the exit status), a few
through ``python -m harness`` and the ``harness`` console script's entry point in a subprocess."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from harness.bench.compare import CompareConfig
from harness.bench.overhead import OverheadConfig
from harness.bench.speed import SpeedConfig
from harness.cli import TOOLS, DataSettings, ListSettings, main
from harness.core.overrides import UsageError, parse, parse_value
from harness.grid.sweep import GridSettings
from harness.report.leaderboard import ReportSettings
from harness.train.evaluate import EvaluateSettings

ROOT = Path(__file__).resolve().parents[1]

# (the command line before the settings, the schema its --help lists)
SUBS = [
    (["list"], ListSettings),
    (["grid"], GridSettings),
    (["evaluate"], EvaluateSettings),
    (["data"], DataSettings),
    (["report"], ReportSettings),
    (["speed"], SpeedConfig),
    (["speed", "overhead"], OverheadConfig),
    (["speed", "compare=softmax:linear"], CompareConfig),
    *[(["tool", name], None) for name in TOOLS],
]


def harness(*args: str, timeout: int = 180, script: bool = False) -> subprocess.CompletedProcess:
    """``python -m harness ARGS``, or (``script=True``) the ``harness`` console script's entry point
    as pyproject.toml declares it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if script:
        target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["harness"]
        module, function = target.split(":")
        command = [
            sys.executable,
            "-c",
            f"import sys; sys.argv[0] = 'harness'; from {module} import {function}; {function}()",
        ]
    else:
        command = [sys.executable, "-m", "harness"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("prefix,schema", SUBS, ids=[" ".join(p) for p, _ in SUBS])
def test_every_sub_has_the_same_help_shape(prefix, schema, capsys):
    assert main([*prefix, "--help"]) == 0
    text = capsys.readouterr().out
    usage, paragraph, keys, *_ = text.split("\n\n")
    words = prefix[:1] + (["compare=A:B"] if prefix[-1].startswith("compare=") else prefix[1:])
    assert usage.startswith(f"usage: python -m harness {' '.join(words)}"), usage
    assert len(paragraph.split()) >= 5 and not paragraph.startswith(("usage", "keys"))
    assert keys.splitlines()[0].startswith("keys (key=value") and keys.splitlines()[1].split() == [
        "key",
        "type",
        "default",
        "description",
    ]
    schema = schema or TOOLS[prefix[1]].load()[0]
    listed = [line.split()[0] for line in keys.splitlines()[2:] if line.startswith("  ") and not line.startswith("   ")]
    assert listed == [f.name for f in dataclasses.fields(schema)]


def test_help_rows_carry_type_default_and_the_field_comment(capsys):
    assert main(["report", "--help"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("force"))
    assert row.split()[:3] == ["force", "bool", "false"] and "fewer cells" in row
    assert main(["tool", "listops-generate", "--help"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("data_dir"))
    assert "(required)" in row


def test_tool_help_lists_the_tools(capsys):
    assert main(["tool", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m harness tool NAME") and all(name in text for name in TOOLS)


def test_run_help_shows_the_cell_options_not_hydras_groups():
    done = harness("run", "--help")
    assert done.returncode == 0, done.stderr
    head = done.stdout.split("== Config")[0]
    assert head.startswith("usage: python -m harness run")
    for option in (
        "task=",
        "mechanism=",
        "scale=",
        "seed=",
        "protocol=",
        "results_dir=",
        "trainer=",
        "logger=",
        "+preset=",
    ):
        assert option in head, option
    assert (
        "python -m harness list" in head and "task_scale" not in done.stdout and "mechanism_protocol" not in done.stdout
    )


# ----------------------------------------------------------------------------- usage errors: exit 2, one line


@pytest.mark.parametrize("prefix,schema", SUBS, ids=[" ".join(p) for p, _ in SUBS])
def test_an_unknown_key_is_exit_2_and_one_line_listing_the_valid_keys(prefix, schema, capsys):
    assert main([*prefix, "lenghts=3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown key 'lenghts'" in line and "valid keys: " in line
    if schema is not None and "lengths" in {f.name for f in dataclasses.fields(schema)}:
        assert "did you mean 'lengths'" in line


TYPOS = [
    ["list", "mechanism=sofmax"],
    ["grid", "scale=tiny", "tasks=listops", "mechanisms=[sofmax]"],
    ["evaluate", "mechanism=sofmax"],
    ["data", "task=listops", "mechanism=sofmax"],
    ["speed", "mechanisms=[softmax,sofmax]"],
    ["speed", "overhead", "mechanism=sofmax"],
    ["speed", "compare=softmax:sofmax"],
]


@pytest.mark.parametrize("argv", TYPOS, ids=[" ".join(a[:2]) for a in TYPOS])
def test_a_typod_mechanism_is_exit_2_and_one_line(argv, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown mechanism 'sofmax'" in line and "softmax" in line.split("'sofmax'", 1)[1]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["report", "force=maybe"], "force=maybe"),
        (["speed", "lengths=[16,long]"], "lengths=[16,long]"),
        (["speed", "modes=[inference]"], "modes='inference' is not one of attention, train_step"),
        (["list", "--json"], "list takes key=value arguments, got '--json'"),
        (["tool", "listops-generate"], "tool listops-generate needs data_dir=..."),
        (["tool", "listops-generat"], "unknown tool 'listops-generat' (did you mean 'listops-generate'?)"),
        (["tool", "pathfinder-generate", "data_dir=x", "difficulty=hardest"], "difficulty='hardest' is not one of"),
        (["tool", "debian-fetch"], "debian-fetch needs packages=[NAME,...]"),
        (["evaluate", "split=train"], "split='train' is not one of test, validation"),
        (
            ["data", "task=listops", "task.max_lenn=3"],
            "unknown key 'task.max_lenn' for data (did you mean 'task.max_len'?)",
        ),
        (["lst"], "unknown command 'lst' (did you mean 'list'?)"),
        (["speed", "scale=huge"], "scale=huge: unknown scale 'huge'; valid: lra, small, tiny"),
        (["speed", "compare=softmax:linear", "scale=huge"], "scale=huge: unknown scale 'huge'"),
        (["speed", "overhead", "scale=huge"], "scale=huge: unknown scale 'huge'"),
    ],
)
def test_bad_values_and_names_are_exit_2_and_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_run_usage_errors_are_exit_2_and_one_line_too(tmp_path):
    for args, message in (
        (["lenghts=3"], "unknown key 'lenghts' for run"),
        (["mechanism=sofmax"], "unknown mechanism 'sofmax'"),
        (["scale=hugee"], "unknown scale 'hugee'"),
    ):
        done = harness("run", f"results_dir={tmp_path}", *args)
        assert done.returncode == 2 and message in one_error_line(done.stderr), done.stderr
    assert not any(tmp_path.iterdir()), "a refused cell leaves no folder behind"


def test_python_m_harness_and_the_console_script_agree():
    for script in (False, True):
        done = harness("speed", "out=x", script=script)
        assert done.returncode == 2 and "use results_dir=" in one_error_line(done.stderr)
        done = harness("list", "task=listops", script=script)
        assert done.returncode == 0 and "tiny:" in done.stdout, done.stderr


# ----------------------------------------------------------------------------- results_dir everywhere, out= refused


@pytest.mark.parametrize("prefix", [["speed"], ["speed", "overhead"], ["speed", "compare=softmax:linear"], ["report"]])
def test_out_is_refused_with_its_hint(prefix, capsys):
    assert main([*prefix, "out=results/speed"]) == 2
    assert "use results_dir=" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "prefix",
    [
        ["speed"],
        ["speed", "overhead"],
        ["speed", "compare=softmax:linear"],
        ["report"],
        ["grid", "scale=tiny", "tasks=listops", "mechanisms=softmax"],
        ["evaluate", "task=listops"],
    ],
)
def test_results_dir_is_the_results_folder_everywhere(prefix, tmp_path, capsys):
    assert main([*prefix, f"results_dir={tmp_path / 'elsewhere'}", "--cfg", "job"]) == 0
    composed = yaml.safe_load(capsys.readouterr().out.split("\n---")[0])
    assert composed["results_dir"] == str(tmp_path / "elsewhere")


def test_speed_records_go_under_results_dir_speed():
    assert str(parse(SpeedConfig, ["results_dir=r"], command="speed").results_dir) == "r"
    from harness.bench.speed import records_dir

    assert records_dir(parse(SpeedConfig, ["results_dir=r"], command="speed")) == Path("r") / "speed"
    assert records_dir(SpeedConfig()) == Path("results") / "speed"  # as the old default out=results/speed


def test_report_writes_into_results_dir(tmp_path, capsys):
    assert main(["report", f"results_dir={tmp_path}"]) == 0
    assert (
        capsys.readouterr().out.strip() == str(tmp_path / "leaderboard.md") and (tmp_path / "leaderboard.md").exists()
    )


# ----------------------------------------------------------------------------- --cfg job


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["list", "task=listops"], {"task": "listops", "mechanism": None, "json": False}),
        (["report", "force=true"], {"results_dir": "results", "force": True}),
        (
            ["speed", "lengths=[16,32]", "mechanisms=[softmax,linear]", "model.dim=24"],
            {"lengths": [16, 32], "mechanisms": ["softmax", "linear"], "model": {"dim": 24}},
        ),
        (["speed", "compare=[softmax:linear]", "rounds=3"], {"compare": ["softmax:linear"], "rounds": 3}),
        (["speed", "overhead", "max_steps=3"], {"max_steps": 3, "mechanism": "softmax"}),
        (["tool", "listops-generate", "data_dir='a b'", "num_train=5"], {"data_dir": "a b", "num_train": 5}),
        (["tool", "debian-fetch", "packages=[manpages,manpages-dev]"], {"packages": ["manpages", "manpages-dev"]}),
        (["evaluate", "split=validation", "task=listops", "model.dim=24"], {"split": "validation", "checkpoint": None}),
    ],
)
def test_cfg_job_prints_the_composed_settings(argv, expected, capsys):
    assert main([*argv, "--cfg", "job"]) == 0
    composed = yaml.safe_load(capsys.readouterr().out.split("\n---")[0].split("\ntask:\n")[0])
    assert {k: composed[k] for k in expected} == expected


def test_cfg_job_of_evaluate_grid_and_data_show_the_cells(capsys):
    assert main(["evaluate", "task=listops", "model.dim=24", "--cfg", "job"]) == 0
    assert "dim: 24" in capsys.readouterr().out
    assert main(["data", "task=listops", "task.max_len=77", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["listops"]["max_len"] == 77
    assert (
        main(["grid", "scale=tiny", "tasks=listops", "mechanisms=[softmax,linear]", "seeds=0,1", "--cfg", "job"]) == 0
    )
    grid = yaml.safe_load(capsys.readouterr().out)
    assert grid["groups"][0]["mechanisms"] == ["softmax", "linear"] and grid["groups"][0]["seeds"] == [0, 1]


def test_values_read_as_hydra_reads_them():
    assert parse_value("[a,b]") == ["a", "b"] and parse_value("a,b") == ["a", "b"]
    assert parse_value("'a b'") == "a b" and parse_value("null") is None and parse_value("3") == 3
    assert parse_value("glob(*former*)") == "glob(*former*)"
    assert parse(SpeedConfig, ["lengths=1024", "causal=false"], command="speed").lengths == [1024]
    with pytest.raises(UsageError, match="cannot read the value"):
        parse_value("[a,")


# ----------------------------------------------------------------------------- list task= / mechanism=


def test_list_task_prints_its_presets_per_scale_and_protocol(capsys):
    assert main(["list", "task=listops"]) == 0
    text = capsys.readouterr().out
    body = yaml.safe_load("\n".join(line for line in text.splitlines() if not line.startswith("#")))
    assert body["scales"]["tiny"]["task"]["max_len"] == 64 and "small" in body["scales"]
    assert "lra" in body["protocols"] and body["config"]["max_depth"] == 10


def test_list_mechanism_prints_its_config_and_protocol_settings(capsys):
    assert main(["list", "mechanism=performer"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("mechanism performer") and "num_features" in text and "protocol settings" in text


# ----------------------------------------------------------------------------- failures: exit 1


FAILING = """
from dataclasses import dataclass

from harness.core.attention import Attention
from harness.core.registry import register_mechanism


@dataclass
class NoConfig:
    pass


@register_mechanism("cli_raises", NoConfig)
class CliRaises(Attention):
    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        raise RuntimeError("deliberate failure")
"""


def test_speed_exits_1_when_a_measurement_failed(tmp_path, capsys):
    from harness.core.registry import discover

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "cli_failing.py").write_text(FAILING)
    discover(extra_paths=[tmp_path / "plugins"])
    common = [
        "lengths=[16]",
        "modes=[attention]",
        "causal=[false]",
        "heads=2",
        "dim_head=8",
        "scale=tiny",
        "device=cpu",
        "isolate=false",
        "progress=false",
        "warmup=0",
        "min_reps=1",
        "max_reps=1",
        "min_time_s=0",
        f"results_dir={tmp_path}",
    ]
    assert main(["speed", "mechanisms=[cli_raises]", *common]) == 1
    assert "(1 failed)" in capsys.readouterr().out
    assert main(["speed", "mechanisms=[softmax]", *common]) == 0
    assert (tmp_path / "speed" / "attention" / "softmax" / "noncausal-L16.json").exists()


def test_tools_run_under_the_one_grammar(tmp_path, capsys):
    assert (
        main(
            [
                "tool",
                "listops-generate",
                f"data_dir={tmp_path}",
                "num_train=4",
                "num_val=2",
                "num_test=2",
                "min_length=5",
                "max_length=40",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    assert "basic_train.tsv: 4 rows" in capsys.readouterr().out
