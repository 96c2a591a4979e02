"""Alternating A/B timing of two mechanisms: ``python -m harness speed compare=A:B [k=v ...]``.

``compare=local:local_attention_peer`` or a list, ``compare=[local:local_attention_peer,
performer:performer_pytorch]``. For every pair, masking (``causal=[false]``) and length
(``lengths=[4096,16384]``), one measurement:

* what is timed: the speed sweep's ``attention`` step (``harness.bench.speed``): one mechanism call
  on q, k, v (B, H, L, D) and the backward pass of <out, g>, the mechanism alone. A and B get
  the *same* q, k, v and g (drawn once from ``seed``), shapes from the scale as in the sweep,
  and a peer gets its counterpart's configuration (``harness.bench.speed.resolve_mechanism_config``);
* order: ``warmup`` untimed rounds, then ``rounds`` timed rounds, each one call of A then
  one of B (A, B, A, B, ...), each call timed alone with ``time.perf_counter`` (bracketed by
  ``torch.cuda.synchronize()`` on CUDA), ``threads=1`` torch thread by default;
* the figure: per round the ratio time(B) / time(A) (> 1: A is faster), their median, a 95%
  bootstrap interval of that median (``bootstrap`` resamples of the rounds, seeded) and the
  min and max over rounds. A and B of one round run a few milliseconds apart, so a change in
  the machine's load hits both; the load average before and after is recorded with them.

Isolation: one fresh process per pair, masking and length (forked from the sweep's clean
forkserver), holding both A and B. Not one process per round: A and B must alternate
closely in time, which a process start between them (and the cold first call of every fresh
process) would defeat; and not one process for everything: a pair's allocations and caches
must not reach the next pair or length. Within the process A and B share the allocator, and
alternation gives each the same state half the time.

Records: ``<results_dir>/speed/compare/<A>-vs-<B>/<noncausal|causal>-L<length>.json`` (``kind: compare``),
always measured anew (a comparison is about the machine now), and a table on stdout.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.bench.speed import (
    IsolatedRunner,
    Job,
    MeasurementTimeout,
    SpeedConfig,
    attention_inputs,
    build_attention_step,
    check_scale,
    hardware,
    limit_address_space,
    plan,
    quantile,
    records_dir,
)
from harness.core.results import last_line, status_of

log = logging.getLogger("harness.bench.compare")

SIDES = ("A", "B")
EXAMPLE = "compare=local:local_attention_peer or compare=[local:local_attention_peer,performer:performer_pytorch]"


@dataclass
class CompareConfig:
    """``python -m harness speed compare=A:B [k=v ...]`` settings."""

    compare: Any = None  # "A:B" or a list of them; the ratio is time(B) / time(A)
    lengths: list[int] = field(default_factory=lambda: [4096, 16384])
    causal: list[bool] = field(default_factory=lambda: [False])  # true needs both mechanisms causal
    rounds: int = 20  # timed rounds, each one call of A then one of B
    warmup: int = 2  # untimed rounds first
    threads: int = 1  # torch threads (0 = torch's default)
    scale: str = "auto"  # the shapes: the scale model's heads and dim / heads, as the sweep
    batch_size: int = 0  # 0 = auto: 1 on CPU, 8 on CUDA
    heads: int = 0  # 0 = the scale model's heads
    dim_head: int = 0  # 0 = the scale model's dim / heads
    mechanism_config: dict[str, Any] = field(default_factory=dict)  # e.g. mechanism_config.local.window=64
    precision: str = "auto"  # as the sweep: auto = the scale's trainer.precision on CUDA, else 32-true
    device: str = "auto"  # auto | cpu | cuda
    timeout_s: float = 600.0  # per pair, masking and length, set-up included
    memory_limit_mb: float = 0.0  # CPU: address-space cap above the child's start; 0 = half the RAM
    bootstrap: int = 2000  # resamples for the 95% interval of the median ratio
    isolate: bool = True  # a fresh process per pair and length (False: in this process, for tests)
    results_dir: str = "results"  # records under <results_dir>/speed/compare/
    seed: int = 0


@dataclass
class PairJob:
    """One comparison: A and B at one masking and length (plain data: crosses a process boundary)."""

    a: Job
    b: Job
    rounds: int
    warmup: int
    timeout_s: float

    @property
    def label(self) -> str:
        return f"compare-{self.a.mechanism}-{self.b.mechanism}-{self.a.length}"


# ----------------------------------------------------------------------------- settings


def parse_pairs(value: Any) -> list[tuple[str, str]]:
    """``"A:B"``, ``"A:B,C:D"`` or a list of ``"A:B"`` -> [(A, B), ...]; a malformed one is refused."""
    if isinstance(value, str):
        items: list[Any] = [x for x in value.strip().strip("[]").split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"compare={value!r} is not A:B; e.g. {EXAMPLE}")
    pairs = []
    for item in items:
        parts = item.split(":") if isinstance(item, str) else []
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"compare: {item!r} is not a pair A:B of mechanism names; e.g. {EXAMPLE}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"compare is empty; e.g. {EXAMPLE}")
    return pairs


def parse_config(argv: list[str]) -> CompareConfig:
    """``k=v`` arguments (the one grammar, ``harness.core.overrides``) -> a CompareConfig with
    ``compare`` as [(A, B), ...] and both names registered; a UsageError otherwise."""
    from harness.bench.speed import REFUSED
    from harness.core.overrides import UsageError, parse
    from harness.core.registry import discover

    cfg = parse(CompareConfig, argv, command="speed compare", refused=REFUSED)
    try:
        cfg.compare = parse_pairs(cfg.compare)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.rounds < 1 or cfg.warmup < 0:
        raise UsageError(f"compare needs rounds >= 1 and warmup >= 0; got rounds={cfg.rounds}, warmup={cfg.warmup}")
    check_scale(cfg.scale)
    discover()
    try:
        check_pairs(cfg.compare, cfg.causal)  # unknown names (did you mean), missing capabilities: one line
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return cfg


def check_pairs(pairs: list[tuple[str, str]], causal_flags: list[bool]) -> None:
    """Every name registered (else the valid ones, closest first) and able to run every masking asked."""
    from harness.core.registry import UnknownNameError, get_mechanism

    for name in dict.fromkeys(n for pair in pairs for n in pair):
        try:
            spec = get_mechanism(name)
        except UnknownNameError as exc:  # a KeyError: its one line, as a ValueError of the command
            raise ValueError(f"compare: {exc.args[0]}") from None
        if any(causal_flags) and not spec.capabilities.causal:
            raise ValueError(
                f"compare: mechanism '{name}' has no causal capability; drop causal=true "
                f"(causal=[false]) or compare mechanisms that support it"
            )


def plan_pairs(cfg: CompareConfig) -> tuple[list[PairJob], dict[str, Any]]:
    """Every comparison, in order (pair, masking, length), with the sweep's settings resolution."""
    pairs = cfg.compare if cfg.compare and isinstance(cfg.compare[0], tuple) else parse_pairs(cfg.compare)
    causal_flags = cfg.causal if isinstance(cfg.causal, (list, tuple)) else [cfg.causal]
    check_pairs(pairs, causal_flags)
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    sweep = SpeedConfig(
        mechanisms=names,
        lengths=list(cfg.lengths),
        modes=["attention"],
        causal=list(causal_flags),
        scale=cfg.scale,
        mechanism_config=dict(cfg.mechanism_config),
        batch_size=cfg.batch_size,
        heads=cfg.heads,
        dim_head=cfg.dim_head,
        precision=cfg.precision,
        device=cfg.device,
        threads=cfg.threads,
        warmup=cfg.warmup,
        min_reps=1,
        max_reps=1,
        timeout_s=cfg.timeout_s,
        memory_limit_mb=cfg.memory_limit_mb,
        seed=cfg.seed,
    )
    jobs, shared = plan(sweep)
    by_key = {(j.mechanism, j.causal, j.length): j for j in jobs}
    pair_jobs = [
        PairJob(
            a=by_key[(a, bool(causal), int(length))],
            b=by_key[(b, bool(causal), int(length))],
            rounds=cfg.rounds,
            warmup=cfg.warmup,
            timeout_s=cfg.timeout_s,
        )
        for a, b in pairs
        for causal in causal_flags
        for length in sorted(int(x) for x in cfg.lengths)
    ]
    return pair_jobs, shared


