"""Speed-benchmark records → efficiency tables (markdown) and scaling plots.

The story of the section: read ``results/speed/**/*.json`` → one row per measurement →
for each mode (training step, attention layer) and masking (non-causal, causal): speed
relative to softmax per sequence length with the crossover length, peak memory relative to
softmax, absolute tokens/s and MB (LRA's efficiency table, Tay et al. 2021, table 2) →
ours vs the peer implementations → parameters → the harness's own overhead. Plots
(matplotlib, Agg): tokens/s and peak memory vs length, log-log with O(L) and O(L²) guide
lines, a panel per family. (Accuracy against throughput, LRA's figure 3, is the leaderboard's
``accuracy_throughput_plot``, from the cells' own training.)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from harness.core.labels import FAILURE_MARK, length_label, softmax_first
from harness.core.results import save_figure_atomic

log = logging.getLogger(__name__)

MODE_TITLES = {
    "train_step": "Training step (forward + backward + AdamW, whole model)",
    "attention": "Attention layer (mechanism forward + backward)",
}


# ----------------------------------------------------------------------------- reading


def load_records(folder: str | Path) -> list[dict[str, Any]]:
    """Every readable record under ``folder`` (speed measurements and the overhead record);
    an unreadable file is skipped with a warning that names it."""
    folder = Path(folder)
    records = []
    for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable speed record %s: %s", path, exc)
            continue
        if isinstance(record, dict) and record.get("kind") == "compare":
            continue  # an A/B comparison (harness.bench.compare): not part of the sweep's tables
        if not isinstance(record, dict) or record.get("kind") not in ("speed", "overhead"):
            log.warning("skipping %s: not a speed or overhead record", path)
            continue
        record["_path"] = str(path)
        records.append(record)
    return records


def speed_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per speed measurement."""
    rows = []
    for r in records:
        if r.get("kind") != "speed":
            continue
        rows.append(
            {
                "mechanism": r["mechanism"],
                "peer_of": r.get("peer_of"),
                "mode": r["mode"],
                "causal": bool(r["causal"]),
                "length": int(r["length"]),
                "status": r["status"],
                "error": r.get("error"),
                "tokens_per_s": r.get("tokens_per_s"),
                "time_s": r.get("step_time_s"),
                "iqr_s": (r.get("time_s") or {}).get("iqr"),
                "memory_mb": r.get("peak_memory_mb"),
                "params": r.get("params"),
            }
        )
    columns = [
        "mechanism",
        "peer_of",
        "mode",
        "causal",
        "length",
        "status",
        "error",
        "tokens_per_s",
        "time_s",
        "iqr_s",
        "memory_mb",
        "params",
    ]
    return pd.DataFrame(rows, columns=columns)


def _groups(frame: pd.DataFrame):
    """(mode, causal, rows) in reading order: training step first, non-causal first."""
    for mode in sorted(frame["mode"].unique(), key=lambda m: (m != "train_step", m)):
        for causal in (False, True):
            group = frame[(frame["mode"] == mode) & (frame["causal"] == causal)]
            if not group.empty:
                yield mode, causal, group


# ----------------------------------------------------------------------------- relative numbers


def relative_to_softmax(group: pd.DataFrame, column: str, *, invert: bool) -> dict[tuple[str, int], float | None]:
    """(mechanism, length) -> softmax/mechanism (``invert``: speed from times) or
    mechanism/softmax (memory); None where either is not ok; inf where only softmax failed."""
    ok = group[group.status == "ok"].set_index(["mechanism", "length"])[column]
    softmax_status = group[group.mechanism == "softmax"].set_index("length").status
    out: dict[tuple[str, int], float | None] = {}
    for (mech, length), value in ok.items():
        base = ok.get(("softmax", length))
        if base is not None and value and base:
            out[(mech, length)] = base / value if invert else value / base
        elif invert and softmax_status.get(length) in ("oom", "timeout", "skipped"):
            out[(mech, length)] = math.inf  # softmax could not run at all: faster
        else:
            out[(mech, length)] = None
    return out


