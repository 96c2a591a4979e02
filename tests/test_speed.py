"""The speed benchmark: valid records for every mechanism, failures recorded while the sweep
goes on, oom/timeout skipping longer lengths, resume, process isolation, peers at equal settings.
No timing assertions: only that the numbers exist, are consistent and come from where they should."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from harness.bench import speed
from harness.cli import cmd_speed
from harness.core.overrides import UsageError
from harness.core.registry import discover, get_mechanism, list_mechanisms

FAULTY_SPEED = '''
"""Mechanisms that fail on purpose, from a given length on (speed-benchmark tests)."""
import time
from dataclasses import dataclass

from harness.core.attention import Attention
from harness.core.registry import register_mechanism


@dataclass
class FailFromConfig:
    fail_from: int = 32  # sequence length from which the forward pass misbehaves
    sleep_s: float = 0.0


@register_mechanism("speed_raises", FailFromConfig, causal=True)
class SpeedRaises(Attention):
    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if q.shape[-2] >= self.cfg.fail_from:
            raise RuntimeError(f"deliberate failure at L={q.shape[-2]}")
        return v * 1.0


@register_mechanism("speed_oom", FailFromConfig)
class SpeedOutOfMemory(Attention):
    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if q.shape[-2] >= self.cfg.fail_from:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")
        return v * 1.0


@register_mechanism("speed_sleeps", FailFromConfig)
class SpeedSleeps(Attention):
    def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
        if q.shape[-2] >= self.cfg.fail_from:
            time.sleep(self.cfg.sleep_s)
        return v * 1.0
'''

TINY = {
    "lengths": [16, 32],
    "batch_size": 1,
    "heads": 2,
    "dim_head": 8,
    "scale": "tiny",
    "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dropout": 0.0},
    "warmup": 1,
    "min_reps": 2,
    "max_reps": 2,
    "min_time_s": 0.0,
    "threads": 1,
    "progress": False,
    "overhead": False,
    "isolate": False,
    "device": "cpu",
}
RECORD_KEYS = {
    "kind",
    "mechanism",
    "mechanism_config",
    "peer_of",
    "mode",
    "causal",
    "length",
    "batch_size",
    "heads",
    "dim_head",
    "precision",
    "dtype",
    "status",
    "error",
    "params",
    "tokens_per_s",
    "step_time_s",
    "time_s",
    "peak_memory_mb",
    "threads",
    "method",
    "env",
    "settings_key",
    "measured_at",
}


@pytest.fixture(scope="module")
def faulty_plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed_plugins")
    (folder / "faulty_speed.py").write_text(FAULTY_SPEED)
    discover(extra_paths=[folder])
    return folder


def config(tmp_path: Path, **overrides) -> speed.SpeedConfig:
    return speed.SpeedConfig(**{**TINY, "results_dir": str(tmp_path), **overrides})


def by_key(records):
    return {(r["mode"], r["causal"], r["length"], r["mechanism"]): r for r in records}


def built_in_mechanisms():
    """Every mechanism of mechanisms/ and the installed plugins (not test fixtures)."""
    discover()
    return [n for n in list_mechanisms() if not get_mechanism(n).module.startswith("harness_plugin_")]


@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_mechanism_writes_valid_records_at_two_lengths(tmp_path, causal):
    names = built_in_mechanisms()
    threads = torch.get_num_threads()
    records = speed.run_sweep(config(tmp_path, mechanisms=names, causal=[causal]))
    expected = {
        (mode, causal, length, name)
        for mode in speed.MODES
        for length in (16, 32)
        for name in names
        if not causal or get_mechanism(name).capabilities.causal
    }
    assert set(by_key(records)) == expected
    for r in records:
        assert RECORD_KEYS <= set(r), sorted(RECORD_KEYS - set(r))
        assert r["status"] == "ok", (r["mechanism"], r["mode"], r["error"])
        assert r["time_s"]["reps"] == 2 and len(r["time_s"]["times"]) == 2
        assert r["time_s"]["min"] <= r["step_time_s"] <= r["time_s"]["max"]
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["step_time_s"])  # batch 1
        assert r["peak_memory_mb"] >= 0 and r["params"] >= 0 and r["threads"] == 1
        assert r["dtype"] == "float32" and r["env"]["torch"] == torch.__version__ and r["env"]["hardware"]["cpu"]
        assert r["method"]["warmup"] == 1 and "median" in r["method"]["timing"] and r["method"]["memory"]
        path = (
            tmp_path
            / "speed"
            / r["mode"]
            / r["mechanism"]
            / f"{'causal' if r['causal'] else 'noncausal'}-L{r['length']}.json"
        )
        assert json.loads(path.read_text())["settings_key"] == r["settings_key"]
    train = [r for r in records if r["mode"] == "train_step"]
    assert all(r["params"] > 0 for r in train) and all(r["model"]["dim"] == 16 for r in train)
    assert torch.get_num_threads() == threads  # in-process runs leave the caller's thread count alone


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, faulty_plugins):
    cfg = config(
        tmp_path,
        mechanisms=["speed_raises", "softmax", "speed_oom"],
        lengths=[16, 32, 64],
        modes=["attention"],
        causal=[False],
    )
    records = by_key(speed.run_sweep(cfg))
    raises = [records[("attention", False, L, "speed_raises")] for L in (16, 32, 64)]
    assert [r["status"] for r in raises] == ["ok", "failed", "failed"]  # a plain failure does not stop the series
    assert raises[1]["error"] == "RuntimeError: deliberate failure at L=32"
    assert all(records[("attention", False, L, "softmax")]["status"] == "ok" for L in (16, 32, 64))
    oom = [records[("attention", False, L, "speed_oom")] for L in (16, 32, 64)]
    assert [r["status"] for r in oom] == ["ok", "oom", "skipped"]
    assert "can't allocate memory" in oom[1]["error"] and oom[2]["error"] == "skipped: oom at L=32"
    assert oom[2]["tokens_per_s"] is None and oom[2]["peak_memory_mb"] is None


def test_a_measurement_past_its_time_limit_is_a_timeout_and_longer_lengths_are_skipped(tmp_path, faulty_plugins):
    cfg = config(
        tmp_path,
        mechanisms=["speed_sleeps"],
        lengths=[16, 32, 64],
        modes=["attention"],
        causal=[False],
        timeout_s=0.5,
        mechanism_config={"speed_sleeps": {"fail_from": 32, "sleep_s": 0.4}},
    )
    records = by_key(speed.run_sweep(cfg))
    statuses = [records[("attention", False, L, "speed_sleeps")]["status"] for L in (16, 32, 64)]
    assert statuses == ["ok", "timeout", "skipped"]
    assert "timeout_s=0.5" in records[("attention", False, 32, "speed_sleeps")]["error"]
    # a larger limit re-measures the timed-out length (and re-evaluates the skipped one)
    again = by_key(speed.run_sweep(dataclasses.replace(cfg, timeout_s=30.0)))
    assert [again[("attention", False, L, "speed_sleeps")]["status"] for L in (16, 32, 64)] == ["ok", "ok", "ok"]


def test_recorded_measurements_are_kept_unless_settings_change_or_asked(tmp_path):
    cfg = config(tmp_path, mechanisms=["softmax"], lengths=[16], modes=["attention"], causal=[False])
    first = speed.run_sweep(cfg)[0]
    assert speed.run_sweep(cfg)[0]["time_s"] == first["time_s"]  # the record, not a new measurement
    redone = speed.run_sweep(dataclasses.replace(cfg, rerun="all"))[0]
    assert redone["time_s"]["times"] != first["time_s"]["times"]
    bigger = speed.run_sweep(dataclasses.replace(cfg, batch_size=2))[0]
    assert bigger["batch_size"] == 2 and bigger["settings_key"] != first["settings_key"]


def test_a_measurement_runs_in_a_fresh_process(tmp_path):
    cfg = config(tmp_path, mechanisms=["softmax"], lengths=[16], modes=["attention"], causal=[False], isolate=True)
    record = speed.run_sweep(cfg)[0]
    assert record["status"] == "ok", record["error"]
    assert record["pid"] != os.getpid() and "forked process" in record["method"]["isolation"]
    assert record["peak_memory_mb"] > 0 and record["tokens_per_s"] > 0


@pytest.mark.slow
def test_a_hung_measurement_process_is_killed_and_recorded_as_timeout(tmp_path, faulty_plugins):
    cfg = config(
        tmp_path,
        mechanisms=["speed_sleeps", "softmax"],
        lengths=[16, 32],
        modes=["attention"],
        causal=[False],
        isolate=True,
        warmup=0,
        timeout_s=1.0,
        mechanism_config={"speed_sleeps": {"fail_from": 16, "sleep_s": 600}},
    )
    records = by_key(speed.run_sweep(cfg))
    hung = records[("attention", False, 16, "speed_sleeps")]
    assert hung["status"] == "timeout" and "killed after timeout_s=1" in hung["error"]
    assert records[("attention", False, 32, "speed_sleeps")]["status"] == "skipped"
    assert records[("attention", False, 16, "softmax")]["status"] == "ok"  # the mechanism from a plugin file ran
    assert records[("attention", False, 32, "softmax")]["status"] == "ok"


def test_peak_memory_sees_an_allocation():
    memory = speed.PeakMemory("cpu")
    memory.start()
    block = torch.ones(16 * 2**20)  # 64 MB, written
    assert block.sum() > 0
    del block
    assert memory.peak_mb() > 50


def test_peers_run_with_their_counterparts_settings_right_after_them():
    pytest.importorskip("harness_peers")
    overrides = {"performer": {"num_features": 48, "kernel": "relu"}, "nystrom": {"num_landmarks": 8}}
    performer, peer_of = speed.resolve_mechanism_config("performer_pytorch", overrides)
    assert peer_of == "performer" and performer == {"num_features": 48, "kernel": "relu"}
    nystrom, peer_of = speed.resolve_mechanism_config("nystrom_attention", overrides)
    assert peer_of == "nystrom" and nystrom["num_landmarks"] == 8
    order = speed.ordered_mechanisms(
        ["performer_pytorch", "rela", "nystrom_attention", "performer", "softmax", "nystrom"]
    )
    assert order == ["softmax", "nystrom", "nystrom_attention", "performer", "performer_pytorch", "rela"]


def test_command_line_settings_are_typed_and_checked():
    cfg = speed.parse_config(
        [
            "lengths=[256,512]",
            "mechanisms=[softmax,performer]",
            "causal=[false]",
            "mechanism_config.performer.num_features=64",
            "timeout_s=30",
        ]
    )
    assert cfg.lengths == [256, 512] and cfg.mechanisms == ["softmax", "performer"] and cfg.causal == [False]
    assert cfg.mechanism_config == {"performer": {"num_features": 64}} and cfg.timeout_s == 30.0
    assert speed.parse_config(["mechanisms=softmax,rela"]).mechanisms == ["softmax", "rela"]
    with pytest.raises(UsageError, match="unknown key 'lenghts' for speed \\(did you mean 'lengths'\\?\\)"):
        speed.parse_config(["lenghts=[256]"])
    with pytest.raises(UsageError, match="key=value"):
        speed.parse_config(["softmax"])
    with pytest.raises(UsageError, match="'out=' is not a setting: use results_dir="):
        speed.parse_config(["out=results/speed"])
    with pytest.raises(ValueError, match="valid: attention, train_step"):
        speed.plan(speed.SpeedConfig(modes=["inference"], device="cpu"))


@pytest.mark.slow
def test_overhead_measures_both_ratios(tmp_path):
    from harness.bench import overhead

    threads = torch.get_num_threads()
    record = overhead.run_overhead(
        results_dir=str(tmp_path),
        scale="tiny",
        max_steps=12,
        rounds=1,
        progress_bar=False,
        contract_lengths=[32],
        contract_min_run_time=0.05,
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        threads=1,
    )
    assert json.loads((tmp_path / "speed" / "overhead.json").read_text())["kind"] == "overhead"
    training = record["training"]
    assert (
        training["steps"] == 12 and len(training["lightning_tokens_per_s"]) == len(training["bare_tokens_per_s"]) == 1
    )
    assert training["ratio"] == pytest.approx(training["lightning_tokens_per_s"][0] / training["bare_tokens_per_s"][0])
    assert (
        overhead.median_paired_ratio([("a", 2.0), ("b", 1.0), ("b", 4.0), ("a", 4.0), ("a", 9.0), ("b", 3.0)], "a", "b")
        == 2.0
    )
    assert [(r["length"], r["causal"]) for r in record["contract"]] == [(32, False), (32, True)]
    assert all(r["contract_s"] > 0 and r["sdpa_s"] > 0 for r in record["contract"])
    assert torch.get_num_threads() == threads


def test_a_mechanism_and_length_list_measures_only_those(tmp_path):
    cfg = config(tmp_path, mechanisms=["softmax"], lengths=[24], modes=["attention"], causal=[False])
    jobs, _ = speed.plan(cfg)
    assert [(j.mechanism, j.mode, j.causal, j.length) for j in jobs] == [("softmax", "attention", False, 24)]
    records = speed.run_sweep(cfg)
    assert [(r["mechanism"], r["length"]) for r in records] == [("softmax", 24)]
    written = sorted(p.relative_to(tmp_path / "speed").as_posix() for p in (tmp_path / "speed").rglob("*.json"))
    assert written == ["attention/softmax/noncausal-L24.json"]


def test_overhead_runs_only_when_asked(tmp_path, monkeypatch):
    from harness.bench import overhead

    calls = []
    monkeypatch.setattr(speed, "run_sweep", lambda cfg: calls.append(("sweep", cfg.mechanisms)) or [])
    monkeypatch.setattr(overhead, "run_overhead", lambda **kw: calls.append(("overhead", kw["results_dir"])))
    monkeypatch.setattr(overhead, "main", lambda argv: calls.append(("overhead_main", list(argv))) or 0)
    out = str(tmp_path)
    assert speed.parse_config([]).overhead is False
    cmd_speed(["mechanisms=[softmax]", "lengths=[16]", f"results_dir={out}"])
    assert calls == [("sweep", ["softmax"])], "a sweep must not run the overhead study unannounced"
    calls.clear()
    cmd_speed(["mechanisms=[softmax]", "overhead=true", f"results_dir={out}"])
    assert calls == [("sweep", ["softmax"]), ("overhead", out)]
    calls.clear()
    cmd_speed(["overhead", "max_steps=3"])
    assert calls == [("overhead_main", ["max_steps=3"])], "`speed overhead` runs the overhead study alone"


# ---------------------------------------------------------------------------- speed compare=A:B (harness.bench.compare)


def test_compare_pairs_are_parsed_and_malformed_ones_refused():
    from harness.bench import compare

    cfg = compare.parse_config(["compare=local:softmax"])
    assert cfg.compare == [("local", "softmax")]
    assert cfg.lengths == [4096, 16384] and cfg.threads == 1 and cfg.causal == [False] and cfg.rounds >= 2
    listed = compare.parse_config(["compare=[local:local_attention_peer,performer:performer_pytorch]", "rounds=5"])
    assert (
        listed.compare == [("local", "local_attention_peer"), ("performer", "performer_pytorch")] and listed.rounds == 5
    )
    assert compare.parse_pairs("softmax:local,nystrom:nystrom_attention") == [
        ("softmax", "local"),
        ("nystrom", "nystrom_attention"),
    ]
    assert compare.parse_config(["compare=[local: softmax]"]).compare == [
        ("local", "softmax")
    ]  # Hydra's grammar: a string
    for bad in ("compare=local", "compare=a:b:c", "compare=[softmax:]", "compare=[]"):
        with pytest.raises(UsageError, match="A:B|empty"):
            compare.parse_config([bad])
    with pytest.raises(UsageError, match="unknown key 'roundz' .*did you mean 'rounds'"):
        compare.parse_config(["compare=local:softmax", "roundz=3"])


def test_compare_refuses_unknown_names_and_missing_capabilities_in_one_line():
    from harness.bench import compare

    with pytest.raises(
        ValueError, match=r"unknown mechanism 'softmx' \(did you mean 'softmax'\?\); registered mechanisms: .*local"
    ):
        compare.check_pairs([("local", "softmx")], [False])
    with pytest.raises(ValueError, match="'nystrom' has no causal capability"):
        compare.check_pairs([("local", "nystrom")], [False, True])
    compare.check_pairs([("local", "nystrom")], [False])  # non-causal: fine
    with pytest.raises(UsageError, match="unknown mechanism 'nope'") as refused:
        cmd_speed(["compare=softmax:nope", "lengths=[16]"])
    assert "unknown mechanism 'nope'" in str(refused.value) and "\n" not in str(refused.value)


def test_compare_alternates_a_and_b_after_the_warm_up():
    from harness.bench import compare

    assert compare.alternation(3, 2) == [("A", False), ("B", False)] * 2 + [("A", True), ("B", True)] * 3
    assert compare.alternation(1, 0) == [("A", True), ("B", True)]


def test_compare_ratio_arithmetic_on_a_hand_made_sequence():
    from harness.bench import compare

    sequence = [("A", 1.0), ("B", 2.0), ("A", 2.0), ("B", 3.0), ("A", 4.0), ("B", 4.0)]
    assert compare.paired_ratios(sequence) == [2.0, 1.5, 1.0]
    summary = compare.summarize_ratios([2.0, 1.5, 1.0], resamples=500, seed=3)
    assert summary["median"] == 1.5 and summary["min"] == 1.0 and summary["max"] == 2.0 and summary["rounds"] == 3
    low, high = summary["ci95"]
    assert 1.0 <= low <= 1.5 <= high <= 2.0
    assert compare.summarize_ratios([2.0, 1.5, 1.0], resamples=500, seed=3) == summary  # seeded
    assert compare.summarize_ratios([1.25] * 4)["ci95"] == [1.25, 1.25]
    with pytest.raises(ValueError, match="A, B, A, B"):
        compare.paired_ratios([("A", 1.0), ("A", 2.0)])
    with pytest.raises(ValueError, match="A, B, A, B"):
        compare.paired_ratios([("A", 1.0), ("B", 2.0), ("A", 1.0)])


def test_a_tiny_comparison_runs_alternating_in_a_fresh_process(tmp_path):
    from harness.bench import compare

    cfg = compare.CompareConfig(
        compare=[("local", "softmax")],
        lengths=[32],
        rounds=2,
        warmup=1,
        heads=2,
        dim_head=8,
        scale="tiny",
        device="cpu",
        results_dir=str(tmp_path),
        timeout_s=120,
    )
    [record] = compare.run_compare(cfg)
    assert record["status"] == "ok", record["error"]
    assert record["kind"] == "compare" and (record["a"], record["b"], record["length"]) == ("local", "softmax", 32)
    assert record["pid"] != os.getpid() and "fresh forked process" in record["method"]["isolation"]
    assert record["threads"] == 1 and (record["batch_size"], record["heads"], record["dim_head"]) == (1, 2, 8)
    assert [side for side, _ in record["sequence"]] == ["A", "B", "A", "B"]  # warm-up left out
    ratios = [b / a for (_, a), (_, b) in zip(record["sequence"][0::2], record["sequence"][1::2])]
    assert record["ratio"]["median"] == pytest.approx(sum(ratios) / 2)
    assert record["ratio"]["ci95"][0] <= record["ratio"]["median"] <= record["ratio"]["ci95"][1]
    assert record["time_a_s"]["median"] > 0 and record["time_b_s"]["median"] > 0
    assert len(record["load_average"]["before"]) == 3
    path = tmp_path / "speed" / "compare" / "local-vs-softmax" / "noncausal-L32.json"
    assert json.loads(path.read_text())["ratio"] == record["ratio"]
    assert "local" in compare.table([record]) and "B/A median" in compare.table([record])


def test_compare_from_the_command_line_prints_the_table(tmp_path, capsys):
    pytest.importorskip("harness_peers")
    out = tmp_path / "speed"
    code = cmd_speed(
        [
            "compare=[local:local_attention_peer]",
            "lengths=[40]",
            "causal=[true]",
            "rounds=2",
            "warmup=1",
            "heads=2",
            "dim_head=8",
            "scale=tiny",
            "device=cpu",
            "isolate=false",
            f"results_dir={tmp_path}",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "local_attention_peer" in printed and "causal" in printed
    record = json.loads((out / "compare" / "local-vs-local_attention_peer" / "causal-L40.json").read_text())
    assert record["b_peer_of"] == "local" and record["b_config"]["window"] == record["a_config"]["window"]
    assert record["method"]["isolation"] == "in the calling process" and record["ratio"]["rounds"] == 2
