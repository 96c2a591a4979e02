"""harness.report.load_frame: the documented way to read results into pandas (cells and speed),
validating records as the report does; the record schema's version."""

import logging

import pytest
from test_efficiency import record as speed_record
from test_report import record, write

from harness.core.results import SCHEMA_VERSION, record_problem, write_json_atomic
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
    assert "up to version" in record_problem({**record(), "schema_version": SCHEMA_VERSION + 1})