def crossover_length(speedups: dict[int, float | None]) -> str:
    """The length from which a mechanism is faster than softmax (speed-up > 1) at every longer
    measured length, interpolated log-log between the last slower and first faster length."""
    points = sorted((length, s) for length, s in speedups.items() if s is not None)
    if not points:
        return "–"
    first_faster = None
    for i in range(len(points) - 1, -1, -1):
        if points[i][1] > 1.0:
            first_faster = i
        else:
            break
    if first_faster is None:
        return f"> {length_label(points[-1][0])}"
    if first_faster == 0:
        return f"≤ {length_label(points[0][0])}"
    (l0, s0), (l1, s1) = points[first_faster - 1], points[first_faster]
    if math.isinf(s1) or s0 <= 0:
        return f"{length_label(l0)}–{length_label(l1)}"
    t = (0.0 - math.log(s0)) / (math.log(s1) - math.log(s0))
    estimate = math.exp(math.log(l0) + t * (math.log(l1) - math.log(l0)))
    return f"≈ {_round_length(estimate)}"


def _round_length(length: float) -> str:
    return f"{length / 1024:.1f}K" if length >= 1024 else f"{length:.0f}"


def _status_cell(group: pd.DataFrame, mech: str, length: int) -> str | None:
    row = group[(group.mechanism == mech) & (group.length == length)]
    if row.empty:
        return "–"
    status = row.status.iloc[0]
    return None if status == "ok" else FAILURE_MARK.get(status, status)


def _ratio_cell(value: float | None, softmax_status: str | None) -> str:
    mark = None if softmax_status is None else FAILURE_MARK.get(softmax_status, softmax_status)
    if value is None:
        return "–" if softmax_status in (None, "ok") else f"softmax {mark}"
    if math.isinf(value):
        return f"faster (softmax {mark})"
    return f"{value:.2f}"


def relative_tables(group: pd.DataFrame) -> tuple[str, str, str]:
    """Markdown: speed relative to softmax (+ crossover), memory relative to softmax, absolute."""
    lengths = sorted(group.length.unique())
    mechanisms = softmax_first(group.mechanism)
    speed = relative_to_softmax(group, "time_s", invert=True)
    memory = relative_to_softmax(group, "memory_mb", invert=False)
    softmax_status = group[group.mechanism == "softmax"].set_index("length").status.to_dict()
    speed_rows, memory_rows, absolute_rows = [], [], []
    for mech in mechanisms:
        s_row, m_row, a_row = [mech], [mech], [mech]
        for length in lengths:
            failure = _status_cell(group, mech, length)
            if failure is not None:
                s_row.append(failure)
                m_row.append(failure)
                a_row.append(failure)
                continue
            s_row.append(_ratio_cell(speed.get((mech, length)), softmax_status.get(length)))
            m_row.append(_ratio_cell(memory.get((mech, length)), softmax_status.get(length)))
            r = group[(group.mechanism == mech) & (group.length == length)].iloc[0]
            a_row.append(f"{si_number(r.tokens_per_s)} · {r.memory_mb:,.0f}")
        crossover = "–" if mech == "softmax" else _crossover_cell(group, speed, mech, lengths)
        speed_rows.append(s_row + [crossover])
        memory_rows.append(m_row)
        absolute_rows.append(a_row)
    header = ["mechanism"] + [length_label(L) for L in lengths]
    fmt = {"tablefmt": "github", "disable_numparse": True}
    return (
        tabulate(speed_rows, headers=header + ["faster than softmax from"], **fmt),
        tabulate(memory_rows, headers=header, **fmt),
        tabulate(absolute_rows, headers=header, **fmt),
    )


def _crossover_cell(group: pd.DataFrame, speed: dict, mech: str, lengths: list[int]) -> str:
    """The crossover from the lengths where both ran, and the first length where the
    mechanism failed while softmax ran (beyond it, it is not faster: it does not run)."""
    status = group[group.mechanism == mech].set_index("length").status
    softmax = group[group.mechanism == "softmax"].set_index("length").status
    text = crossover_length({L: speed[(mech, L)] for L in lengths if speed.get((mech, L)) is not None})
    failed = [L for L in lengths if status.get(L) not in (None, "ok") and softmax.get(L) == "ok"]
    return f"{text} (✗ from {length_label(failed[0])})" if failed else text


