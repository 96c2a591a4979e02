"""The helpers that the cells, the speed benchmark, the grid and the report share, one of each:
an error's last line, peak and total memory, the softmax-first order, length labels and
failure marks, loading ``conf/<group>/<name>.yaml``."""

from pathlib import Path

import pytest
import torch

from harness.bench import speed
from harness.core.labels import FAILURE_MARK, length_label, softmax_first
from harness.core.memory import current_memory_mb, peak_memory_mb, reset_peak_memory, total_memory_mb
from harness.core.results import STATUSES, last_line
from harness.grid import sweep
from harness.report import efficiency
from harness.report import leaderboard as report
from harness.train import run
from harness.train.config import conf_file, load_conf


def test_one_of_each_helper_serves_every_room():
    assert run.last_line is speed.last_line is last_line
    assert run.peak_memory_mb is speed.peak_memory_mb is peak_memory_mb
    assert run.reset_peak_memory is speed.reset_peak_memory is reset_peak_memory
    assert sweep.total_memory_mb is speed.total_memory_mb is total_memory_mb
    assert report.length_label is efficiency.length_label is length_label
    assert report.FAILURE_MARK is efficiency.FAILURE_MARK is FAILURE_MARK
    assert report.softmax_first is efficiency.softmax_first is speed.softmax_first is softmax_first
    for name in ("_last_line", "_peak_memory_mb", "_reset_peak_memory", "checkpoint_dir", "log_dir"):
        assert not hasattr(run, name), name
    assert not hasattr(report, "column_key") and not hasattr(efficiency, "accuracy_speed_plot")


def test_an_errors_last_line():
    assert last_line(ValueError("shape\nmismatch at dim 1")) == "mismatch at dim 1"
    assert last_line(RuntimeError()) == "RuntimeError"


def test_peak_memory_on_the_cpu_sees_an_allocation_after_a_reset():
    method = reset_peak_memory("cpu")
    assert method.startswith("peak RSS")
    before = current_memory_mb("cpu")
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MB, touched
    assert peak_memory_mb("cpu") - before >= 60 or "ru_maxrss" in method
    del block


def test_total_memory_is_the_machines():
    total = total_memory_mb()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:"))
        assert total == pytest.approx(kb / 1024, rel=0.02)
    else:
        assert total > 0


def test_softmax_first_lengths_and_failure_marks():
    rows = ["linear", "softmax [v1]", "bam", "softmax", "linear", "softmax_like"]
    assert softmax_first(rows) == ["softmax", "softmax [v1]", "bam", "linear", "softmax_like"]
    assert [length_label(x) for x in (512, 1024, 4096, 1500, None, float("nan"))] == [
        "512",
        "1K",
        "4K",
        "1500",
        "?",
        "?",
    ]
    assert set(STATUSES) - {"ok", "unsupported"} <= set(FAILURE_MARK)  # every cell failure has its mark
    assert FAILURE_MARK["skipped"] == "– skipped"  # a speed measurement not run past a failure


def test_a_conf_file_is_found_or_the_valid_names_are_listed():
    assert conf_file("scale", "tiny").name == "tiny.yaml" and load_conf("scale", "tiny")["scale"]["name"] == "tiny"
    with pytest.raises(ValueError, match=r"^unknown scale 'huge'; valid: lra, small, tiny$"):
        conf_file("scale", "huge")
    with pytest.raises(ValueError, match=r"^unknown grid '\.\./config'; valid: .*default"):
        conf_file("grid", "../config")  # no way out of the group's folder
    with pytest.raises(ValueError, match="unknown scale 'huge'; valid: lra, small, tiny"):
        speed.scale_settings("huge")
    with pytest.raises(sweep.GridError, match="^unknown grid 'nope'; valid: ") as raised:  # a SystemExit(2)
        sweep.load_grid("nope")
    assert raised.value.message.startswith("unknown grid 'nope'; valid: ")
