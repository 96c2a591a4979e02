"""The report's figures read cleanly: small multiples per family for the speed plots, crosses where
cells failed at their own length, lines only between cells of one config, and for every figure no
text runs off it or over other text (tests/plot_geometry.py)."""

from plot_geometry import capture_figures, problems
from test_efficiency import record as speed_record
from test_report import record, stats_of, write

from harness.core.registry import FAMILIES, get_mechanism, list_mechanisms
from harness.report import efficiency
from harness.report import leaderboard as report

LENGTHS = [256, 1024, 4096, 16384]


def every_mechanism_swept():
    """Every registered mechanism and peer at 4 lengths; a third stop at 16K (oom / timeout) from
    similar throughputs, so their labels meet at one place, as in a real sweep."""
    out = []
    names = sorted(list_mechanisms())
    for i, name in enumerate(names):
        peer_of = getattr(get_mechanism(name).cls, "peer_of", None)
        quadratic = get_mechanism(peer_of or name).family == "full"
        for length in LENGTHS:
            seconds = 1e-3 * (length / 256) ** (2 if quadratic else 1) * (1 + i / 50)
            if length == 16384 and i % 3 == 0:
                out.append(
                    speed_record(name, length, status="oom" if i % 2 else "timeout", mode="attention", peer_of=peer_of)
                )
            else:
                out.append(
                    speed_record(
                        name,
                        length,
                        seconds=seconds,
                        memory=length / 64 * (1 + i / 40),
                        mode="attention",
                        peer_of=peer_of,
                    )
                )
    return out


def test_speed_plots_are_small_multiples_per_family_with_softmax_in_each(tmp_path, monkeypatch):
    saved = capture_figures(monkeypatch)
    records = every_mechanism_swept()
    paths = efficiency.write_plots(records, tmp_path)
    assert sorted(p.name for p in paths) == ["memory_vs_length.png", "throughput_vs_length.png"]
    # the families of the swept mechanisms (a peer in its counterpart's), whatever this process registered
    family_of = {r["mechanism"]: get_mechanism(r.get("peer_of") or r["mechanism"]).family for r in records}
    families = {f for name, f in family_of.items() if name != "softmax"}
    for fig in saved:
        panels = [ax for ax in fig.axes if ax.axison]
        assert len(panels) == len(families)  # one per family that has a member besides softmax
        titles = {ax.get_title() for ax in panels}
        assert titles == {FAMILIES[f] for f in families}
        for ax in panels:
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert labels[0] == "softmax"  # the reference, in every panel
            members = [lab for lab in labels if lab in set(list_mechanisms()) and lab != "softmax"]
            family = {get_mechanism(getattr(get_mechanism(m).cls, "peer_of", None) or m).family for m in members}
            assert len(family) == 1 and FAMILIES[family.pop()] == ax.get_title()
            assert len(labels) <= 12  # a panel a reader can follow (33 series on one axes before)
        assert problems(fig) == []


def test_stop_labels_at_one_length_do_not_pile_up(monkeypatch, tmp_path):
    """Four series stopping at 16K from nearly the same level: four crosses, one label counting them."""
    saved = capture_figures(monkeypatch)
    records = []
    for i, name in enumerate(["softmax", "rela", "gated", "bam", "babn"]):
        for length in LENGTHS[:3]:
            records.append(
                speed_record(
                    name, length, seconds=1e-3 * (length / 256) ** 2 * (1 + i / 100), memory=1.0, mode="attention"
                )
            )
        if name != "softmax":
            records.append(speed_record(name, 16384, status="oom", mode="attention"))
    efficiency.write_plots(records, tmp_path)
    for fig in saved:
        assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["oom ×4"]
        crosses = [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() == "x"]
        assert len(crosses) == 4 and {float(ln.get_xdata()[0]) for ln in crosses} == {16384.0}
        assert problems(fig) == []


