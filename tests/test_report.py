"""The leaderboard from synthetic result records: intervals, the bold rule, the recommendation,
the length axis on a tiny grid, variants kept apart, and unreadable result files."""

import math

import datasets
import numpy as np
import pandas as pd
import pytest

from harness.core.overrides import UsageError
from harness.core.results import result_path, write_json_atomic
from harness.report import leaderboard as report


def record(
    task="listops",
    mechanism="softmax",
    *,
    seed=0,
    accuracy=0.5,
    status="ok",
    scale="small",
    max_len=128,
    variant="",
    label="",
    n_test=1000,
    majority=0.5,
    tokens_per_s=1000.0,
    memory=100.0,
    params=1000,
    fingerprint="fp",
    cache_path="",
    error=None,
    bits=None,
    wall_s=60.0,
):
    test = {"bits_per_token": bits, "loss": 1.0} if bits is not None else {"accuracy": accuracy, "loss": 1.0}
    return {
        "schema_version": 2,
        "task": task,
        "mechanism": mechanism,
        "scale": scale,
        "seed": seed,
        "status": status,
        "error": error,
        "metrics": {"val": test, "test": test} if status == "ok" else {},
        "params": params,
        "tokens_per_s": tokens_per_s,
        "peak_memory_mb": memory,
        "wall_s": wall_s,
        "data": {
            "source": "generated",
            "fingerprint": fingerprint,
            "majority_accuracy": majority,
            "sizes": {"train": 100, "validation": 50, "test": n_test},
            "length_mean": max_len / 2,
            "length_max": max_len - 1,
            "num_classes": 2,
            "cache_path": cache_path,
        },
        "env": {"commit": "abc1234", "torch": "2.13.0+cpu", "device": "cpu (test, 2 threads)"},
        "config": {"scale": scale, "task": {"name": task, "max_len": max_len}, "mechanism": {"name": mechanism}},
        "variant": variant,
        "variant_label": label,
        "config_hash": variant or "h0",
    }


def write(tmp_path, r):
    write_json_atomic(result_path(tmp_path, r["scale"], r["task"], r["mechanism"], r["seed"], r["variant"]), r)


def stats_of(records, tmp_path):
    cells = report.cells_frame(records)
    baselines = report.column_baselines(cells, tmp_path / "baselines")
    return report.group_stats(cells, baselines), baselines