# ----------------------------------------------------------------------------- the measurement (child side)


def alternation(rounds: int, warmup: int) -> list[tuple[str, bool]]:
    """The order of calls: (side, timed) — ``warmup`` untimed rounds, then ``rounds`` timed
    ones, each round A then B."""
    return [(side, False) for _ in range(warmup) for side in SIDES] + [
        (side, True) for _ in range(rounds) for side in SIDES
    ]


def measure_pair(pair: PairJob, *, limit_memory: bool = False) -> dict[str, Any]:
    """Build A and B on the same inputs and time them alternately in this process; never raises."""
    import torch

    from harness.core.registry import discover

    started = time.perf_counter()
    outcome: dict[str, Any] = {"status": "failed", "error": None, "pid": os.getpid()}
    threads_before = torch.get_num_threads()
    stage = "set-up"
    try:
        discover(extra_paths=(pair.a.plugin_dirs + pair.b.plugin_dirs) or None)
        if pair.a.threads:
            torch.set_num_threads(pair.a.threads)
        outcome["threads"] = torch.get_num_threads()
        device = torch.device("cuda" if pair.a.device == "cuda" else "cpu")
        if limit_memory and device.type == "cpu":
            limit_address_space(pair.a.memory_limit_mb)
        torch.manual_seed(pair.a.seed)
        inputs = attention_inputs(pair.a, device)  # one q, k, v, g for both sides
        steps = {}
        for side, job in zip(SIDES, (pair.a, pair.b)):
            stage = f"{side} ({job.mechanism})"
            torch.manual_seed(job.seed)  # the same parameter draw as a sweep measurement of it
            steps[side], _ = build_attention_step(job, device, inputs=inputs)

        def call(step) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        sequence: list[tuple[str, float]] = []  # every timed call, in the order it ran
        order = alternation(pair.rounds, pair.warmup)
        last: dict[str, float] = {}
        for index, (side, timed) in enumerate(order):
            stage = f"{side} ({(pair.a if side == 'A' else pair.b).mechanism})"
            last[side] = call(steps[side])
            if timed:
                sequence.append((side, last[side]))
            if side == "B" and not timed and index == 2 * pair.warmup - 1 and pair.timeout_s:
                projected = time.perf_counter() - started + pair.rounds * (last["A"] + last["B"])
                if projected > pair.timeout_s:
                    raise MeasurementTimeout(
                        f"a warm-up round took {last['A'] + last['B']:.1f}s: {pair.rounds} rounds "
                        f"would end at {projected:.0f}s > timeout_s={pair.timeout_s:g}"
                    )
        outcome.update(status="ok", sequence=sequence)
    except Exception as exc:  # recorded: the other comparisons go on
        outcome.update(status=status_of(exc), error=f"{stage}: {last_line(exc)}")
    finally:
        torch.set_num_threads(threads_before)
    outcome["wall_s"] = round(time.perf_counter() - started, 3)
    return outcome