def test_a_failed_cell_is_crossed_at_its_own_length_and_configs_are_not_joined(monkeypatch, tmp_path):
    """mqar: softmax ok at 1K (presets) and 4K (a shared 4K config), linear ok at 1K and timed out
    at 4K. The cross sits at 4K at the foot of the panel (not at linear's 1K value), and no line
    joins softmax's 1K and 4K points (different configs)."""
    saved = capture_figures(monkeypatch)
    records = [
        record(task="mqar", mechanism="softmax", accuracy=0.99, max_len=1024),
        record(task="mqar", mechanism="linear", accuracy=0.07, max_len=1024),
        record(
            task="mqar",
            mechanism="softmax",
            accuracy=0.9,
            max_len=4096,
            variant="b4",
            label="task.max_len=4096, train.batch_size=4",
        ),
        record(
            task="mqar",
            mechanism="linear",
            status="timeout",
            max_len=4096,
            variant="b4",
            label="task.max_len=4096, train.batch_size=4",
        ),
    ]
    stats, baselines = stats_of(records, tmp_path)
    report.accuracy_length_plot(stats, baselines, tmp_path / "plot.png", "small")
    fig = saved[0]
    ax = fig.axes[0]
    softmax_lines = [
        ln
        for ln in ax.lines
        if ln.get_color() == ax.lines[0].get_color() and ln.get_marker() == ax.lines[0].get_marker()
    ]
    assert sorted(len(ln.get_xdata()) for ln in softmax_lines) == [1, 1]  # two points, not one line
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [4096]
    assert list(crosses[0].get_ydata()) == [0.03]  # in axes units: the foot of the panel
    assert [t.get_text() for t in ax.texts] == ["timeout"]
    assert problems(fig) == []


def test_accuracy_against_throughput_names_points_in_a_legend_and_ticks_do_not_collide(monkeypatch, tmp_path):
    """Eight rows at nearly one throughput and accuracy (their labels used to overlap) over a
    throughput range within one decade (whose minor labels ran together: 3×10⁴4×10⁴)."""
    saved = capture_figures(monkeypatch)
    names = ["softmax", "linear", "performer", "linformer", "nystrom", "local", "bigbird", "cosformer"]
    records = [
        record(task="mqar", mechanism=m, accuracy=0.5 + i / 1000, tokens_per_s=30000 + 1500 * i, max_len=1024)
        for i, m in enumerate(names)
    ]
    stats, baselines = stats_of(records, tmp_path)
    report.accuracy_throughput_plot(stats, baselines, tmp_path / "plot.png", "small")
    fig = saved[0]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert set(names) <= set(labels)
    assert problems(fig) == []
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all("×" not in t for t in ticks)


def test_every_figure_of_a_report_reads_cleanly(monkeypatch, tmp_path):
    """The whole page's figures from one folder of cells and speed records."""
    from harness.core.results import write_json_atomic

    saved = capture_figures(monkeypatch)
    for i, m in enumerate(["softmax", "linear", "performer", "local"]):
        for length, variant in ((1024, ""), (4096, "b4")):
            r = record(
                task="mqar",
                mechanism=m,
                accuracy=0.9 - i / 10,
                max_len=length,
                tokens_per_s=2e4 / (i + 1),
                variant=variant,
                label=f"task.max_len={length}" if variant else "",
            )
            r["val_curve"] = [[step, 0.1 + step / 1000] for step in (60, 120, 180)]
            write(tmp_path, r)
    for k, r in enumerate(every_mechanism_swept()):
        write_json_atomic(tmp_path / "speed" / f"r{k}.json", r)
    report.write_report(tmp_path)
    assert len(saved) >= 4
    for fig in saved:
        assert problems(fig) == [], fig._suptitle.get_text() if fig._suptitle else ""

    # one accuracy-vs-speed figure, from the cells' own throughput (the speed sweep draws none)
    plots = sorted(p.name for p in (tmp_path / "plots").glob("accuracy_vs_*.png"))
    assert plots == ["accuracy_vs_length_small.png", "accuracy_vs_throughput_small.png"]