def si_number(value: float | None) -> str:
    """1234 -> '1.23k', 2e6 -> '2M' (three significant digits), None/NaN -> '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


# ----------------------------------------------------------------------------- peers, parameters, overhead


def peer_table(frame: pd.DataFrame) -> str | None:
    """Ours vs peer at equal settings: speed = peer time / our time (> 1: ours faster), memory =
    ours / peer (< 1: ours smaller)."""
    pairs = frame.dropna(subset=["peer_of"])[["mechanism", "peer_of"]].drop_duplicates()
    if pairs.empty:
        return None
    lengths = sorted(frame.length.unique())
    rows = []
    for peer, ours in pairs.itertuples(index=False):
        for mode, causal, group in _groups(frame):
            mine = group[group.mechanism == ours].set_index("length")
            theirs = group[group.mechanism == peer].set_index("length")
            if mine.empty or theirs.empty:
                continue
            row = [f"{ours} / {peer}", f"{mode}{' causal' if causal else ''}"]
            for length in lengths:
                if length not in mine.index or length not in theirs.index:
                    row.append("–")
                    continue
                a, b = mine.loc[length], theirs.loc[length]
                if a.status != "ok" or b.status != "ok":
                    row.append(
                        f"ours {FAILURE_MARK.get(a.status, a.status)}"
                        if a.status != "ok"
                        else f"peer {FAILURE_MARK.get(b.status, b.status)}"
                    )
                    continue
                memory = f"{a.memory_mb / b.memory_mb:.2f}" if b.memory_mb else "–"
                row.append(f"{b.time_s / a.time_s:.2f} · {memory}")
            rows.append(row)
    if not rows:
        return None
    header = ["ours / peer", "mode"] + [length_label(L) for L in lengths]
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)


def parameter_table(frame: pd.DataFrame, params: dict[str, int]) -> str:
    names = softmax_first(set(frame.mechanism) | set(params))
    rows = []
    for mech in names:
        step = frame[
            (frame.mechanism == mech) & (frame["mode"] == "train_step") & (frame.status == "ok") & ~frame.causal
        ]
        layer = frame[(frame.mechanism == mech) & (frame["mode"] == "attention") & (frame.status == "ok")]
        rows.append(
            [
                mech,
                f"{int(params[mech]):,}" if mech in params and pd.notna(params[mech]) else "–",
                f"{int(step.sort_values('length').params.iloc[0]):,}"
                if not step.empty and pd.notna(step.params.iloc[0])
                else "–",
                f"{int(layer.sort_values('length').params.iloc[0]):,}"
                if not layer.empty and pd.notna(layer.params.iloc[0])
                else "–",
            ]
        )
    return tabulate(
        rows,
        headers=["mechanism", "ListOps model (grid)", "speed model (train step)", "mechanism alone (per layer)"],
        tablefmt="github",
        disable_numparse=True,
    )


def overhead_markdown(record: dict[str, Any]) -> str:
    lines = ["### Harness overhead", ""]
    training = record.get("training") or {}
    if training:
        mark = "✓" if training["ratio"] >= training["target"] else "✗"
        lines += [
            f"Training epoch of `{training['task']}` at scale `{training['scale']}` with `{training['mechanism']}` "
            f"({training['steps']} steps of batch {training['batch_size']}, the first {training['skip']} untimed), "
            f"Lightning path (`TaskModule` + `Trainer`) vs a bare PyTorch loop: "
            f"**{training['ratio']:.3f}** of the bare loop's throughput (target ≥ {training['target']:.2f} {mark}); "
            f"{si_number(_median(training['lightning_tokens_per_s']))} vs "
            f"{si_number(_median(training['bare_tokens_per_s']))} "
            "tokens/s (medians; the ratio is the median over adjacent pairs of alternating rounds).",
            "",
        ]
    contract = record.get("contract") or []
    if contract:
        target = record.get("contract_target", 1.05)
        rows = [
            [
                r["length"],
                "causal" if r["causal"] else "non-causal",
                f"{1e3 * r['contract_s']:.3f}",
                f"{1e3 * r['sdpa_s']:.3f}",
                f"{r['ratio']:.3f}",
                f"{r['overhead_us']:.0f}",
                "✓" if r["ratio"] <= target else "✗",
            ]
            for r in contract
        ]
        first = contract[0]
        lines += [
            f"Softmax through the mechanism contract vs a bare `scaled_dot_product_attention` call, forward, "
            f"batch {first['batch_size']}, {first['heads']} heads × {first['dim_head']} dims "
            f"(target: within {100 * (target - 1):.0f}%):",
            "",
            tabulate(
                rows,
                headers=["L", "masking", "contract ms", "SDPA ms", "ratio", "overhead µs", f"≤ {target:.2f}"],
                tablefmt="github",
                disable_numparse=True,
            ),
            "",
        ]
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    return float(pd.Series(values).median())


def method_markdown(records: list[dict[str, Any]]) -> str:
    speed = [r for r in records if r.get("kind") == "speed"]
    sample = next((r for r in speed if r["mechanism"] == "softmax" and r["status"] == "ok"), None) or speed[0]
    hw = (sample.get("env") or {}).get("hardware") or {}
    device = hw.get("gpu") or f"{hw.get('cpu', '?')} ({hw.get('logical_cores', '?')} logical cores)"
    model = next((r["model"] for r in speed if r.get("model")), None)
    method = sample.get("method") or {}
    parts = [
        f"Measured by `python -m harness speed` on {device}, torch {(sample.get('env') or {}).get('torch', '?')}, "
        f"{sample.get('threads', '?')} threads, {sample.get('dtype', '?')}; batch {sample.get('batch_size')}, "
        f"{sample.get('heads')} heads × {sample.get('dim_head')} dims per head.",
    ]
    if model:
        parts.append(
            f"Training step: the scale model (dim {model['dim']}, depth {model['depth']}, "
            f"{model['heads']} heads, MLP {model['mlp_dim']}) on random tokens, AdamW."
        )
    varying = _varying_settings(speed)
    parts.append(
        f"Timing: {method.get('timing', '?')}. Memory: {method.get('memory') or '?'}. "
        f"Isolation: {method.get('isolation', '?')}; per-measurement limit {method.get('timeout_s', '?')} s."
    )
    if varying:
        parts.append(f"Not all records share these settings ({varying}): each record holds its own method.")
    return " ".join(parts)


def _varying_settings(speed: list[dict[str, Any]]) -> str:
    """Method/shape settings that differ between records, as "name: a / b"."""
    keys = ("warmup", "min_reps", "max_reps", "min_time_s", "timeout_s")
    values: dict[str, set] = {}
    for r in speed:
        for key in keys:
            values.setdefault(key, set()).add((r.get("method") or {}).get(key))
        for key in ("threads", "batch_size", "heads", "dim_head", "dtype"):
            values.setdefault(key, set()).add(r.get(key))
    return "; ".join(
        f"{k}: {' / '.join(str(v) for v in sorted(vs, key=str))}" for k, vs in values.items() if len(vs) > 1
    )


# ----------------------------------------------------------------------------- the section


def efficiency_markdown(records: list[dict[str, Any]], params: dict[str, int] | None = None) -> str:
    """The leaderboard's efficiency section from speed (and overhead) records."""
    params = dict(params or {})
    frame = speed_frame(records)
    lines = ["## Efficiency", ""]
    if not frame.empty:
        lines += [
            method_markdown(records),
            "",
            "Speed: softmax's time / the mechanism's time at the same length (> 1: faster than softmax); "
            "memory: the mechanism's peak / softmax's (< 1: less). `✗ oom` / `✗ timeout`: the measurement ran "
            "out of memory or time; `– skipped`: a shorter length already did; `–`: not measured.",
            "",
        ]
        for mode, causal, group in _groups(frame):
            title = f"{MODE_TITLES.get(mode, mode)}, {'causal' if causal else 'non-causal'}"
            speed, memory, absolute = relative_tables(group)
            lines += [
                f"### {title}",
                "",
                "Speed relative to softmax:",
                "",
                speed,
                "",
                "Peak memory relative to softmax:",
                "",
                memory,
                "",
                "Absolute: tokens/s · peak MB:",
                "",
                absolute,
                "",
            ]
        peers = peer_table(frame)
        if peers:
            lines += [
                "### Ours vs peer implementations",
                "",
                "Same settings (the peer takes our configuration: features, landmarks). Each cell: "
                "speed = peer time / our time (> 1: ours faster) · memory = our peak / peer peak (< 1: ours "
                "smaller).",
                "",
                peers,
                "",
            ]
        lines += ["### Parameters", "", parameter_table(frame, params), ""]
    overhead = [r for r in records if r.get("kind") == "overhead"]
    if overhead:
        lines.append(overhead_markdown(overhead[-1]))
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots


