"""Results → ``results/leaderboard.md`` (and plots): ``python -m harness report``.

The story of the table: read every result JSON → one row per cell → per scale, a
mechanism × task table of the task's primary metric (mean ± std over seeds, best per
column in bold, a majority-class row, "n/a" for unsupported cells and the status for
failed ones) → the tasks table → training throughput/memory/parameters from the cells →
efficiency tables from the speed benchmark → run details.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from harness.results import read_results

log = logging.getLogger(__name__)

FAILURE_MARK = {"failed": "✗ failed", "oom": "✗ oom", "nan": "✗ nan", "timeout": "✗ timeout"}


def primary_metric(metrics: dict[str, float]) -> tuple[str, bool]:
    """(metric name, higher is better): bits/token for language models, else accuracy."""
    if "bits_per_token" in metrics:
        return "bits_per_token", False
    return "accuracy", True


def cells_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per result: identity, status, primary test/val metric, efficiency."""
    rows = []
    for r in records:
        test = (r.get("metrics") or {}).get("test") or {}
        val = (r.get("metrics") or {}).get("val") or {}
        metric, higher = primary_metric(test)
        data = r.get("data") or {}
        rows.append(
            {
                "scale": r["scale"], "task": r["task"], "mechanism": r["mechanism"], "seed": r["seed"],
                "status": r["status"], "error": r.get("error"), "metric": metric, "higher_better": higher,
                "test": test.get(metric), "val": val.get(metric), "params": r.get("params"),
                "tokens_per_s": r.get("tokens_per_s"), "peak_memory_mb": r.get("peak_memory_mb"),
                "wall_s": r.get("wall_s"), "source": data.get("source"), "fingerprint": data.get("fingerprint"),
                "majority": data.get("majority_accuracy"), "unigram_bits": data.get("unigram_bits_per_token"), "sizes": data.get("sizes"),
                "length_mean": data.get("length_mean"), "length_max": data.get("length_max"),
                "num_classes": data.get("num_classes"), "commit": (r.get("env") or {}).get("commit"),
                "device": (r.get("env") or {}).get("device"),
            }
        )
    return pd.DataFrame(rows)


def _fmt(mean: float, std: float, n: int, bold: bool) -> str:
    text = f"{100 * mean:.1f}" if n == 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"**{text}**" if bold else text


def accuracy_table(cells: pd.DataFrame) -> tuple[str, pd.Series]:
    """Markdown mechanism × task table for one scale, and each mechanism's average."""
    tasks = sorted(cells.task.unique())
    mechanisms = sorted(cells.mechanism.unique(), key=lambda m: (m != "softmax", m))
    ok = cells[cells.status == "ok"]
    stats = ok.groupby(["task", "mechanism"]).test.agg(["mean", "std", "count"]).fillna({"std": 0.0})
    lower_better = {t for t in tasks if not cells[cells.task == t].higher_better.iloc[0]}
    best = {}
    for task in tasks:
        if task in stats.index.get_level_values(0):
            means = stats.loc[task]["mean"]
            best[task] = means.min() if task in lower_better else means.max()
    header = ["mechanism"] + [f"{t} (bits/token ↓)" if t in lower_better else t for t in tasks] + ["average"]
    rows, averages = [], {}
    majority = cells.groupby("task").majority.first()
    unigram = cells.groupby("task").unigram_bits.first()

    def baseline(task: str) -> str:  # majority class; for a language model, the unigram bits/token
        if task in lower_better:
            return f"{unigram[task]:.3f} (unigram)" if pd.notna(unigram.get(task)) else "–"
        return f"{100 * majority[task]:.1f}" if pd.notna(majority.get(task)) else "–"

    rows.append(["majority baseline"] + [baseline(t) for t in tasks] + [""])
    for mech in mechanisms:
        row, accs = [mech], []
        for task in tasks:
            statuses = cells[(cells.task == task) & (cells.mechanism == mech)].status
            if (task, mech) in stats.index:
                s = stats.loc[(task, mech)]
                if task in lower_better:
                    text = f"{s['mean']:.3f}" if s["count"] == 1 else f"{s['mean']:.3f} ± {s['std']:.3f}"
                    text = f"**{text}**" if s["mean"] == best[task] else text
                else:
                    text = _fmt(s["mean"], s["std"], int(s["count"]), s["mean"] == best[task])
                    accs.append(s["mean"])
                failed = statuses[~statuses.isin(["ok", "unsupported"])]
                if len(failed):  # some seeds failed: the mean is over the others, and says so
                    marks = " / ".join(sorted({FAILURE_MARK.get(x, x) for x in failed}))
                    text += f" ({marks} {len(failed)}/{len(statuses)} seeds)"
                row.append(text)
                continue
            if statuses.empty:
                row.append("–")
            elif (statuses == "unsupported").all():
                row.append("n/a")
            else:
                row.append(" / ".join(sorted({FAILURE_MARK.get(s, s) for s in statuses})))
        accuracy_tasks = [t for t in tasks if t not in lower_better]
        complete = len(accs) == len(accuracy_tasks) and accs
        averages[mech] = sum(accs) / len(accs) if complete else float("nan")
        row.append(f"{100 * averages[mech]:.1f}" if complete else "–")
        rows.append(row)
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True), pd.Series(averages, dtype=float)