def test_wilson_interval_and_the_test_size_flag():
    lo, hi = report.wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = report.wilson(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert report.worst_half_width(1000) == pytest.approx(3.1, abs=0.05)
    cells = report.cells_frame([record(n_test=500, fingerprint="a"), record(task="text", n_test=2000, fingerprint="b")])
    table = report.tasks_table(cells)
    small = next(line for line in table.splitlines() if line.startswith("| listops"))
    large = next(line for line in table.splitlines() if line.startswith("| text"))
    assert "too small for ±3 points" in small and "±4.4" in small
    assert "too small" not in large and "±2.2" in large


def test_bold_only_beyond_the_baseline_and_within_the_best(tmp_path):
    records = [
        record(mechanism="softmax", accuracy=0.80),
        record(mechanism="nystrom", accuracy=0.79),
        record(mechanism="performer", accuracy=0.70),
        record(mechanism="linear", accuracy=0.52),
    ]
    stats, _ = stats_of(records, tmp_path)
    by = stats.set_index("row")
    assert by.loc["softmax"].bold and by.loc["nystrom"].bold  # 0.79 lies in softmax's interval [0.774, 0.824]
    assert not by.loc["performer"].bold and by.loc["performer"].beats_baseline
    assert not by.loc["linear"].bold and not by.loc["linear"].beats_baseline  # 0.52: lower bound 0.489 < 0.5
    assert report.cell_text(by.loc["linear"].rename("linear")).endswith("◦")


def test_cells_that_only_tie_the_majority_are_never_bold(tmp_path):
    records = [record(task="pathfinder", mechanism=m, accuracy=0.5, n_test=256) for m in ("softmax", "performer")]
    stats, _ = stats_of(records, tmp_path)
    assert not stats.bold.any() and not stats.beats_baseline.any()


def test_lm_bits_use_the_baseline_interval_and_lower_is_better(tmp_path):
    records = [
        record(task="protein_lm", mechanism="softmax", bits=3.9),
        record(task="protein_lm", mechanism="performer", bits=4.3),
    ]
    for r in records:
        r["data"]["unigram_bits_per_token"] = 4.2
        r["data"]["majority_accuracy"] = None
    cells = report.cells_frame(records)
    baselines = report.column_baselines(cells, tmp_path / "b")
    key = ("protein_lm", 128)
    baselines[key]["baselines"][0]["half_width"] = 0.05  # as the n-gram baseline measures it
    stats = report.group_stats(cells, baselines).set_index("row")
    assert stats.loc["softmax"].bold and stats.loc["softmax"].hi == pytest.approx(3.95)
    assert not stats.loc["performer"].bold and not stats.loc["performer"].beats_baseline


def test_recommendation_keeps_the_best_interval_ordered_by_throughput(tmp_path):
    records = [
        record(mechanism="softmax", accuracy=0.80, tokens_per_s=1000, max_len=1024),
        record(mechanism="nystrom", accuracy=0.79, tokens_per_s=5000, max_len=1024),
        record(mechanism="slow", accuracy=0.785, tokens_per_s=500, max_len=1024),
        record(mechanism="performer", accuracy=0.70, tokens_per_s=9000, max_len=1024),
    ]
    stats, baselines = stats_of(records, tmp_path)
    table = report.recommendation_table(stats, baselines)
    lines = [line for line in table.splitlines()[2:]]
    names = [[c.strip() for c in line.strip("|").split("|")][3] for line in lines]
    assert names == ["nystrom", "softmax", "slow"]  # performer is outside softmax's interval
    pareto = {[c.strip() for c in line.strip("|").split("|")][3]: "✓" in line for line in lines}
    assert pareto == {"nystrom": True, "softmax": True, "slow": False}
    assert "513–1K" in lines[0]


def test_variants_are_kept_apart_and_seeds_average_within_one_config(tmp_path):
    records = [
        record(mechanism="performer", seed=0, accuracy=0.70),
        record(mechanism="performer", seed=1, accuracy=0.74),
        record(mechanism="performer", variant="a1b2c3", label="mechanism.num_features=128", accuracy=0.60),
    ]
    stats, baselines = stats_of(records, tmp_path)
    by = stats.set_index("row")
    assert by.loc["performer"]["mean"] == pytest.approx(0.72) and by.loc["performer"].n_ok == 2
    assert by.loc["performer [mechanism.num_features=128]"]["mean"] == pytest.approx(0.60)
    table, _ = report.accuracy_table(stats, baselines)
    assert "72.0 ± 2.8" in table and "| performer [mechanism.num_features=128]" in table


def test_parameters_flagged_over_ten_percent_of_softmax(tmp_path):
    records = [
        record(mechanism="softmax", params=1000),
        record(mechanism="poly", params=1200),
        record(mechanism="nystrom", params=1050),
    ]
    stats, _ = stats_of(records, tmp_path)
    table = report.params_table(stats)
    assert "1,200 (+20% ⚠)" in table and "1,050 (+5%)" in table


def tiny_text_cache(path):
    rng = np.random.default_rng(0)

    def split(n):
        labels = [i % 2 for i in range(n)]
        ids = [(rng.integers(10, 40, size=12).tolist() + ([7] if y else [8])) for y in labels]
        return datasets.Dataset.from_dict({"input_ids": ids, "label": labels})

    datasets.DatasetDict({"train": split(60), "validation": split(20), "test": split(40)}).save_to_disk(
        str(path / "data")
    )
    return str(path)


def test_length_sweep_on_a_tiny_grid_and_unreadable_files(tmp_path):
    """A tiny grid: listops at two lengths (the longer a variant), a timeout where softmax stops,
    text with baselines computed from its cached splits, and four broken result files."""
    cache = tiny_text_cache(tmp_path / "cache")
    long = dict(max_len=1024, variant="f00d", label="task.max_len=1024, task.max_length=1024", fingerprint="long")
    records = [
        record(mechanism="softmax", accuracy=0.60),
        record(mechanism="performer", accuracy=0.55),
        record(mechanism="softmax", status="timeout", error="CellTimeout: 900 s", **long),
        record(mechanism="performer", accuracy=0.58, **long),
        record(task="text", mechanism="softmax", accuracy=0.9, n_test=40, fingerprint="text1", cache_path=cache),
    ]
    for r in records:
        write(tmp_path, r)
    runs = tmp_path / "runs" / "small" / "listops"
    (runs / "broken").mkdir(parents=True)
    (runs / "broken" / "seed0.json").write_text('{"task": "listops", "mech')  # truncated
    (runs / "broken" / "seed1.json").write_text("")  # empty
    (runs / "broken" / "seed2.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # binary
    (runs / "broken" / "seed3.json").write_text('{"hello": 1}')  # no schema
    text = report.write_report(tmp_path).read_text()
    accuracy = text[text.index("## Accuracy — scale `small`") : text.index("### Accuracy against")]
    assert "listops L=128" in accuracy and "listops L=1K" in accuracy and "text L=128" in accuracy
    performer = next(line for line in accuracy.splitlines() if line.startswith("| performer"))
    assert "55.0" in performer and "58.0" in performer  # one row, a column per length
    softmax = next(line for line in accuracy.splitlines() if line.startswith("| softmax"))
    assert "✗ timeout" in softmax
    assert "| baseline: bag-of-n-grams LR" in accuracy  # computed from the text cell's own splits
    from harness.report.baselines import VERSION

    assert (tmp_path / "baselines" / f"text-text1-v{VERSION}.json").exists()
    assert (tmp_path / "plots" / "accuracy_vs_length_small.png").stat().st_size > 5000
    details = text[text.index("## Run details") :]
    assert details.count("✗ unreadable") == 4 and "unreadable result files: 4" in details
    for name in ("seed0.json", "seed1.json", "seed2.json", "seed3.json"):
        assert f"runs/small/listops/broken/{name}" in details
    assert "[curves](logs/small/listops/softmax/f00d/seed0/curves/metrics.csv)" in details
    assert "the other cells: 4 ok" in details
    assert "performer" not in details  # ok cells are only counted
    assert "**total wall time**: 0.08 h" in text  # 5 cells x 60 s
    from harness.core.results import code_commit

    assert f"by `python -m harness report` at commit {code_commit()[0]}" in text  # the renderer's commit too
    assert "**commit(s)**: abc1234" in text  # and the cells' own
    assert "measured `make benchmark" not in text  # no clock of a make run: no line
    (tmp_path / "runs" / "make_benchmark.json").write_text(
        '{"started": 1000, "finished": 8200, "grid_status": 0, "command": "make benchmark GRID=cpu SCALE=auto"}'
    )
    text = report.write_report(tmp_path).read_text()
    assert "- **measured `make benchmark GRID=cpu SCALE=auto`**: 2.00 h start to end" in text
    assert "Tay et al. 2021" in text
    transformer = next(line for line in text.splitlines() if line.startswith("| Transformer "))
    assert [c.strip() for c in transformer.strip("|").split("|")] == [
        "Transformer",
        "published",
        "36.37",
        "64.27",
        "57.46",
        "42.44",
        "71.40",
        "54.39",
    ]
    skyformer = next(line for line in text.splitlines() if line.startswith("| Skyformer "))
    cells = [c.strip() for c in skyformer.strip("|").split("|")]
    assert cells[2:] == ["38.69", "64.70", "82.06", "40.77", "70.73", "59.39"] and cells[1] == "published [1]"
    assert "### The PyTorch re-implementations' protocol (`protocol=pytorch`)" in text and "re-implementation" in text
    assert "[1] Chen et al. 2021" in text


def test_report_main_survives_an_empty_folder(tmp_path, capsys):
    assert report.main([f"results_dir={tmp_path}"]) == 0
    text = (tmp_path / "leaderboard.md").read_text()
    assert "_No results yet" in text and "## Run details" in text
    with pytest.raises(UsageError, match="unknown key 'results' for report \\(did you mean 'results_dir'\\?\\)"):
        report.main(["results=x"])


def test_sequence_length_and_variant_labels():
    assert report.sequence_length({"config": {"task": {"max_len": 4096, "max_length": 1024}}}) == 1024
    assert report.sequence_length({"config": {"task": {}}, "data": {"length_max": 300}}) == 300
    assert report.other_differences("task.max_len=1024, mechanism.num_features=128") == "mechanism.num_features=128"
    assert report.band_of(1000) == "513–1K" and report.band_of(2000) == "1K–2K" and report.band_of(128) == "≤ 256"
    assert math.isnan(report.wilson(0.5, 0)[0])
    assert isinstance(report.cells_frame([]), pd.DataFrame)


def test_the_length_plot_legend_fits_the_figure_with_many_series(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = [
        record(mechanism=f"mech{i:02d}", accuracy=0.5 + i / 100, max_len=length, fingerprint=f"f{length}")
        for i in range(33)
        for length in (128, 1024)
    ]
    stats, baselines = stats_of(records, tmp_path)
    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k))[1]
    )
    report.accuracy_length_plot(stats, baselines, tmp_path / "plot.png", "small")
    fig = saved[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert len(fig.legends[0].get_texts()) == 34  # 33 series and the strongest baseline
    assert legend.y0 >= 0 and legend.y1 <= fig.bbox.height and legend.x1 <= fig.bbox.width  # nothing cut off
    for ax in fig.axes:  # and never over the data
        assert ax.get_window_extent(renderer).x1 <= legend.x0


def test_long_variant_labels_get_short_ids_and_a_key(tmp_path):
    grid = "model.depth=1, model.dim=32, model.heads=2, train.batch_size=8, train.max_steps=120"
    records = [
        record(mechanism="softmax", variant="a1", label=grid + ", task.max_len=1024", max_len=1024),
        record(mechanism="linear", variant="b2", label=grid + ", task.max_len=1024", max_len=1024),
        record(mechanism="linear", variant="c3", label=grid + ", task.max_len=128"),
        record(mechanism="performer", variant="d4", label="mechanism.num_features=16"),
    ]
    cells = report.cells_frame(records)
    # L=128 holds two configs: rows keep their variant; L=1024 holds one: plain rows, the id in the title
    assert sorted(set(cells.row)) == ["linear", "linear [v1]", "performer [mechanism.num_features=16]", "softmax"]
    assert report.variant_key(cells) == f"Variants: **v1** = `{grid}`"  # lengths are columns, not part of the id
    for r in records:
        write(tmp_path, r)
    text = report.write_report(tmp_path).read_text()
    assert f"Variants: **v1** = `{grid}`" in text and "| linear [v1]" in text and "listops L=1K [v1]" in text


def test_a_column_whose_cells_share_one_config_names_it_once_and_a_mechanism_keeps_one_row(tmp_path):
    """The CPU grid's shape: presets at one length, a smaller model at another. Each mechanism
    is one row across both columns, so it gets an average; the config is in the column title."""
    small = "model.dim=32, train.max_steps=120"
    records = [record(mechanism=m, accuracy=a, n_test=1000) for m, a in (("softmax", 0.40), ("linear", 0.30))]
    records += [
        record(
            mechanism=m,
            variant=v,
            label=small + ", task.max_len=1024",
            max_len=1024,
            accuracy=a,
            n_test=1000,
            fingerprint="long",
        )
        for m, v, a in (("softmax", "a1", 0.20), ("linear", "b2", 0.25))
    ]
    records += [
        record(task="text", mechanism=m, variant=v, label=small, accuracy=0.7, fingerprint="t")
        for m, v in (("softmax", "c3"), ("linear", "d4"))
    ]
    stats, baselines = stats_of(records, tmp_path)
    assert sorted(stats.row.unique()) == ["linear", "softmax"]
    table, averages = report.accuracy_table(stats, baselines)
    header = table.splitlines()[0]
    assert "| listops L=128 " in header and f"listops L=1K [{small}]" in header and f"text L=128 [{small}]" in header
    # chance-normalised (majority 0.5 in both), listops at its most-populated length (ties: shortest)
    assert averages["softmax"] == pytest.approx(((0.40 - 0.5) / 0.5 + (0.70 - 0.5) / 0.5) / 2)
    assert "| softmax " in table and "[a1]" not in table
    mixed = records + [
        record(mechanism="performer", variant="e5", label="mechanism.num_features=16", max_len=1024, fingerprint="long")
    ]
    rows = set(report.cells_frame(mixed).row)
    assert {"softmax [" + small + "]", "performer [mechanism.num_features=16]"} <= rows  # two configs at 1K: labelled


def test_a_band_where_nothing_beats_the_shortcut_says_no_signal_and_ranks_cost_only(tmp_path):
    records = [
        record(mechanism=m, accuracy=0.5, tokens_per_s=t, max_len=1024, majority=0.5)
        for m, t in (("softmax", 1000), ("fnet", 9000), ("linear", 5000), ("slow", 500))
    ]
    stats, baselines = stats_of(records, tmp_path)
    assert not stats.beats_baseline.any()
    lines = report.recommendation_table(stats, baselines).splitlines()[2:]
    names = [[c.strip() for c in line.strip("|").split("|")][3] for line in lines]
    assert names == ["fnet", "linear", "softmax"]  # the three fastest, labelled as a cost ranking
    assert all("no accuracy signal: cost ranking only" in line and "✓" not in line for line in lines)


def with_items(r, correct, *, count=None, clusters=None):
    r["test_items"] = {"correct": list(correct), "count": list(count or [1] * len(correct))}
    r["data"]["sizes"]["test"] = len(correct)
    if clusters is not None:
        r["data"]["test_clusters"] = list(clusters)
    r["metrics"]["test"]["accuracy"] = sum(correct) / sum(count or [1] * len(correct))
    return r


def shortcut(baselines, correct, key=("listops", 128)):
    """Make the column's strongest baseline one with per-item outcomes (as harness.report.baselines records them)."""
    baselines[key]["baselines"].append(
        {
            "name": "shortcut",
            "metric": "accuracy",
            "value": sum(correct) / len(correct),
            "n_test": len(correct),
            "half_width": None,
            "note": "",
            "items": {"correct": list(correct), "count": [1] * len(correct)},
        }
    )


def test_beating_the_baseline_is_a_paired_test_on_the_same_items(tmp_path):
    """200 items; the shortcut is right on items 0-119 (0.60). 'superset' is right there and on 13
    more (0.665) in each of 3 seeds: every disagreement favours it, so the paired test finds it
    better, where the unpaired rule (Wilson's lower bound 0.597 < 0.60) would not. 'elsewhere' has
    the same accuracy on other items: no paired evidence, not better."""
    base = [1] * 120 + [0] * 80
    superset = [1] * 133 + [0] * 67
    elsewhere = [0] * 67 + [1] * 133
    records = [with_items(record(mechanism="superset", seed=s, majority=0.3), superset) for s in range(3)]
    records += [with_items(record(mechanism="elsewhere", seed=s, majority=0.3), elsewhere) for s in range(3)]
    cells = report.cells_frame(records)
    baselines = report.column_baselines(cells, tmp_path / "b")
    shortcut(baselines, base)
    stats = report.group_stats(cells, baselines).set_index("row")
    assert report.wilson(0.665, 200)[0] < 0.60  # the old unpaired rule would say "not beyond the baseline"
    assert stats.loc["superset"].beats_baseline and stats.loc["superset"].p_baseline < 0.05
    assert not stats.loc["elsewhere"].beats_baseline and stats.loc["elsewhere"].p_baseline > 0.05
    assert stats.loc["superset"].bold and not stats.loc["elsewhere"].bold


def test_bold_needs_to_be_not_significantly_below_the_best_under_the_paired_test(tmp_path):
    base = [1] * 100 + [0] * 100  # 0.50
    best = [1] * 180 + [0] * 20  # 0.90
    close = [1] * 172 + [0] * 8 + [1] * 4 + [0] * 16  # 8 items lost, 4 won against the best: within it
    below = [1] * 150 + [0] * 50  # 30 items fewer, all of them where the best is right
    records = [
        with_items(record(mechanism=m, seed=s, majority=0.3), c)
        for m, c in (("best", best), ("close", close), ("below", below))
        for s in range(3)
    ]
    cells = report.cells_frame(records)
    baselines = report.column_baselines(cells, tmp_path / "b")
    shortcut(baselines, base)
    stats = report.group_stats(cells, baselines).set_index("row")
    assert stats.beats_baseline.all()
    assert stats.loc["best"].bold and stats.loc["close"].bold and not stats.loc["below"].bold
    assert stats.loc["below"].p_best < 0.05 <= stats.loc["close"].p_best


def test_intervals_add_seed_variance_and_respect_clusters(tmp_path):
    """Seeds that disagree widen the interval beyond the test set's; items in clusters of 10
    identical outcomes (one page's windows) carry the information of ~20 units, not 200."""
    n = 200
    alike = [1] * 120 + [0] * 80
    clusters = [i // 10 for i in range(n)]  # outcomes are constant within each cluster of 10
    calm = [with_items(record(mechanism="calm", seed=s), alike) for s in range(3)]
    jumpy = [
        with_items(record(mechanism="jumpy", seed=s), [1] * k + [0] * (n - k)) for s, k in enumerate((80, 120, 160))
    ]
    grouped = [with_items(record(mechanism="grouped", seed=s), alike, clusters=clusters) for s in range(3)]
    stats, _ = stats_of(calm + jumpy + grouped, tmp_path)
    by = stats.set_index("row")
    width = {m: by.loc[m].hi - by.loc[m].lo for m in ("calm", "jumpy", "grouped")}
    lo, hi = report.wilson(0.6, n)
    assert width["calm"] == pytest.approx(hi - lo, rel=0.1)  # one test set, seeds agree: about Wilson's
    assert width["jumpy"] > 2 * width["calm"]  # seeds 0.4/0.6/0.8
    assert width["grouped"] > 2.5 * width["calm"] and by.loc["grouped"].n_eff == pytest.approx(20, rel=0.15)
    cells = report.cells_frame(grouped)
    assert "200 / 20 → 19" in report.tasks_table(cells)  # deff = (20/19)·0.012 / 0.0012


def test_softmax_in_disguise_is_marked_and_left_out_of_the_recommendation(tmp_path):
    records = [
        record(mechanism="softmax", accuracy=0.8),
        record(mechanism="local", accuracy=0.8),
        record(mechanism="linear", accuracy=0.75),
    ]
    records[1]["softmax_equivalent"] = True
    records[0]["softmax_equivalent"] = True  # softmax itself is never marked
    stats, baselines = stats_of(records, tmp_path)
    by = stats.set_index("row")
    assert by.loc["local"].softmax_equivalent and not by.loc["softmax"].softmax_equivalent
    assert "≡softmax" in report.cell_text(by.loc["local"]) and "≡softmax" not in report.cell_text(by.loc["softmax"])
    names = [
        [c.strip() for c in line.strip("|").split("|")][3]
        for line in report.recommendation_table(stats, baselines).splitlines()[2:]
    ]
    assert "local" not in names and "softmax" in names


def test_learning_curves_are_drawn_from_the_records(tmp_path):
    for m, curve in (("softmax", [[60, 0.1], [120, 0.9]]), ("linear", [[60, 0.06], [120, 0.07]])):
        for s in range(2):
            r = record(mechanism=m, seed=s)
            r["val_curve"] = curve
            write(tmp_path, r)
    text = report.write_report(tmp_path).read_text()
    assert "![learning curves](plots/learning_curves_small.png)" in text
    assert (tmp_path / "plots" / "learning_curves_small.png").stat().st_size > 5000


def test_accuracy_against_the_cells_throughput_is_plotted_per_column(tmp_path):
    for m, acc, t in (("softmax", 0.8, 1000), ("linear", 0.7, 9000), ("nystrom", 0.78, 5000)):
        write(tmp_path, record(mechanism=m, accuracy=acc, tokens_per_s=t))
    write(tmp_path, record(task="text", mechanism="softmax", fingerprint="t"))  # one row: no panel of its own
    text = report.write_report(tmp_path).read_text()
    assert "![accuracy vs throughput](plots/accuracy_vs_throughput_small.png)" in text
    assert (tmp_path / "plots" / "accuracy_vs_throughput_small.png").stat().st_size > 5000


def test_a_row_on_other_data_is_judged_against_its_own_datas_baselines(tmp_path):
    """Two datasets in one column (a variant with another generator setting): the column shows the
    common data's baselines; the variant is judged against its own and marked †."""

    def splits(labels_test):
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 4, "label": [0, 0, 0, 1]}),
                "validation": datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 2, "label": [0, 1]}),
                "test": datasets.Dataset.from_dict({"input_ids": [[1, 2]] * len(labels_test), "label": labels_test}),
            }
        )

    easy, hard = tmp_path / "easy", tmp_path / "hard"
    splits([0] * 90 + [1] * 10).save_to_disk(str(easy))  # majority 0.9
    splits([0] * 50 + [1] * 50).save_to_disk(str(hard))  # majority 0.5
    records = [
        record(mechanism="softmax", accuracy=0.92, n_test=100, fingerprint="easy", cache_path=str(easy), majority=0.9),
        record(mechanism="linear", accuracy=0.92, n_test=100, fingerprint="easy", cache_path=str(easy), majority=0.9),
        record(
            mechanism="softmax",
            variant="v9",
            label="task.num_distractors=4",
            accuracy=0.75,
            n_test=100,
            fingerprint="hard",
            cache_path=str(hard),
            majority=0.5,
        ),
    ]
    stats, baselines = stats_of(records, tmp_path)
    assert report.strongest(baselines[("listops", 128)]["baselines"], True)["value"] >= 0.9
    assert ("listops", 128, "hard") in baselines and ("listops", 128, "easy") not in baselines
    by = stats.set_index("row")
    variant = by.loc["softmax [task.num_distractors=4]"]
    assert variant.own_data and variant.beats_baseline  # 0.75 [0.66, 0.82] beats its own majority 0.5
    assert not by.loc["softmax"].own_data and not by.loc["softmax"].beats_baseline  # 0.92 vs the column's 0.9
    assert report.cell_text(variant).endswith(" †")


def test_published_rows_sit_only_beside_cells_of_their_protocol():
    """LRA's Table 1 beside protocol=lra cells, Skyformer's row beside protocol=pytorch cells; a
    cell of one protocol never appears in the other's table (issue 23)."""
    records = []
    for protocol, acc in (("lra", 0.37), ("pytorch", 0.39)):
        r = record(task="listops", mechanism="softmax", scale="lra", accuracy=acc)
        r["data"]["source"] = "lra"
        r["config"]["protocol"] = protocol
        records.append(r)
    section = report.reference_section(report.cells_frame(records))
    lra = section[section.index("### LRA's own protocol") : section.index("### The PyTorch")]
    pytorch = section[section.index("### The PyTorch") :]
    assert "| Transformer" in lra and "Skyformer" not in lra
    assert "measured here, `protocol=lra` | 37.00" in lra and "39.00" not in lra
    assert "| Skyformer" in pytorch and "Transformer " not in pytorch
    assert "`protocol=pytorch`" in pytorch and "39.00" in pytorch and "37.00" not in pytorch
