"""harness.report.load_frame: the documented way to read results into pandas (cells and speed),
validating records as the report does; the record schema's version, its settings stored once,
and version-1 records (settings stored twice) read as they were reported."""

import json
import logging

import pandas as pd
import pytest
from test_efficiency import record as speed_record
from test_report import record, write

from harness.core.results import SCHEMA_VERSION, load_result, record_problem, upgrade_record, write_json_atomic
from harness.report import leaderboard as report
from harness.report.frames import load_frame


def test_cells_load_into_one_row_per_record_and_bad_ones_are_left_out_and_named(tmp_path, caplog):
    for seed, acc in ((0, 0.8), (1, 0.7)):
        write(tmp_path, record(mechanism="softmax", seed=seed, accuracy=acc))
    write(tmp_path, {**record(mechanism="linear", accuracy=0.6), "schema_version": SCHEMA_VERSION + 1})
    with caplog.at_level(logging.WARNING, logger="harness.core.results"):
        frame = load_frame(tmp_path)
    assert sorted(frame.seed) == [0, 1] and set(frame.mechanism) == {"softmax"}
    assert frame.set_index("seed").test.to_dict() == {0: 0.8, 1: 0.7}
    assert {"scale", "task", "length", "status", "metric", "tokens_per_s", "commit"} <= set(frame.columns)
    assert "linear" in caplog.text and f"schema_version {SCHEMA_VERSION + 1}" in caplog.text


def test_speed_records_load_and_an_unknown_kind_is_one_clear_error(tmp_path):
    write_json_atomic(tmp_path / "speed" / "a.json", speed_record("softmax", 1024, seconds=0.01, memory=5.0))
    write_json_atomic(tmp_path / "speed" / "b.json", speed_record("linear", 1024, status="oom"))
    frame = load_frame(tmp_path, kind="speed")
    assert frame.set_index("mechanism").status.to_dict() == {"softmax": "ok", "linear": "oom"}
    assert frame.set_index("mechanism").tokens_per_s["softmax"] == pytest.approx(1024 / 0.01)
    with pytest.raises(ValueError, match="kind='cell' is not one of cells, speed"):
        load_frame(tmp_path, kind="cell")


def test_the_schema_version_is_checked():
    assert record_problem({**record(), "schema_version": SCHEMA_VERSION}) is None
    assert record_problem(record()) is None  # written before the key existed: the same layout
    assert "schema_version 'one'" in record_problem({**record(), "schema_version": "one"})
    assert record_problem({**record(), "schema_version": SCHEMA_VERSION + 1}) == (
        f"schema_version {SCHEMA_VERSION + 1}: this harness reads records of version 1 up to version "
        f"{SCHEMA_VERSION} (a newer harness wrote it?)"
    )
    assert "up to version" in record_problem({**record(), "schema_version": 0})


# A version-1 record as harness/train/run.py wrote it before the schema stored the settings once:
# the cell's identity in ``config`` and again as task_config/mechanism_config/model_config/
# train_config (the whole train section, time_limit_s included) and protocol.
V1_RECORD = """{
  "schema_version": 1, "task": "listops", "mechanism": "performer",
  "mechanism_config": {"num_features": 2, "kernel": "softmax"},
  "scale": "lra", "seed": 0, "status": "ok", "error": null,
  "metrics": {"val": {"accuracy": 0.37, "loss": 1.7}, "test": {"accuracy": 0.36, "loss": 1.8}},
  "params": 19000000, "tokens_per_s": 5000.0, "peak_memory_mb": 900.0, "wall_s": 600.0, "process_wall_s": 640.0,
  "data": {"source": "lra", "fingerprint": "fp", "majority_accuracy": 0.17,
           "sizes": {"train": 96000, "validation": 2000, "test": 2000}, "length_max": 1999},
  "env": {"commit": "abc1234", "torch": "2.13.0+cpu", "device": "cpu (test, 2 threads)"},
  "task_config": {"source": "lra", "data_dir": "/data/listops", "max_len": 2000},
  "model_config": {"dim": 512, "depth": 6, "heads": 8, "mlp_dim": 2048},
  "train_config": {"max_steps": 5000, "batch_size": 32, "lr": 0.05, "time_limit_s": 0},
  "mechanism_metrics": {}, "steps": 5000, "best_step": 4000,
  "variant": "", "variant_label": "", "protocol": "lra", "config_hash": "0123456789",
  "config": {"scale": "lra",
             "task": {"source": "lra", "data_dir": "/data/listops", "max_len": 2000, "name": "listops"},
             "mechanism": {"num_features": 2, "kernel": "softmax", "name": "performer"},
             "model": {"dim": 512, "depth": 6, "heads": 8, "mlp_dim": 2048},
             "train": {"max_steps": 5000, "batch_size": 32, "lr": 0.05},
             "trainer": {"precision": "32-true", "accumulate_grad_batches": 1}, "protocol": "lra"},
  "resumed_from_step": null, "warnings": [], "test_items": {}, "val_curve": [], "softmax_equivalent": false
}"""
V1_COPIES = ("task_config", "mechanism_config", "model_config", "train_config", "protocol")