MARKERS = "osD^v<>pPXh*d8H"


def wrapped(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (a figure's
    title otherwise runs off a one-panel figure)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 72 / (0.55 * fontsize)))))


def finish_figure(fig: Any, title: str, path: Path) -> Path:
    """Every plot's last step: ``title`` wrapped to the figure's width as its suptitle, the figure
    written atomically to ``path`` (110 dpi), and closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(wrapped(title, fig.get_figwidth(), 11), fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


def series_style(names: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct (colour, marker, line style) per name, for 15+ series: 18 tab20 colours (strong
    shades first) crossed with 14 markers, solid lines first, then dashed; softmax drawn thicker."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    # grey (tab20's 14 and 15) is left out: the baselines are drawn grey
    palette = [cmap(i) for i in range(0, 20, 2) if i != 14] + [cmap(i) for i in range(1, 20, 2) if i != 15]
    style = {}
    for i, name in enumerate(names):
        style[name] = {
            "color": palette[i % len(palette)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": "-" if (i // len(palette)) % 2 == 0 else "--",
            "linewidth": 2.2 if name == "softmax" else 1.4,
        }
    return style


def _style(mechanisms: list[str], frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """A colour per mechanism; a peer takes its counterpart's colour, dashed, hollow markers."""
    peer_of = frame.dropna(subset=["peer_of"]).groupby("mechanism").peer_of.first().to_dict()
    ours = [m for m in mechanisms if m not in peer_of]
    style = series_style(ours)
    for mech, counterpart in peer_of.items():
        base = style.get(counterpart, {"color": "grey", "marker": "o"})
        style[mech] = {
            "color": base["color"],
            "marker": base["marker"],
            "linestyle": "--",
            "linewidth": 1.4,
            "markerfacecolor": "none",
        }
    return style


