"""Registry, discovery, plugins, typed configs, the `list` command."""

import json
import os
import subprocess
import sys

import pytest
from plugin_fixtures import BROKEN, ROOT, readme_mechanism

from harness.core.registry import (
    UnknownNameError,
    create_mechanism,
    describe,
    discover,
    get_mechanism,
    list_mechanisms,
    plugin_errors,
)
from harness.train.config import compose


@pytest.fixture()
def plugin_dir(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "tempered.py").write_text(readme_mechanism())
    (folder / "broken.py").write_text(BROKEN)
    (folder / "_private.py").write_text(BROKEN)  # skipped: starts with _
    discover(extra_paths=[folder])
    return folder


def test_builtin_mechanisms_and_tasks_are_discovered():
    names = list_mechanisms()
    assert "softmax" in names
    info = describe()
    assert "listops" in info["tasks"]
    assert info["tasks"]["listops"]["sources"] == ["generated", "lra"]
    softmax = info["mechanisms"]["softmax"]
    assert softmax["capabilities"] == {"causal": True, "cross": True, "key_padding": True, "relations": False}
    assert softmax["doc"].startswith("Softmax attention")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown mechanism 'sofmax'") as err:
        get_mechanism("sofmax")
    message = str(err.value)
    assert "\n" not in message and "softmax" in message and "unknown mechanism 'sofmax'" in message


def test_drop_in_plugin_registers_typed_config(plugin_dir):
    assert "tempered" in list_mechanisms()
    mech = create_mechanism("tempered", heads=2, dim_head=4, max_len=8, temperature=0.5)
    assert mech.cfg.temperature == 0.5
    with pytest.raises(TypeError, match="no field"):
        create_mechanism("tempered", heads=2, dim_head=4, max_len=8, temprature=0.5)
    cfg = compose(["mechanism=tempered", "mechanism.temperature=0.25"])
    assert cfg.mechanism.temperature == 0.25 and cfg.mechanism.name == "tempered"
    with pytest.raises(Exception, match="temperature"):
        compose(["mechanism=tempered", "mechanism.temperature=warm"])


def test_broken_plugin_is_reported_and_others_still_load(plugin_dir):
    errors = plugin_errors()
    broken = [k for k in errors if k.endswith("broken.py")]
    assert broken and "this_module_does_not_exist_anywhere" in errors[broken[0]]
    assert not any(k.endswith("_private.py") for k in errors)
    assert "tempered" in list_mechanisms() and "softmax" in list_mechanisms()


def test_list_json_cli_shows_plugins_and_errors(plugin_dir):
    env = {**os.environ, "HARNESS_PLUGIN_PATH": str(plugin_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "harness", "list", "json=true"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    ).stdout
    info = json.loads(out)
    assert set(info) == {"mechanisms", "tasks", "errors"}
    assert info["mechanisms"]["tempered"]["config"] == {"temperature": 2.0}
    assert info["mechanisms"]["tempered"]["capabilities"]["causal"] is True
    assert any(k.endswith("broken.py") for k in info["errors"])
    text = subprocess.run(
        [sys.executable, "-m", "harness", "list"], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    ).stdout
    assert "tempered" in text and "broken.py" in text


def test_run_with_unknown_mechanism_fails_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "mechanism=nope"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "softmax" in lines[0] and "'nope'" in lines[0]


def test_every_task_and_scale_composes():
    for task in describe()["tasks"]:
        for scale in ("tiny", "small", "lra"):
            cfg = compose([f"task={task}", f"scale={scale}"])
            assert cfg.scale.name == scale and cfg.task.name == task
    assert compose(["scale=lra"]).task.max_len == 2000  # ListOps' LRA preset
    assert compose(["scale=lra", "task.max_len=512"]).task.max_len == 512  # overrides win


def test_every_built_in_mechanism_names_its_family_and_a_bad_family_is_refused():
    """The speed plots draw a panel per family: every built-in mechanism names one of FAMILIES
    (a peer is drawn in its counterpart's); an unknown family is an error at registration."""
    from harness.core.registry import FAMILIES, get_mechanism, list_mechanisms, register_mechanism

    built_in = [n for n in list_mechanisms() if get_mechanism(n).module.startswith("mechanisms.")]
    assert len(built_in) >= 26
    assert {n: get_mechanism(n).family for n in built_in if get_mechanism(n).family == "other"} == {}
    assert get_mechanism("softmax").family == "full" and get_mechanism("performer").family == "kernel"
    assert get_mechanism("bigbird").family == "sparse" and get_mechanism("nystrom").family == "low_rank"
    assert set(FAMILIES) >= {get_mechanism(n).family for n in built_in}
    with pytest.raises(ValueError, match=r"family='dense' is not one of full, kernel"):
        register_mechanism("nope", dict, family="dense")
