"""Efficiency tables and plots from a fixture of speed records (made by harness.bench.speed's own
record builder, so the fixture has the real layout) with known scaling laws."""

import json
import logging
import math

import pytest

from harness.bench import speed
from harness.core.results import write_json_atomic
from harness.report import efficiency
from harness.report.leaderboard import write_report

LENGTHS = [256, 512, 1024, 2048, 4096]
ENV = {
    "commit": "abc1234",
    "torch": "2.13.0+cpu",
    "device": "cpu (x86_64, 2 threads)",
    "hardware": {"cpu": "Test CPU", "logical_cores": 2, "memory_gb": 16.0, "torch_threads_default": 2},
}


def job(mechanism, mode, causal, length, peer_of=None):
    return speed.Job(
        mechanism=mechanism,
        mechanism_config={},
        peer_of=peer_of,
        mode=mode,
        causal=causal,
        length=length,
        batch_size=1,
        heads=4,
        dim_head=16,
        model={"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
        optimizer={"lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        precision="32-true",
        device="cpu",
        threads=2,
        warmup=1,
        min_reps=3,
        max_reps=20,
        min_time_s=1.0,
        timeout_s=60.0,
        memory_limit_mb=8192.0,
        seed=0,
    )


def record(
    mechanism,
    length,
    *,
    seconds=None,
    memory=None,
    status="ok",
    error=None,
    mode="train_step",
    causal=False,
    peer_of=None,
    params=1000,
):
    outcome = {"status": status, "error": error, "threads": 2}
    if status == "ok":
        times = [seconds * 0.98, seconds, seconds * 1.03]
        outcome.update(
            time_s={
                "median": seconds,
                "iqr": 0.02 * seconds,
                "min": min(times),
                "max": max(times),
                "reps": 3,
                "times": times,
            },
            step_time_s=seconds,
            tokens_per_s=length / seconds,
            peak_memory_mb=memory,
            params=params,
            memory_method="peak RSS above baseline",
        )
    return speed.make_record(job(mechanism, mode, causal, length, peer_of), outcome, ENV, isolated=True)


def softmax_seconds(length):  # O(L²)
    return 1e-3 * (length / 256) ** 2


@pytest.fixture
def records():
    out = []
    for L in LENGTHS:
        out.append(record("softmax", L, seconds=softmax_seconds(L), memory=(L / 256) ** 2, params=5000))
        # performer: time = softmax's at L0 = 1024·√2, linear in L
        out.append(
            record(
                "performer",
                L,
                seconds=softmax_seconds(1024 * math.sqrt(2)) * L / (1024 * math.sqrt(2)),
                memory=2.0 * L / 256,
                params=5000,
            )
        )
        # the peer: 25% slower, 10% more memory than ours
        out.append(
            record(
                "performer_pytorch",
                L,
                peer_of="performer",
                seconds=1.25 * softmax_seconds(1024 * math.sqrt(2)) * L / (1024 * math.sqrt(2)),
                memory=1.1 * 2.0 * L / 256,
                params=5000,
            )
        )
        # always faster than softmax
        out.append(record("linear", L, seconds=0.5 * softmax_seconds(256) * L / 256, memory=0.5 * L / 256))
    out.append(record("nystrom", 256, seconds=1e-3, memory=1.0))
    out.append(record("nystrom", 512, seconds=2e-3, memory=2.0))
    out.append(record("nystrom", 1024, status="oom", error="RuntimeError: can't allocate memory"))
    out += [record("nystrom", L, status="skipped", error="skipped: oom at L=1024") for L in (2048, 4096)]
    for L, performer in ((256, 2e-3), (512, 5e-3)):  # a causal group with a softmax timeout
        out.append(record("softmax", L, mode="attention", causal=True, seconds=softmax_seconds(L), memory=1.0))
        out.append(record("performer", L, mode="attention", causal=True, seconds=performer, memory=1.0))
    out.append(record("softmax", 1024, mode="attention", causal=True, status="timeout", error="killed after 60s"))
    out.append(record("performer", 1024, mode="attention", causal=True, seconds=4e-3, memory=2.0))
    out.append(
        {
            "kind": "overhead",
            "contract_target": 1.05,
            "training": {
                "task": "listops",
                "scale": "small",
                "mechanism": "softmax",
                "steps": 375,
                "skip": 5,
                "batch_size": 32,
                "lightning_tokens_per_s": [9000.0, 9400.0],
                "bare_tokens_per_s": [10000.0, 10000.0],
                "ratio": 0.92,
                "target": 0.9,
            },
            "contract": [
                {
                    "length": 128,
                    "causal": False,
                    "batch_size": 32,
                    "heads": 4,
                    "dim_head": 16,
                    "contract_s": 1.03e-3,
                    "sdpa_s": 1e-3,
                    "ratio": 1.03,
                    "overhead_us": 30.0,
                },
                {
                    "length": 128,
                    "causal": True,
                    "batch_size": 32,
                    "heads": 4,
                    "dim_head": 16,
                    "contract_s": 1.2e-3,
                    "sdpa_s": 1e-3,
                    "ratio": 1.2,
                    "overhead_us": 200.0,
                },
            ],
        }
    )
    return out


def table_rows(markdown: str, title: str, caption: str) -> dict[str, list[str]]:
    """mechanism -> cells of the table under ``### title`` / ``caption``."""
    section = markdown[markdown.index(f"### {title}") :]
    table = section[section.index(caption) :].split("\n\n")[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_speed_and_memory_relative_to_softmax_with_crossover(records):
    text = efficiency.efficiency_markdown(records, params={"softmax": 12345})
    title = "Training step (forward + backward + AdamW, whole model), non-causal"
    speed_rows = table_rows(text, title, "Speed relative to softmax")
    assert speed_rows["softmax"] == ["1.00"] * 5 + ["–"]
    expected = [
        softmax_seconds(L) / (softmax_seconds(1024 * math.sqrt(2)) * L / (1024 * math.sqrt(2))) for L in LENGTHS
    ]
    assert speed_rows["performer"][:5] == [f"{x:.2f}" for x in expected]
    assert speed_rows["performer"][5] == "≈ 1.4K"  # 1024·√2 = 1448 (log-log interpolation of a power law)
    assert speed_rows["linear"][5] == "≤ 256"
    assert speed_rows["nystrom"][:5] == ["1.00", "2.00", "✗ oom", "– skipped", "– skipped"]
    assert speed_rows["nystrom"][5] == "≈ 256 (✗ from 1K)"
    memory_rows = table_rows(text, title, "Peak memory relative to softmax")
    assert memory_rows["performer"] == [f"{2 * (L / 256) / (L / 256) ** 2:.2f}" for L in LENGTHS]
    absolute = table_rows(text, title, "Absolute: tokens/s · peak MB")
    assert absolute["softmax"][0] == "256k · 1"  # 256 tokens in 1 ms, 1 MB
    causal = table_rows(text, "Attention layer (mechanism forward + backward), causal", "Speed relative to softmax")
    assert causal["softmax"][2] == "✗ timeout"
    assert causal["performer"][2] == "faster (softmax ✗ timeout)" and causal["performer"][3] == "512–1K"


def test_peers_parameters_overhead_and_method_are_reported(records):
    text = efficiency.efficiency_markdown(records, params={"softmax": 12345})
    peers = text[text.index("### Ours vs peer implementations") :]
    row = next(line for line in peers.splitlines() if line.startswith("| performer / performer_pytorch"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "train_step" and cells[2:] == ["1.25 · 0.91"] * 5
    params = table_rows(text, "Parameters", "### Parameters")
    assert params["softmax"][0] == "12,345" and params["softmax"][1] == "5,000"
    assert "**0.920** of the bare loop's throughput (target ≥ 0.90 ✓)" in text
    contract = [line for line in text.splitlines() if line.startswith("|") and "non-causal" in line and "1.030" in line]
    assert contract and contract[0].rstrip("|").strip().endswith("✓")
    assert any("1.200" in line and line.rstrip("|").strip().endswith("✗") for line in text.splitlines())
    assert "Test CPU (2 logical cores)" in text and "torch 2.13.0+cpu" in text and "float32" in text


def test_crossover_length_cases():
    assert efficiency.crossover_length({256: 0.5, 512: 2.0}) == "≈ 362"  # √(256·512), symmetric log ratios
    assert efficiency.crossover_length({256: 1.5, 512: 2.0}) == "≤ 256"
    assert efficiency.crossover_length({256: 0.5, 512: 0.9}) == "> 512"
    assert efficiency.crossover_length({256: 2.0, 512: 0.5, 1024: 3.0}) != "≤ 256"  # must stay faster
    assert efficiency.crossover_length({}) == "–"


def test_plots_render_from_records(records, tmp_path):
    paths = efficiency.write_plots(records, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == [
        "memory_vs_length.png",
        "memory_vs_length_causal.png",
        "throughput_vs_length.png",
        "throughput_vs_length_causal.png",
    ]  # accuracy: the leaderboard's plot
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_records_are_read_back_and_a_broken_file_is_named(records, tmp_path, caplog):
    folder = tmp_path / "speed"
    for i, r in enumerate(records):
        write_json_atomic(folder / f"r{i}.json", r)
    (folder / "broken.json").write_text('{"kind": "speed", ')
    with caplog.at_level(logging.WARNING):
        loaded = efficiency.load_records(folder)
    assert len(loaded) == len(records)
    assert "broken.json" in caplog.text
    assert efficiency.load_records(tmp_path / "missing") == []


@pytest.mark.slow
def test_the_report_shows_the_efficiency_section(records, tmp_path):
    for i, r in enumerate(records):
        write_json_atomic(tmp_path / "speed" / f"r{i}.json", r)
    text = write_report(tmp_path).read_text()
    assert "## Efficiency" in text and "### Ours vs peer implementations" in text and "### Harness overhead" in text
    assert (tmp_path / "plots" / "throughput_vs_length.png").exists()
    assert json.loads((tmp_path / "speed" / "r0.json").read_text())["kind"] == "speed"