def family_of(frame: pd.DataFrame) -> dict[str, str]:
    """Each series' family (``harness.core.registry.FAMILIES``): a peer is drawn in its counterpart's;
    a name no longer registered is ``other``."""
    from harness.core.registry import get_mechanism, list_mechanisms

    known = set(list_mechanisms())
    peer_of = frame.dropna(subset=["peer_of"]).groupby("mechanism").peer_of.first().to_dict()
    out = {}
    for mech in set(frame.mechanism):
        own = peer_of.get(mech, mech)
        out[mech] = get_mechanism(own).family if own in known else "other"
    return out


def stop_of(points: pd.DataFrame, failures: pd.DataFrame, column: str) -> tuple[float, float, float, str] | None:
    """Where a series stops (oom/timeout/failed at a longer length than its last ok point):
    (last ok length, its value, the first longer length that did not finish, its status)."""
    if points.empty or failures.empty:
        return None
    last = points.sort_values("length").iloc[-1]
    later = failures[failures.length > last.length].sort_values("length")
    if later.empty:
        return None
    return float(last.length), float(last[column]), float(later.iloc[0].length), str(later.iloc[0].status)


def mark_stops(ax, stops: list[tuple[tuple[float, float, float, str], Any]]) -> None:
    """A cross where each series stops, on the level of its last ok point and in its colour, joined
    to it by a dotted line; one label per length, left of its lowest cross, counting the statuses
    there ("oom ×2, timeout"): a label per series piled up where several stop at one length."""
    at: dict[float, list[tuple[float, str]]] = {}
    for (last_length, level, length, status), color in stops:
        ax.plot([last_length, length], [level, level], color=color, linestyle=":", linewidth=1)
        ax.plot([length], [level], marker="x", markersize=9, markeredgewidth=2, color=color, linestyle="none")
        at.setdefault(length, []).append((level, status))
    for length, marks in at.items():
        counts: dict[str, int] = {}
        for _, status in marks:
            counts[status] = counts.get(status, 0) + 1
        text = ", ".join(f"{status} ×{n}" if n > 1 else status for status, n in sorted(counts.items()))
        ax.annotate(
            text,
            (length, min(level for level, _ in marks)),
            textcoords="offset points",
            xytext=(-8, -4),
            ha="right",
            va="top",
            fontsize=7,
        )


def _guides(ax, anchor: tuple[float, float], lengths: list[int], kind: str, y_range: tuple[float, float]) -> None:
    """O(L) and O(L²) guide lines through ``anchor`` (L0, y0), clipped to the data's range:
    the axes keep the data's y limits (with a margin), so a guide never stretches the plot."""
    l0, y0 = anchor
    xs = np.geomspace(min(lengths), max(lengths), 64)
    if kind == "throughput":  # cost O(L): constant tokens/s; O(L²): tokens/s ∝ 1/L
        ax.plot(xs, np.full_like(xs, y0), color="black", linestyle=":", linewidth=1, label="O(L) time")
        ax.plot(xs, y0 * l0 / xs, color="black", linestyle="-.", linewidth=1, label="O(L²) time")
    else:
        ax.plot(xs, y0 * xs / l0, color="black", linestyle=":", linewidth=1, label="O(L) memory")
        ax.plot(xs, y0 * (xs / l0) ** 2, color="black", linestyle="-.", linewidth=1, label="O(L²) memory")
    low, high = y_range
    ax.set_ylim(low / 1.5, high * 1.5)