# ----------------------------------------------------------------------------- the arithmetic


def paired_ratios(sequence: list[tuple[str, float]]) -> list[float]:
    """time(B) / time(A) per round of an A, B, A, B, ... sequence of (side, seconds)."""
    sides = [side for side, _ in sequence]
    if sides != [SIDES[i % 2] for i in range(len(sides))] or len(sides) % 2:
        raise ValueError(f"not an A, B, A, B, ... sequence: {''.join(sides)}")
    return [b / a for (_, a), (_, b) in zip(sequence[0::2], sequence[1::2])]


def summarize_ratios(ratios: list[float], *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Median of the per-round ratios, its 95% bootstrap interval (percentile, seeded), min, max."""
    if not ratios:
        raise ValueError("no rounds to summarize")
    rng = random.Random(seed)
    medians = [statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)]
    low, high = (quantile(medians, 0.025), quantile(medians, 0.975)) if medians else (min(ratios), max(ratios))
    return {
        "median": statistics.median(ratios),
        "ci95": [low, high],
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "bootstrap_resamples": resamples,
    }


def _times(values: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


# ----------------------------------------------------------------------------- running and recording


def record_path(out: str | Path, pair: PairJob) -> Path:
    masking = "causal" if pair.a.causal else "noncausal"
    return Path(out) / "compare" / f"{pair.a.mechanism}-vs-{pair.b.mechanism}" / f"{masking}-L{pair.a.length}.json"


def make_record(
    pair: PairJob,
    outcome: dict[str, Any],
    env: dict[str, Any],
    *,
    isolated: bool,
    bootstrap: int,
    load: dict[str, list[float]],
) -> dict[str, Any]:
    a, b = pair.a, pair.b
    sequence = outcome.get("sequence") or []
    ok = outcome.get("status") == "ok"
    dtype = {"32-true": "float32", "bf16-mixed": "bfloat16 autocast", "16-mixed": "float16 autocast"}[a.precision]
    sync = "torch.cuda.synchronize() around each call; " if a.device == "cuda" else ""
    return {
        "kind": "compare",
        "a": a.mechanism,
        "b": b.mechanism,
        "a_config": a.mechanism_config,
        "b_config": b.mechanism_config,
        "b_peer_of": b.peer_of,
        "a_peer_of": a.peer_of,
        "mode": "attention",
        "causal": a.causal,
        "length": a.length,
        "batch_size": a.batch_size,
        "heads": a.heads,
        "dim_head": a.dim_head,
        "precision": a.precision,
        "dtype": dtype,
        "device": a.device,
        "threads": outcome.get("threads") or a.threads,
        "status": outcome.get("status", "failed"),
        "error": outcome.get("error"),
        "ratio": summarize_ratios(paired_ratios(sequence), resamples=bootstrap, seed=a.seed) if ok else None,
        "time_a_s": _times([t for s, t in sequence if s == "A"]) if ok else None,
        "time_b_s": _times([t for s, t in sequence if s == "B"]) if ok else None,
        "sequence": [[s, t] for s, t in sequence],
        "method": {
            "timed": "one mechanism call on q, k, v (B, H, L, D) plus the backward pass of <out, g>; the same q, k, v, "
            "g for A and B",
            "order": f"{pair.warmup} untimed round(s), then {pair.rounds} timed rounds, each A then B; {sync}"
            "time.perf_counter per call",
            "ratio": "per round time(B) / time(A); median over rounds, 95% percentile-bootstrap interval of the "
            "median, min and max",
            "isolation": "a fresh forked process per pair, masking and length, holding both"
            if isolated
            else "in the calling process",
            "rounds": pair.rounds,
            "warmup": pair.warmup,
            "timeout_s": pair.timeout_s,
        },
        "load_average": load,  # 1, 5, 15-minute load averages before and after: was the machine shared?
        "env": env,
        "wall_s": outcome.get("wall_s"),
        "pid": outcome.get("pid"),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Measure every comparison of the plan, write its record; return the records."""
    from harness.core.registry import discover, mechanism_modules, plugin_errors
    from harness.core.results import environment, write_json_atomic

    discover()
    for plugin, error in plugin_errors().items():
        log.warning("plugin %s failed to load: %s", plugin, error)
    pairs, shared = plan_pairs(cfg)
    env = {**environment(), "hardware": hardware(shared["device"])}
    if cfg.isolate:
        preload = mechanism_modules(plugins=False)
        runner = IsolatedRunner(["harness.bench.compare", *preload], measure_job=measure_pair)
        run: Callable[[PairJob], dict[str, Any]] = runner.run
    else:
        run = measure_pair
    log.info(
        "compare: %d comparison(s) on %s (%s, %s), batch %d, %d heads × %d dims, %d thread(s), %d rounds A,B "
        "after %d warm-up -> %s",
        len(pairs),
        env["hardware"].get("gpu") or env["hardware"]["cpu"],
        shared["device"],
        shared["precision"],
        shared["batch_size"],
        shared["heads"],
        shared["dim_head"],
        cfg.threads,
        cfg.rounds,
        cfg.warmup,
        records_dir(cfg) / "compare",
    )
    records = []
    for pair in pairs:
        before = _load_average()
        outcome = run(pair)
        load = {"before": before, "after": _load_average()}
        record = make_record(pair, outcome, env, isolated=cfg.isolate, bootstrap=cfg.bootstrap, load=load)
        write_json_atomic(record_path(records_dir(cfg), pair), record)
        log.info("%s", _one_line(record))
        records.append(record)
    return records


def _one_line(r: dict[str, Any]) -> str:
    head = f"{r['a']} vs {r['b']} {'causal' if r['causal'] else 'bidir'} L={r['length']}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}: {r['error']}"
    ratio = r["ratio"]
    return f"{head}: time B/A {ratio['median']:.3f} (95% {ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f})"


def table(records: list[dict[str, Any]]) -> str:
    """The comparisons as a text table (ratio > 1: A is faster)."""
    from tabulate import tabulate

    rows = []
    for r in records:
        head = [r["a"], r["b"], "causal" if r["causal"] else "bidir", r["length"]]
        if r["status"] != "ok":
            rows.append([*head, "", "", "", f"{r['status']}: {r['error']}", "", ""])
            continue
        ratio, load = r["ratio"], r.get("load_average") or {}
        rows.append(
            [
                *head,
                1e3 * r["time_a_s"]["median"],
                1e3 * r["time_b_s"]["median"],
                ratio["rounds"],
                f"{ratio['median']:.3f}",
                f"{ratio['ci95'][0]:.3f}–{ratio['ci95'][1]:.3f}",
                f"{ratio['min']:.3f}–{ratio['max']:.3f}",
                f"{(load.get('before') or ['?'])[0]}→{(load.get('after') or ['?'])[0]}",
            ]
        )
    headers = [
        "A",
        "B",
        "masking",
        "L",
        "A ms (median)",
        "B ms (median)",
        "rounds",
        "B/A median",
        "95% CI",
        "min–max",
        "load 1 min",
    ]
    return tabulate(rows, headers=headers, floatfmt=".2f", tablefmt="simple")


def main(argv: list[str]) -> int:
    """The comparison; exit 1 when any pair did not finish ok."""
    from harness.core.overrides import UsageError

    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        records = run_compare(cfg)
    except (ValueError, KeyError) as exc:  # missing capabilities, bad settings: one line
        raise UsageError(str(exc).strip("'\"")) from None
    print(table(records))
    print("B/A = time(B) / time(A) per round, median over rounds: > 1 means A is faster.")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