def tasks_table(cells: pd.DataFrame) -> str:
    rows = []
    for (task, source), group in cells.dropna(subset=["fingerprint"]).groupby(["task", "source"]):
        first = group.iloc[0]
        sizes = first.sizes or {}
        rows.append([
            task, source, f"{sizes.get('train', '?')}/{sizes.get('validation', '?')}/{sizes.get('test', '?')}",
            f"{first.length_mean:.0f} / {first.length_max}", first.num_classes if pd.notna(first.num_classes) else "–",
            f"{100 * first.majority:.1f}" if pd.notna(first.majority) else "–", first.fingerprint,
        ])
    headers = ["task", "source", "train/val/test", "length mean / max (test)", "classes", "majority (test)", "fingerprint"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def throughput_table(cells: pd.DataFrame) -> str:
    """Mechanism × task: training tokens/s (thousands) · peak memory MB of the grid cells
    themselves, plus each mechanism's parameter count (of its model on the first task)."""
    ok = cells[cells.status == "ok"]
    if ok.empty:
        return "_no finished cells_"
    agg = ok.groupby(["mechanism", "task"]).agg(
        tokens_per_s=("tokens_per_s", "median"), peak_memory_mb=("peak_memory_mb", "median"), params=("params", "first")
    )
    tasks = sorted(ok.task.unique())
    mechanisms = sorted(ok.mechanism.unique(), key=lambda m: (m != "softmax", m))
    rows = []
    for mech in mechanisms:
        row = [mech]
        for task in tasks:
            if (mech, task) not in agg.index:
                row.append("–")
                continue
            r = agg.loc[(mech, task)]
            speed = f"{r.tokens_per_s / 1e3:,.1f}k" if pd.notna(r.tokens_per_s) else "–"
            memory = f"{r.peak_memory_mb:,.0f}" if pd.notna(r.peak_memory_mb) else "–"
            row.append(f"{speed} · {memory}")
        first = agg.loc[mech].iloc[0]
        row.append(f"{int(first.params):,} ({agg.loc[mech].index[0]})")
        rows.append(row)
    headers = ["mechanism"] + [f"{t}: tokens/s · MB" for t in tasks] + ["parameters (task)"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def details_table(cells: pd.DataFrame) -> str:
    rows = []
    for (scale, task, mech), group in cells.groupby(["scale", "task", "mechanism"]):
        seeds = ",".join(str(s) for s in sorted(group.seed))
        statuses = ", ".join(f"{s} {n}" for s, n in group.status.value_counts().sort_index().items())
        errors = "; ".join(sorted({e for e in group.error.dropna()}))[:120]
        rows.append([scale, task, mech, seeds, statuses, group.source.dropna().iloc[0] if group.source.notna().any() else "–",
                     ",".join(sorted(set(group.commit.dropna()))), errors])
    return tabulate(rows, headers=["scale", "task", "mechanism", "seeds", "status", "data source", "commit", "error"],
                    tablefmt="github", disable_numparse=True)


def efficiency_section(results_dir: Path, averages: pd.Series, params: dict[str, int]) -> str:
    """Tables and plots from the speed benchmark (``harness.speed``), when it has run."""
    try:
        from harness import efficiency
    except ImportError:
        return ""
    records = efficiency.load_records(results_dir / "speed") if hasattr(efficiency, "load_records") else []
    if not records:
        return "\n## Efficiency\n\n_No speed benchmark yet: run `make speed`._\n"
    text = efficiency.efficiency_markdown(records, params=params)
    efficiency.write_plots(records, averages.dropna(), results_dir / "plots")
    return "\n" + text + "\n"


def write_report(results_dir: str | Path = "results") -> Path:
    results_dir = Path(results_dir)
    records = read_results(results_dir)
    out = results_dir / "leaderboard.md"
    lines = ["# Leaderboard", ""]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"Generated {stamp} from {len(records)} cell results in `{results_dir}/runs` by `python -m harness report`.")
    lines.append("")
    averages = pd.Series(dtype=float)
    params: dict[str, int] = {}
    if not records:
        lines.append("_No results yet: run `make smoke` or `make benchmark`._")
    else:
        cells = cells_frame(records)
        for scale in sorted(cells.scale.unique(), key=lambda s: ("tiny", "small", "lra").index(s) if s in ("tiny", "small", "lra") else 9):
            scale_cells = cells[cells.scale == scale]
            table, averages_s = accuracy_table(scale_cells)
            if scale != "tiny" or averages.empty:
                averages = averages_s
            lines += [f"## Accuracy — scale `{scale}`", "",
                      "Test accuracy (%) of the checkpoint selected on validation; mean ± std over seeds; "
                      "best per column in **bold**. `n/a`: the mechanism lacks a capability the task needs; "
                      "`✗ status`: the cell failed (see run details). Average over accuracy tasks.", "", table, ""]
            lines += [f"### Tasks — scale `{scale}`", "", tasks_table(scale_cells), ""]
            lines += [f"### Training throughput — scale `{scale}`", "",
                      "Measured during the grid's own training (median over seeds): thousands of padded tokens per "
                      "second of training steps after warm-up · peak memory in MB (CUDA max allocated, or the "
                      "process's peak RSS on CPU). Cells train at the task's own length, so compare within a column.",
                      "", throughput_table(scale_cells), ""]
        ok = cells[cells.status == "ok"].sort_values(["task"], key=lambda t: t != "listops")
        params = ok.groupby("mechanism", sort=False).params.first().astype(int).to_dict()  # ListOps model where run
        lines += ["## Run details", "", details_table(cells), ""]
    lines.append(efficiency_section(results_dir, averages, params))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results_dir = "results"
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "results_dir" or not value:
            raise SystemExit(f"usage: python -m harness report [results_dir=DIR]; got '{arg}'")
        results_dir = value
    path = write_report(results_dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