def _scaling_plot(frame: pd.DataFrame, causal: bool, kind: str, path: Path) -> Path | None:
    """Small multiples: a panel per family of mechanisms (and per mode when both were measured),
    softmax in every panel as the reference, O(L) and O(L²) guides through softmax's first point,
    each panel's legend beside it; ✕ where a series stops (oom / timeout / failed)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from harness.core.registry import FAMILIES

    column = "tokens_per_s" if kind == "throughput" else "memory_mb"
    data = frame[(frame.causal == causal) & (frame.status == "ok")]
    data = data[data[column].notna() & (data[column] > 0)]
    stopped = frame[(frame.causal == causal) & frame.status.isin(["oom", "timeout", "failed"])]
    modes = [m for m in ("train_step", "attention") if m in set(data["mode"])]
    if not modes:
        return None
    family = family_of(frame)
    families = [f for f in FAMILIES if any(family[m] == f for m in set(frame.mechanism) if m != "softmax")]
    families = families or ["full"]
    panels = [(f, mode) for f in families for mode in modes]
    cols = len(modes) if len(modes) > 1 else min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.6 * cols, 3.9 * rows_n), squeeze=False, layout="constrained")
    for ax, (fam, mode) in zip(axes.flat, panels):
        group = data[data["mode"] == mode]
        members = softmax_first(m for m in set(frame.mechanism) if family[m] == fam or m == "softmax")
        style = _style(members, frame[frame.mechanism.isin(members)])
        if "softmax" in style:
            style["softmax"] = {**style["softmax"], "color": "black", "linewidth": 2.2}
        lengths = sorted(set(group.length) | set(stopped[stopped["mode"] == mode].length))
        stops = []
        for mech in members:
            points = group[group.mechanism == mech].sort_values("length")
            if not points.empty:
                ax.plot(points.length, points[column], label=mech, markersize=5, **style[mech])
            stop = stop_of(points, stopped[(stopped["mode"] == mode) & (stopped.mechanism == mech)], column)
            if stop:
                stops.append((stop, style[mech]["color"]))
        shown = group[group.mechanism.isin(members)]
        if shown.empty or not lengths:
            ax.axis("off")
            continue
        anchor_rows = shown[shown.mechanism == "softmax"].sort_values("length")
        first = (anchor_rows if len(anchor_rows) else shown.sort_values("length")).iloc[0]
        _guides(ax, (first.length, first[column]), lengths, kind, (shown[column].min(), shown[column].max()))
        mark_stops(ax, stops)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [length_label(L) for L in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length L (tokens)", fontsize=9)
        ax.set_ylabel("tokens/s" if kind == "throughput" else "peak memory (MB)", fontsize=9)
        title = FAMILIES[fam] + (f" · {MODE_TITLES.get(mode, mode).split(' (')[0]}" if len(modes) > 1 else "")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    what = "Throughput" if kind == "throughput" else "Peak memory"
    measured = MODE_TITLES.get(modes[0], modes[0]) if len(modes) == 1 else "each panel's mode"
    return finish_figure(
        fig,
        f"{what} vs sequence length, a panel per family, softmax (black) in each: {measured}; "
        f"{'causal' if causal else 'non-causal'}, log-log; ✕ where a series stops",
        path,
    )


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (speed, accuracy), both higher-better, ordered by speed: no other
    point is at least as fast and as accurate and better in one."""
    front = []
    for name, (speed, accuracy) in points.items():
        dominated = any(
            s >= speed and a >= accuracy and (s > speed or a > accuracy)
            for other, (s, a) in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def write_plots(records: list[dict[str, Any]], plots_dir: str | Path) -> list[Path]:
    """Write the scaling plots: throughput and peak memory against length, non-causal and causal.
    (Accuracy against throughput is the leaderboard's ``accuracy_throughput_plot``, from the
    cells' own training.)"""
    import matplotlib

    matplotlib.use("Agg")
    plots_dir = Path(plots_dir)
    frame = speed_frame(records)
    if frame.empty:
        return []
    written = []
    for causal in (False, True):
        suffix = "_causal" if causal else ""
        for kind, name in (("throughput", "throughput_vs_length"), ("memory", "memory_vs_length")):
            path = _scaling_plot(frame, causal, kind, plots_dir / f"{name}{suffix}.png")
            if path:
                written.append(path)
    log.info("efficiency plots: %s", ", ".join(str(p) for p in written))
    return written
