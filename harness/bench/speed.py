"""Speed and memory benchmark: ``python -m harness speed [k=v ...]`` (``make speed``).

For every mechanism (``mechanisms=all`` or ``mechanisms=[softmax,performer]``), sequence
length (``lengths=[256,...,16384]``), mode and masking (causal where the mechanism supports
it), one *measurement*:

* ``attention``: one mechanism call on q, k, v of shape (B, H, L, D) and the backward pass
  of <out, g> (a fixed random g), no projections: the mechanism alone.
* ``train_step``: one training step of the ``scale`` model (embeddings, ``depth`` blocks,
  head) on random tokens: forward + backward + gradient clipping + AdamW. Non-causal: the
  classifier head; causal: the language-model head.

Method (printed with the results, recorded in every record): ``warmup`` untimed
iterations, then timed iterations — at least ``min_reps``, more until ``min_time_s`` of
timed work or ``max_reps`` — each bracketed by ``torch.cuda.synchronize()`` on CUDA and
timed with ``time.perf_counter``; the median and inter-quartile range of the per-iteration
times; tokens/s = B·L / median. Peak memory: on CUDA ``max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the process's peak resident set (VmHWM, reset through
``/proc/self/clear_refs``) above its resident set before the model and inputs were built.
Every measurement runs in a fresh process forked from a clean server that has imported
torch and the mechanisms and run nothing (``multiprocessing`` forkserver), so no
measurement can pollute another's allocator, caches or peak.

A measurement that raises out-of-memory (on CPU the child's address space is capped at
``memory_limit_mb`` above its start, so the machine never swaps) is recorded ``oom``; one
that runs past ``timeout_s`` is killed (or stopped early when its warm-up already shows it
cannot finish) and recorded ``timeout``; the longer lengths of that mechanism, mode and
masking are then recorded ``skipped``. Other errors are ``failed``. The sweep always goes on.

Records: ``<results_dir>/speed/<mode>/<mechanism>/<noncausal|causal>-L<length>.json`` with the hardware,
torch version, threads, dtype and method. Resumable: a record measured with the same
settings is kept (``rerun=failed`` redoes failed ones, ``rerun=all`` everything; a
``timeout``/``oom`` is redone when the limit was raised). Peer implementations (a
mechanism class with ``peer_of = "<ours>"``) run with our counterpart's configuration on the
fields they share, right after it at every length, so both see the same machine state.

A sweep runs exactly what was asked: the listed mechanisms (no peers or baselines are
added), lengths, modes and maskings, and nothing else. The harness's own overhead
(``harness.bench.overhead``) runs only when asked: ``python -m harness speed overhead [k=v ...]``
runs it alone, ``overhead=true`` runs it after the sweep. ``python -m harness speed
compare=A:B [k=v ...]`` times two mechanisms against each other instead, in alternating
rounds (``harness.bench.compare``).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.core.labels import softmax_first
from harness.core.memory import current_memory_mb, peak_memory_mb, proc_status_kb, reset_peak_memory, total_memory_mb
from harness.core.results import last_line, status_of

log = logging.getLogger("harness.bench.speed")

MODES = ("attention", "train_step")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
FINISHED_STATUSES = ("ok", "failed", "oom", "timeout")  # "skipped" is always re-evaluated
STOPPING_STATUSES = ("oom", "timeout")  # longer lengths of the same series are skipped
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
VOCAB_SIZE = 256  # byte-level tokens, as LRA's text task (whose lengths the speed table used)
NUM_CLASSES = 2


@dataclass
class SpeedConfig:
    """``python -m harness speed`` settings (``k=v`` on the command line)."""

    mechanisms: Any = "all"  # "all" (every registered mechanism, peers included) or a list of names
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    causal: list[bool] = field(default_factory=lambda: [False, True])  # causal only where supported
    scale: str = "auto"  # model of the train_step mode: harness/conf/scale/<scale>.yaml; auto = lra on CUDA, else small
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the scale's model, e.g. model.dim=128
    mechanism_config: dict[str, Any] = field(default_factory=dict)  # e.g. mechanism_config.performer.num_features=128
    batch_size: int = 0  # 0 = auto: 1 on CPU, 8 on CUDA
    heads: int = 0  # attention mode; 0 = the scale model's heads
    dim_head: int = 0  # attention mode; 0 = the scale model's dim / heads
    precision: str = (
        "auto"  # 32-true | bf16-mixed | 16-mixed; auto = the scale's trainer.precision on CUDA, else 32-true
    )
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads in each measurement; 0 = torch's default
    warmup: int = 1  # untimed iterations first
    min_reps: int = 2  # timed iterations, at least
    max_reps: int = 20  # timed iterations, at most
    min_time_s: float = 1.0  # keep timing (up to max_reps) until this much timed work
    timeout_s: float = 45.0  # per measurement, set-up included; past it: "timeout"
    memory_limit_mb: float = 0.0  # CPU: address-space cap above the child's start; 0 = auto (half the RAM)
    isolate: bool = True  # a fresh process per measurement (False: in this process, for tests)
    results_dir: str = "results"  # records under <results_dir>/speed/
    rerun: str = "none"  # none | failed | all
    overhead: bool = False  # also run harness.bench.overhead after the sweep (only when asked)
    progress: bool = True
    seed: int = 0


@dataclass
class Job:
    """One measurement, everything the child needs (plain data: it crosses a process boundary)."""

    mechanism: str
    mechanism_config: dict[str, Any]
    peer_of: str | None
    mode: str
    causal: bool
    length: int
    batch_size: int
    heads: int
    dim_head: int
    model: dict[str, Any]
    optimizer: dict[str, float]
    precision: str
    device: str
    threads: int
    warmup: int
    min_reps: int
    max_reps: int
    min_time_s: float
    timeout_s: float
    memory_limit_mb: float
    seed: int
    plugin_dirs: list[str] = field(default_factory=list)

    @property
    def series(self) -> tuple[str, str, bool]:
        return self.mechanism, self.mode, self.causal

    @property
    def label(self) -> str:
        return f"speed-{self.mechanism}-{self.mode}-{self.length}"

    def settings_key(self, env_device: str, torch_version: str) -> str:
        """Hash of everything that determines the numbers (limits excluded: they decide only
        whether a measurement finishes)."""
        settings = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("timeout_s", "memory_limit_mb", "plugin_dirs")
        }
        blob = json.dumps({**settings, "device_name": env_device, "torch": torch_version}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MeasurementTimeout(TimeoutError):
    """The measurement cannot finish within timeout_s."""

    status = "timeout"  # harness.core.results.status_of


# ============================================================================= the measurement (child side)


class PeakMemory:
    """Peak memory of this process above a baseline (``harness.core.memory``): CUDA max
    allocated, or CPU peak RSS."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0.0
        self.method = ""

    def start(self) -> None:
        import torch

        gc.collect(0)  # young garbage only: a full collection of torch's object graph takes ~0.3 s
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            _release_free_heap()
        before = "memory allocated" if self.device == "cuda" else "the RSS"
        self.method = f"{reset_peak_memory(self.device)} minus {before} before model and inputs"
        self.baseline = current_memory_mb(self.device)

    def peak_mb(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        return max(0.0, peak_memory_mb(self.device) - self.baseline)


def _release_free_heap() -> None:
    """Return freed heap to the OS (glibc), so an in-process baseline is not inflated."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def limit_address_space(limit_mb: float) -> None:
    """Cap this process's address space at its current size + limit_mb (CPU only): an
    allocation past it raises instead of driving the machine into swap or the OOM killer."""
    if limit_mb <= 0:
        return
    current = (proc_status_kb("VmSize") or 0.0) * 1024
    cap = int(current + limit_mb * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _autocast_dtype(precision: str):
    import torch

    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def attention_inputs(job: Job, device) -> tuple:
    """q, k, v (B, H, L, D), requiring grad, and the output gradient g, drawn from torch's RNG."""
    import torch

    dtype = _autocast_dtype(job.precision) or torch.float32
    shape = (job.batch_size, job.heads, job.length, job.dim_head)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(shape, device=device, dtype=dtype)


def build_attention_step(job: Job, device, inputs: tuple | None = None):
    """The mechanism alone: forward on (B, H, L, D) q, k, v, backward of <out, g> (``inputs``:
    the q, k, v, g to use, e.g. the same ones for both sides of a comparison; None: drawn
    after the mechanism is built)."""
    import torch

    from harness.core.attention import AttentionContext
    from harness.core.registry import create_mechanism

    mech = create_mechanism(
        job.mechanism, heads=job.heads, dim_head=job.dim_head, max_len=job.length, **job.mechanism_config
    ).to(device)
    mech.train()
    q, k, v, grad_out = attention_inputs(job, device) if inputs is None else inputs
    positions = torch.arange(job.length, device=device).expand(job.batch_size, job.length)
    context = AttentionContext(positions=positions)
    autocast = _autocast_dtype(job.precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = mech(q, k, v, causal=job.causal, context=context)
            loss = (out.float() * grad_out.float()).sum()
            if mech.aux_loss is not None:
                loss = loss + mech.aux_loss.float()
        loss.backward()
        for x in (q, k, v):
            x.grad = None
        mech.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in mech.parameters() if p.requires_grad)
    return step, params


def _build_train_step(job: Job, device):
    """The scale model: forward + backward + grad clip + AdamW step on random tokens."""
    import torch

    from harness.train.model import ClassifierHead, Encoder, LanguageModelHead, ModelConfig, count_parameters

    cfg = ModelConfig(**job.model)
    encoder = Encoder(
        cfg, vocab_size=VOCAB_SIZE, max_len=job.length, mechanism=job.mechanism, mechanism_cfg=job.mechanism_config
    )
    model = (LanguageModelHead(encoder, VOCAB_SIZE) if job.causal else ClassifierHead(encoder, NUM_CLASSES)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=job.optimizer["lr"], weight_decay=job.optimizer["weight_decay"], betas=(0.9, 0.98)
    )
    batch = {
        "input_ids": torch.randint(1, VOCAB_SIZE, (job.batch_size, job.length), device=device),
        "padding_mask": torch.zeros(job.batch_size, job.length, dtype=torch.bool, device=device),
        "label": torch.randint(0, NUM_CLASSES, (job.batch_size,), device=device),
    }
    autocast = _autocast_dtype(job.precision)
    grad_clip = job.optimizer.get("grad_clip", 0.0)
    scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(batch)
            loss, _ = model.loss(logits, batch)
            aux = model.encoder.aux_loss()
            if aux is not None:
                loss = loss + aux
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, count_parameters(model)


def time_iterations(step, job: Job, device, started: float) -> list[float]:
    """Warm-up, then timed iterations (see the module docstring); raises MeasurementTimeout
    as soon as the warm-up shows that ``min_reps`` timed iterations cannot fit."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one() -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    longest = 0.0
    for _ in range(job.warmup):
        longest = max(longest, one())
        projected = time.perf_counter() - started + job.min_reps * longest
        if job.timeout_s and projected > job.timeout_s:
            raise MeasurementTimeout(
                f"warm-up iteration took {longest:.1f}s: {job.min_reps} timed iterations would end at "
                f"{projected:.0f}s > timeout_s={job.timeout_s:g}"
            )
    times: list[float] = []
    while len(times) < job.max_reps and (len(times) < job.min_reps or sum(times) < job.min_time_s):
        times.append(one())
        elapsed = time.perf_counter() - started
        if len(times) >= job.min_reps and job.timeout_s and elapsed + statistics.median(times) > job.timeout_s:
            break  # enough reps; another one would cross the limit
        if len(times) < job.min_reps and job.timeout_s and elapsed > job.timeout_s:
            raise MeasurementTimeout(f"{len(times)} of {job.min_reps} timed iterations after {elapsed:.0f}s")
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(job: Job, *, limit_memory: bool = False) -> dict[str, Any]:
    """Run one measurement in this process; returns its outcome (never raises)."""
    import torch

    from harness.core.registry import discover

    started = time.perf_counter()
    outcome: dict[str, Any] = {"status": "failed", "error": None, "pid": os.getpid()}
    threads_before = torch.get_num_threads()
    try:
        discover(extra_paths=job.plugin_dirs or None)
        if job.threads:
            torch.set_num_threads(job.threads)
        outcome["threads"] = torch.get_num_threads()
        device = torch.device("cuda" if job.device == "cuda" else "cpu")
        if limit_memory and device.type == "cpu":
            limit_address_space(job.memory_limit_mb)
        torch.manual_seed(job.seed)
        memory = PeakMemory(device.type)
        memory.start()
        build = build_attention_step if job.mode == "attention" else _build_train_step
        step, params = build(job, device)
        times = time_iterations(step, job, device, started)
        median = statistics.median(times)
        outcome.update(
            status="ok",
            params=params,
            time_s={
                "median": median,
                "iqr": quantile(times, 0.75) - quantile(times, 0.25),
                "min": min(times),
                "max": max(times),
                "reps": len(times),
                "times": times,
            },
            step_time_s=median,
            tokens_per_s=job.batch_size * job.length / median,
            peak_memory_mb=round(memory.peak_mb(), 2),
            memory_method=memory.method,
        )
    except Exception as exc:  # recorded, never lost: the sweep goes on
        outcome.update(status=status_of(exc), error=last_line(exc))
    finally:
        torch.set_num_threads(threads_before)  # in-process runs leave the caller as they found it
    outcome["wall_s"] = round(time.perf_counter() - started, 3)
    return outcome


def _child_main(measure_job, job, conn) -> None:
    """Entry point of a forked measurement process: ``measure_job(job, limit_memory=True)``
    (``measure`` here, ``compare.measure_pair`` for a comparison), send the outcome, exit."""
    try:
        conn.send(measure_job(job, limit_memory=True))
    finally:
        conn.close()


# ============================================================================= running measurements (parent side)


class IsolatedRunner:
    """One fresh process per measurement, forked from a forkserver that has imported torch
    and every mechanism module but computed nothing (so forking is cheap and safe)."""

    def __init__(self, preload: list[str], measure_job=None):
        import multiprocessing as mp

        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "harness.train.model", "harness.bench.speed", *preload])
        self.measure_job = measure_job or measure  # (job, limit_memory=) -> outcome; module-level, picklable

    def run(self, job) -> dict[str, Any]:
        """``job``: a Job, or a PairJob for ``measure_job=compare.measure_pair`` (both have timeout_s and label)."""
        receive, send = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=_child_main, args=(self.measure_job, job, send), daemon=True, name=job.label)
        started = time.perf_counter()
        process.start()
        send.close()
        grace = 2.0  # set-up of the process itself (the child stops itself at timeout_s)
        outcome = None
        try:
            if receive.poll(job.timeout_s + grace if job.timeout_s else None):
                outcome = receive.recv()
        except EOFError:  # the child died without a word
            outcome = None
        finally:
            receive.close()
        if outcome is None and process.is_alive():
            process.kill()
            process.join()
            return {
                "status": "timeout",
                "error": f"killed after timeout_s={job.timeout_s:g}s",
                "wall_s": round(time.perf_counter() - started, 3),
            }
        process.join()
        if outcome is None:
            code = process.exitcode
            killed = code is not None and code < 0 and -code == 9
            return {
                "status": "oom" if killed else "failed",
                "error": "killed by SIGKILL (the kernel's out-of-memory killer)"
                if killed
                else f"measurement process exited with code {code} and no result",
                "wall_s": round(time.perf_counter() - started, 3),
            }
        return outcome


class InProcessRunner:
    """Measurements in this process (tests; not isolated: the allocator is shared)."""

    def run(self, job: Job) -> dict[str, Any]:
        return measure(job, limit_memory=False)


# ============================================================================= planning the sweep


def hardware(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gb": round(total_memory_mb() / 1024, 1),
        "torch_threads_default": torch.get_num_threads(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def scale_settings(scale: str) -> dict[str, Any]:
    """The contents of ``harness/conf/scale/<scale>.yaml`` (ValueError naming the valid scales)."""
    from harness.train.config import load_conf

    return load_conf("scale", scale)


def ordered_mechanisms(names: list[str]) -> list[str]:
    """softmax first, then ours alphabetically, each peer right after its counterpart."""
    from harness.core.registry import get_mechanism

    peer_of = {n: getattr(get_mechanism(n).cls, "peer_of", None) for n in names}
    ours = softmax_first(n for n in names if not peer_of[n] or peer_of[n] not in names)
    out = []
    for name in ours:
        out.append(name)
        out += sorted(p for p in names if peer_of[p] == name)
    return out


def resolve_mechanism_config(name: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The full config of a mechanism as measured; a peer takes its counterpart's values on
    the fields both have (equal settings), then its own overrides."""
    from harness.core.registry import build_config, get_mechanism

    spec = get_mechanism(name)
    peer_of = getattr(spec.cls, "peer_of", None)
    values: dict[str, Any] = {}
    if peer_of:
        ours, _ = resolve_mechanism_config(peer_of, overrides)
        fields = {f.name for f in dataclasses.fields(spec.config_class)}
        values = {k: v for k, v in ours.items() if k in fields}
    values.update(dict(overrides.get(name) or {}))
    cfg = build_config(spec.config_class, values, what=f"mechanism '{name}'")
    return dataclasses.asdict(cfg), peer_of


def plan(cfg: SpeedConfig) -> tuple[list[Job], dict[str, Any]]:
    """Every measurement of the sweep, in order (mode, masking, length, mechanism), and the
    settings shared by all of them."""
    import torch

    from harness.core.registry import get_mechanism, list_mechanisms

    if cfg.rerun not in ("none", "failed", "all"):
        raise ValueError(f"rerun='{cfg.rerun}'; valid: none, failed, all")
    unknown_modes = [m for m in cfg.modes if m not in MODES]
    if unknown_modes:
        raise ValueError(f"unknown mode(s) {unknown_modes}; valid: {', '.join(MODES)}")
    names = list_mechanisms() if cfg.mechanisms in ("all", ["all"], None) else list(cfg.mechanisms)
    for name in names:
        get_mechanism(name)  # unknown -> the list of registered ones
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device='{cfg.device}'; valid: auto, cpu, cuda")
    scale = ("lra" if device == "cuda" else "small") if cfg.scale == "auto" else cfg.scale
    settings = scale_settings(scale)
    model = {**settings.get("model", {}), **dict(cfg.model)}
    from harness.train.model import ModelConfig

    model = dataclasses.asdict(ModelConfig(**model))  # validates
    train = settings.get("train", {})
    optimizer = {
        "lr": float(train.get("lr", 1e-3)),
        "weight_decay": float(train.get("weight_decay", 0.01)),
        "grad_clip": float(train.get("grad_clip", 1.0)),
    }
    precision = cfg.precision
    if precision == "auto":
        precision = settings.get("trainer", {}).get("precision", "32-true") if device == "cuda" else "32-true"
    if precision not in PRECISIONS:
        raise ValueError(f"precision='{precision}'; valid: auto, {', '.join(PRECISIONS)}")
    heads = cfg.heads or model["heads"]
    dim_head = cfg.dim_head or model["dim"] // model["heads"]
    batch = cfg.batch_size or (8 if device == "cuda" else 1)
    memory_limit = cfg.memory_limit_mb or round(total_memory_mb() / 2)
    causal_flags = cfg.causal if isinstance(cfg.causal, (list, tuple)) else [cfg.causal]
    mech_overrides = dict(cfg.mechanism_config)
    jobs = []
    for mode in cfg.modes:
        for causal in causal_flags:
            for length in sorted(int(x) for x in cfg.lengths):
                for name in ordered_mechanisms(names):
                    spec = get_mechanism(name)
                    if causal and not spec.capabilities.causal:
                        continue
                    mech_cfg, peer_of = resolve_mechanism_config(name, mech_overrides)
                    jobs.append(
                        Job(
                            mechanism=name,
                            mechanism_config=mech_cfg,
                            peer_of=peer_of,
                            mode=mode,
                            causal=bool(causal),
                            length=length,
                            batch_size=batch,
                            heads=heads,
                            dim_head=dim_head,
                            model=model,
                            optimizer=optimizer,
                            precision=precision,
                            device=device,
                            threads=cfg.threads,
                            warmup=cfg.warmup,
                            min_reps=cfg.min_reps,
                            max_reps=max(cfg.max_reps, cfg.min_reps),
                            min_time_s=cfg.min_time_s,
                            timeout_s=cfg.timeout_s,
                            memory_limit_mb=memory_limit,
                            seed=cfg.seed,
                            plugin_dirs=_plugin_dirs(spec),
                        )
                    )
    shared = {
        "scale": scale,
        "device": device,
        "precision": precision,
        "batch_size": batch,
        "heads": heads,
        "dim_head": dim_head,
        "model": model,
        "optimizer": optimizer,
        "memory_limit_mb": memory_limit,
    }
    return jobs, shared


def _plugin_dirs(spec) -> list[str]:
    """A mechanism loaded from a plugin file is loaded again from its folder in the child."""
    module = sys.modules.get(spec.module)
    file = getattr(module, "__file__", None) if module is not None else None
    if spec.module.startswith("harness_plugin_") and file:
        return [str(Path(file).parent)]
    return []


def record_path(out: str | Path, job: Job) -> Path:
    masking = "causal" if job.causal else "noncausal"
    return Path(out) / job.mode / job.mechanism / f"{masking}-L{job.length}.json"


def method_description(job: Job, isolated: bool) -> dict[str, Any]:
    what = (
        "one mechanism call on q, k, v (B, H, L, D) plus the backward pass of <out, g>"
        if job.mode == "attention"
        else "one training step of the scale model on random tokens: forward, backward, gradient clipping, AdamW "
        f"({'language-model head' if job.causal else 'classifier head'})"
    )
    sync = "torch.cuda.synchronize() around each iteration; " if job.device == "cuda" else ""
    return {
        "timed": what,
        "timing": f"{job.warmup} untimed warm-up iteration(s), then >= {job.min_reps} timed iterations (up to "
        f"{job.max_reps}, until {job.min_time_s:g}s of timed work); {sync}time.perf_counter per iteration; "
        "median and inter-quartile range",
        "isolation": "a fresh forked process per measurement (forkserver)" if isolated else "in the calling process",
        "warmup": job.warmup,
        "min_reps": job.min_reps,
        "max_reps": job.max_reps,
        "min_time_s": job.min_time_s,
        "timeout_s": job.timeout_s,
        "memory_limit_mb": job.memory_limit_mb if job.device == "cpu" else None,
    }


def make_record(job: Job, outcome: dict[str, Any], env: dict[str, Any], isolated: bool) -> dict[str, Any]:
    import torch

    dtype = {"32-true": "float32", "bf16-mixed": "bfloat16 autocast", "16-mixed": "float16 autocast"}[job.precision]
    record = {
        "kind": "speed",
        "mechanism": job.mechanism,
        "mechanism_config": job.mechanism_config,
        "peer_of": job.peer_of,
        "mode": job.mode,
        "causal": job.causal,
        "length": job.length,
        "batch_size": job.batch_size,
        "heads": job.heads,
        "dim_head": job.dim_head,
        "model": job.model if job.mode == "train_step" else None,
        "optimizer": job.optimizer if job.mode == "train_step" else None,
        "precision": job.precision,
        "dtype": dtype,
        "status": outcome.get("status", "failed"),
        "error": outcome.get("error"),
        "params": outcome.get("params"),
        "tokens_per_s": outcome.get("tokens_per_s"),
        "step_time_s": outcome.get("step_time_s"),
        "time_s": outcome.get("time_s"),
        "peak_memory_mb": outcome.get("peak_memory_mb"),
        "threads": outcome.get("threads") or job.threads or torch.get_num_threads(),
        "wall_s": outcome.get("wall_s"),
        "pid": outcome.get("pid"),
        "method": {**method_description(job, isolated), "memory": outcome.get("memory_method")},
        "env": env,
        "settings_key": job.settings_key(env.get("device", ""), torch.__version__),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return record


def needs_measurement(existing: dict[str, Any] | None, job: Job, key: str, rerun: str) -> bool:
    if existing is None or rerun == "all" or existing.get("settings_key") != key:
        return True
    status = existing.get("status")
    if status not in FINISHED_STATUSES:
        return True
    if rerun == "failed" and status != "ok":
        return True
    limits = existing.get("method") or {}
    if status == "timeout" and job.timeout_s > (limits.get("timeout_s") or 0):
        return True
    if status == "oom" and job.device == "cpu" and job.memory_limit_mb > (limits.get("memory_limit_mb") or 0):
        return True
    return False


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_sweep(cfg: SpeedConfig) -> list[dict[str, Any]]:
    """Measure every job of the plan (skipping recorded ones); return all records."""
    import torch

    from harness.core.registry import discover, mechanism_modules, plugin_errors
    from harness.core.results import environment, write_json_atomic

    discover()
    for plugin, error in plugin_errors().items():
        log.warning("plugin %s failed to load: %s", plugin, error)
    jobs, shared = plan(cfg)
    env = {**environment(), "hardware": hardware(shared["device"])}
    preload = mechanism_modules(plugins=False)
    runner = IsolatedRunner(preload) if cfg.isolate else InProcessRunner()
    stopped: dict[tuple[str, str, bool], tuple[str, int]] = {}  # series -> (status, length) of its oom/timeout
    records = []
    log.info(
        "speed sweep: %d measurements on %s (%s, %s), batch %d, %d heads × %d dims, scale %s -> %s",
        len(jobs),
        env["hardware"].get("gpu") or env["hardware"]["cpu"],
        shared["device"],
        shared["precision"],
        shared["batch_size"],
        shared["heads"],
        shared["dim_head"],
        shared["scale"],
        records_dir(cfg),
    )
    bar = _progress(len(jobs), cfg.progress)
    counts: dict[str, int] = {}
    try:
        for job in jobs:
            path = record_path(records_dir(cfg), job)
            key = job.settings_key(env.get("device", ""), torch.__version__)
            label = f"{job.mode} {'causal' if job.causal else 'non-causal'} {job.mechanism} L={job.length}"
            bar.set_description(label)
            if job.series in stopped:
                status, at = stopped[job.series]
                record = make_record(
                    job, {"status": "skipped", "error": f"skipped: {status} at L={at}"}, env, cfg.isolate
                )
                write_json_atomic(path, record)
            else:
                existing = _read(path)
                if needs_measurement(existing, job, key, cfg.rerun):
                    outcome = runner.run(job)
                    record = make_record(job, outcome, env, cfg.isolate)
                    write_json_atomic(path, record)
                    bar.write(_one_line(record))
                elif existing is not None:  # needs_measurement is true without one
                    record = existing
                else:
                    raise RuntimeError(f"{path}: no record and no measurement")
                if record["status"] in STOPPING_STATUSES:
                    stopped[job.series] = (record["status"], job.length)
            counts[record["status"]] = counts.get(record["status"], 0) + 1
            records.append(record)
            bar.update(1)
    finally:
        bar.close()
    log.info("speed sweep done: %s", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return records


def _one_line(record: dict[str, Any]) -> str:
    head = (
        f"{record['mode']:<10} {'causal' if record['causal'] else 'bidir':<6} {record['mechanism']:<18} "
        f"L={record['length']:<6}"
    )
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['error']}"
    t = record["time_s"]
    return (
        f"{head} {1e3 * t['median']:9.2f} ms ± {1e3 * t['iqr'] / 2:.2f} (n={t['reps']})  "
        f"{record['tokens_per_s']:12,.0f} tok/s  {record['peak_memory_mb']:9.1f} MB"
    )


class _NoProgress:
    def set_description(self, text: str) -> None: ...

    def update(self, n: int) -> None: ...

    def write(self, text: str) -> None:
        log.info(text)

    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="measurement", dynamic_ncols=True, file=sys.stderr)


# ============================================================================= command line


def records_dir(cfg: Any) -> Path:
    """Where the speed records of a sweep, compare or overhead run go: ``<results_dir>/speed``."""
    return Path(cfg.results_dir) / "speed"


REFUSED = {"out": "use results_dir= (the records go to <results_dir>/speed)"}


def check_scale(scale: str) -> None:
    """``scale=`` of a speed command: ``auto`` or a file of harness/conf/scale/ (UsageError naming them)."""
    from harness.core.overrides import UsageError
    from harness.train.config import conf_file

    if scale != "auto":
        try:
            conf_file("scale", scale)
        except ValueError as exc:
            raise UsageError(f"scale={scale}: {exc}") from None


def parse_config(argv: list[str]) -> SpeedConfig:
    """``k=v`` arguments (the one grammar, ``harness.core.overrides``: e.g. ``lengths=[256,512]``,
    ``mechanism_config.performer.num_features=128``) -> a checked SpeedConfig (UsageError if not)."""
    from harness.core.overrides import check_choice, parse

    cfg = parse(SpeedConfig, argv, command="speed", refused=REFUSED)
    if isinstance(cfg.mechanisms, str) and cfg.mechanisms != "all":
        cfg.mechanisms = [m.strip() for m in cfg.mechanisms.split(",") if m.strip()]
    for mode in cfg.modes:
        check_choice("modes", mode, MODES)
    check_choice("rerun", cfg.rerun, ("none", "failed", "all"))
    check_choice("device", cfg.device, ("auto", "cpu", "cuda"))
    check_choice("precision", cfg.precision, ("auto", *PRECISIONS))
    check_scale(cfg.scale)
    if cfg.mechanisms != "all":
        from harness.core.registry import discover, get_mechanism

        discover()
        for name in cfg.mechanisms:
            get_mechanism(name)  # UnknownNameError: one line with the registered names
    return cfg


def main(argv: list[str] | None = None) -> int:
    """The sweep; exit 1 when any measurement failed (an error other than oom or timeout)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    records = run_sweep(cfg)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"{len(records)} speed records in {records_dir(cfg)} ({len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