def v1_as_v2(v1: dict) -> dict:
    """What today's harness writes for the same cell."""
    return {**{k: v for k, v in v1.items() if k not in V1_COPIES}, "schema_version": SCHEMA_VERSION}


def test_a_version_1_record_loads_upgraded_and_reports_the_same(tmp_path):
    v1 = json.loads(V1_RECORD)
    (tmp_path / "v1").mkdir()
    path = tmp_path / "v1" / "seed0.json"
    path.write_text(V1_RECORD)
    loaded = load_result(path)
    assert loaded["schema_version"] == SCHEMA_VERSION == 2 and loaded == v1_as_v2(v1)
    assert upgrade_record(v1) == v1_as_v2(v1) and v1["schema_version"] == 1  # the argument is left as it was
    assert upgrade_record(loaded) is loaded  # today's layout: nothing to do
    # the same row, length and protocol (the published rows sit beside it) as before the upgrade
    old, new = report.cells_frame([v1]), report.cells_frame([loaded])
    assert new.length.tolist() == [2000] and new.protocol.tolist() == ["lra"]
    pd.testing.assert_frame_equal(old.drop(columns=["length", "protocol"]), new.drop(columns=["length", "protocol"]))


def test_a_version_1_record_from_before_the_config_was_recorded_gets_one_from_its_copies():
    v1 = json.loads(V1_RECORD)
    del v1["config"], v1["config_hash"]
    upgraded = upgrade_record(v1)
    assert record_problem(v1) is None and record_problem(upgraded) is None
    assert upgraded["config"] == {
        "scale": "lra",
        "task": {"name": "listops", **v1["task_config"]},
        "mechanism": {"name": "performer", **v1["mechanism_config"]},
        "model": v1["model_config"],
        "train": v1["train_config"],
        "protocol": "lra",
    }
    assert not set(V1_COPIES) & set(upgraded)


def test_the_settings_are_stored_once():
    """json_normalize of a record: one column per setting (the version-1 layout had each twice)."""
    v1 = json.loads(V1_RECORD)
    v2 = v1_as_v2(v1)
    columns = list(pd.json_normalize([v2]).columns)
    # config is the cell's identity, so it names the scale, task and mechanism as the record does
    names = ("config.scale", "config.task.name", "config.mechanism.name")
    settings = [c for c in columns if c.startswith("config.") and c not in names]
    assert "config.task.max_len" in settings and "config.mechanism.num_features" in settings
    for setting in settings:  # no other column holds the same setting
        key = setting.rsplit(".", 1)[1]
        assert [c for c in columns if c.rsplit(".", 1)[-1] == key and c.split(".")[0] != "data"] == [setting], setting
    assert not [c for c in columns if c.split(".")[0] in V1_COPIES]
    assert (
        len(pd.json_normalize([v1]).columns) - len(columns) == 14
    )  # the copies: 3 task + 2 mechanism + 4 + 4 + protocol


def test_the_version_2_shape_is_validated():
    v2 = v1_as_v2(json.loads(V1_RECORD))
    assert record_problem(v2) is None
    assert record_problem({**v2, "task_config": {"max_len": 2000}}) == (
        "task_config: settings outside config in a version-2 record (they live in config.task, config.mechanism, ...)"
    )
    assert record_problem({k: v for k, v in v2.items() if k != "config"}) == (
        "config is null, not the cell's settings (an object)"
    )
    assert record_problem({**v2, "config": {**v2["config"], "model": [512]}}) == "config.model is [512], not an object"
    wrong = {**v2, "config": {**v2["config"], "task": {"name": "text"}}}
    assert record_problem(wrong) == "config.task.name is 'text' but the record's task is 'listops'"
    assert record_problem({**json.loads(V1_RECORD), "task_config": 7}) == "task_config is 7, not an object"


def test_load_frame_has_a_column_per_setting(tmp_path):
    write(tmp_path, record(mechanism="softmax", max_len=128))
    runs = tmp_path / "runs" / "lra" / "listops" / "performer"
    runs.mkdir(parents=True)
    (runs / "seed0.json").write_text(V1_RECORD)  # a version-1 record beside it reads the same way
    frame = load_frame(tmp_path).set_index("mechanism")
    assert frame.loc["softmax", "config.task.max_len"] == 128 and frame.loc["performer", "config.task.max_len"] == 2000
    assert frame.loc["performer", "config.mechanism.num_features"] == 2
    assert pd.isna(frame.loc["softmax", "config.mechanism.num_features"])  # another mechanism's setting
    assert frame.loc["performer", "config.protocol"] == "lra" and frame.loc["performer", "length"] == 2000
    assert not [c for c in frame.columns if c.split(".")[0] in V1_COPIES[:-1]]  # protocol: the report's column
