"""One grid cell, start to finish: ``python -m harness run task=listops mechanism=softmax``.

seed → data (cached) → capability check → model → Lightning fit, selecting on validation
→ test the best checkpoint → result JSON (the last line printed is its path).

A cell that raises, hits a NaN loss, runs out of memory or time writes a result with that
status and the error's last line; ``run`` then exits non-zero, while a Hydra multirun
(the grid) records it and goes on to the next cell. A recorded cell is skipped on re-run
(``rerun=failed`` retries failed ones, ``rerun=all`` everything); a killed cell resumes
from its last checkpoint.

An interrupted cell (Ctrl-C's SIGINT, or SIGTERM: ``kill``, a cluster's preemption) is not a
failure: it writes no record, keeps its checkpoints and exits with 128 + the signal's number
(130, 143), so the same command run again resumes it from ``last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from filelock import Timeout
from omegaconf import DictConfig, OmegaConf

from harness.core.memory import peak_memory_mb, reset_peak_memory
from harness.core.results import (
    FINISHED,
    Result,
    code_segments_summary,
    code_state,
    config_section,
    environment,
    last_line,
    read_result,
    result_path,
    status_of,
    write_result,
)
from harness.train.cells import Cell, cell_lock, resolve_cell

log = logging.getLogger("harness.train.run")
_IMPORTED_AT = time.time()  # when /proc cannot say when this process started


def process_started_at() -> float:
    """When this process started (seconds since the epoch): the kernel's start time of the process
    (``/proc/self/stat``) on Linux, so the interpreter's start and every import count; elsewhere
    when this module was imported."""
    import os

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        started = time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    return started if started <= _IMPORTED_AT + 1 else _IMPORTED_AT  # a /proc that does not add up


class _DropAdvertising(logging.Filter):
    """Lightning prints a LitLogger advertisement on every Trainer; keep cell logs readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertising())


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CellInterrupted(BaseException):
    """The cell was stopped by SIGINT/SIGTERM: nothing is recorded, its checkpoints stay."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the stop signals this process received while running a cell


def _on_stop_signal(signum: int, frame) -> None:
    """Stop the cell where it is, as Ctrl-C does (Lightning turns a KeyboardInterrupt into
    SystemExit(1) and its own SIGTERM handling into SIGTERMException: the signal number here
    is what tells an interrupt from a failure). Later signals only add to the list."""
    _received.append(signum)
    if len(_received) == 1:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


class _StopSignals:
    """SIGINT and SIGTERM raise in the main thread while a cell runs; the old handlers after."""

    def __enter__(self):
        _received.clear()
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._old[signum] = signal.signal(signum, _on_stop_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)


def _interrupt_signal(exc: BaseException) -> int | None:
    """The stop signal behind ``exc``, or None when it is a failure of the cell."""
    if _received:
        return _received[0]
    if isinstance(exc, KeyboardInterrupt):  # SIGINT before our handler, or one raised by hand
        return signal.SIGINT
    return None


def check_run_settings(cfg: DictConfig) -> None:
    """Settings with a fixed set of values fail with one line listing them."""
    from harness.train.config import ON_LOCKED, RERUN

    if cfg.rerun not in RERUN:
        raise ValueError(f"rerun={cfg.rerun!r} is not one of {', '.join(RERUN)}")
    if cfg.get("on_locked", "skip") not in ON_LOCKED:
        raise ValueError(f"on_locked={cfg.on_locked!r} is not one of {', '.join(ON_LOCKED)}")


def _close(key: str, valid: set[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], sorted(valid), n=3, cutoff=0.6)
    return f"did you mean {', '.join(near)}?" if near else f"valid: {', '.join(sorted(valid))}"


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def check_config(cfg: DictConfig) -> None:
    """Every key is one some schema has (an appended ``+group.key`` typo included), and
    every budget/size is in range: one line, before anything is read, trained or written."""
    import dataclasses

    from harness.core.registry import get_mechanism, get_task
    from harness.train.config import LoggerConfig, RunConfig, ScaleConfig, TrainConfig, TrainerConfig, check_protocol
    from harness.train.model import ModelConfig

    schemas = {
        "train": _fields(TrainConfig),
        "model": _fields(ModelConfig),
        "scale": _fields(ScaleConfig),
        "logger": _fields(LoggerConfig),
        "task": _fields(get_task(cfg.task.name).config_class) | {"name"},
        "mechanism": _fields(get_mechanism(cfg.mechanism.name).config_class) | {"name"},
        "trainer": _fields(TrainerConfig) | trainer_arguments(),
    }
    top = _fields(RunConfig)
    for key in map(str, cfg):
        if key not in top:
            raise ValueError(f"{key} is not a setting; {_close(key, top)}")
    for group, valid in schemas.items():
        for key in cfg[group]:
            if key not in valid:
                raise ValueError(f"{group}.{key} is not a {group} setting; {_close(key, valid)}")
    train, trainer, model = cfg.train, cfg.trainer, cfg.model
    at_least = {
        "train.max_steps": (train.max_steps, 1),
        "train.batch_size": (train.batch_size, 1),
        "train.eval_every": (train.eval_every, 1),
        "train.warmup_steps": (train.warmup_steps, 0),
        "train.eval_batches": (train.eval_batches, 0),
        "train.weight_decay": (train.weight_decay, 0),
        "train.grad_clip": (train.grad_clip, 0),
        "train.time_limit_s": (train.time_limit_s, 0),
        "trainer.accumulate_grad_batches": (trainer.accumulate_grad_batches, 1),
        "trainer.num_workers": (trainer.num_workers, 0),
        "model.dim": (model.dim, 1),
        "model.depth": (model.depth, 1),
        "model.heads": (model.heads, 1),
    }
    for key, (value, low) in at_least.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key}={value!r} must be a number >= {low}")
    if not train.lr > 0:
        raise ValueError(f"train.lr={train.lr!r} must be > 0")
    if not 0 <= model.dropout < 1:
        raise ValueError(f"model.dropout={model.dropout!r} must be in [0, 1)")
    # A count or cap whose default is positive stays positive (a default of 0 or -1 means "none"
    # or "auto", e.g. pathfinder's num_distractors, and is the task's own to check).
    defaults = {f.name: f.default for f in dataclasses.fields(get_task(cfg.task.name).config_class)}
    for key, value in cfg.task.items():
        default = defaults.get(key)
        if (
            (key.startswith("num_") or key.startswith("max_"))
            and isinstance(value, int)
            and value < 1
            and isinstance(default, int)
            and default >= 1
        ):
            raise ValueError(f"task.{key}={value!r} must be >= 1")
    trainer_passthrough(cfg)
    check_protocol(cfg)


def _set_aside(cell: Cell, previous: dict[str, Any]) -> Path | None:
    """A record at the preset path whose config is not today's presets (the presets
    changed): move it to its own variant folder, so nothing is lost or reused."""
    from harness.core.results import write_json_atomic

    old_hash = previous.get("config_hash") or "legacy"
    target = result_path(cell.results_dir, cell.scale, cell.task, cell.mechanism, cell.seed, old_hash)
    if target.exists():
        cell.result_path.unlink(missing_ok=True)
        return target
    previous = {k: v for k, v in previous.items() if not k.startswith("_")}
    previous["variant"] = old_hash
    previous["variant_label"] = previous.get("variant_label") or "earlier presets"
    write_json_atomic(target, previous)
    cell.result_path.unlink(missing_ok=True)
    return target


def record_stands(previous: dict[str, Any], rerun: str) -> bool:
    """Whether a cell's record of its own config stands, so the cell is skipped: finished
    (``ok``/``unsupported``) unless ``rerun=all``, any status under ``rerun=none``."""
    return rerun != "all" and (previous["status"] in FINISHED or rerun == "none")


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run one cell (or skip it when already recorded); return its result record.

    The last line printed is always the result's path, for a skipped cell too."""
    from harness.core.registry import discover, plugin_errors

    discover()
    for plugin, error in plugin_errors().items():
        log.warning("plugin %s failed to load: %s", plugin, error)
    check_run_settings(cfg)
    check_config(cfg)
    cell = resolve_cell(cfg)
    if _ddp_worker_rank() > 0:  # a DDP worker that Lightning started: train, the main process records
        _train_and_test(cfg, cell, new_result(cell))
        return {"status": "ok", "task": cell.task, "mechanism": cell.mechanism, "seed": cell.seed}
    if cell.variant:
        log.info("cell %s: config %s differs from the presets: %s", cell.name, cell.config_hash, cell.variant_label)
    lock = cell_lock(cell)
    try:
        lock.acquire(timeout=0 if cfg.get("on_locked", "skip") == "skip" else -1)
    except Timeout:
        log.warning(
            "skip %s: it is running in another process (lock %s; on_locked=wait to wait for it)",
            cell.name,
            cell.lock_path,
        )
        print(cell.result_path, flush=True)
        return {
            "status": "running",
            "task": cell.task,
            "mechanism": cell.mechanism,
            "scale": cell.scale,
            "seed": cell.seed,
            "variant": cell.variant,
            "_path": str(cell.result_path),
        }
    handler = _cell_log_handler(cell)
    try:
        with _StopSignals():
            return _run_locked(cfg, cell)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        lock.release()


def _cell_log_handler(cell: Cell) -> logging.Handler:
    """The cell's own log, ``<log_dir>/cell.log`` (appended across resumes)."""
    cell.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(cell.log_dir / "cell.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _run_locked(cfg: DictConfig, cell: Cell) -> dict[str, Any]:
    previous = read_result(cell.result_path)
    if previous is not None and previous.get("config_hash") != cell.config_hash:
        moved = _set_aside(cell, previous)
        log.warning(
            "%s held a result of another config (%s); kept as %s, running this config anew",
            cell.result_path,
            previous.get("config_hash") or "unrecorded",
            moved,
        )
        previous = None
    if previous is not None and record_stands(previous, cfg.rerun):
        log.info(
            "skip %s: recorded as %s (rerun=%s to redo)",
            cell.name,
            previous["status"],
            "all" if previous["status"] in FINISHED else "failed",
        )
        print(cell.result_path, flush=True)
        return {**previous, "_skipped": True}

    ckpt = cell.checkpoint_dir
    if previous is not None:  # a recorded cell redone starts afresh; only a killed (unrecorded) one resumes
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(cell.log_dir / "curves", ignore_errors=True)
        kept = _keep_replaced(cell, previous)  # so a redo killed half-way resumes, rather than starting over
        log.info("redoing %s (recorded as %s); that record kept as %s", cell.name, previous["status"], kept)
    _claim_checkpoints(cell)

    result = new_result(cell)
    start = time.perf_counter()
    try:
        _train_and_test(cfg, cell, result)
    except BaseException as exc:  # recorded, never lost
        signum = _interrupt_signal(exc)
        if signum is not None:  # stopped from outside: no record, checkpoints kept, resumed by a rerun
            checkpoint = "last.ckpt kept" if (cell.checkpoint_dir / "last.ckpt").exists() else "no checkpoint yet"
            log.warning(
                "interrupted %s by %s after %s: nothing recorded (%s); rerun the same command to resume",
                cell.name,
                signal.Signals(signum).name,
                f"{time.perf_counter() - start:.1f} s",
                checkpoint,
            )
            raise CellInterrupted(signum) from None
        result.status, result.error = status_of(exc), last_line(exc)
        log.error("cell %s %s: %s", cell.name, result.status, result.error)
        log.debug("traceback:\n%s", traceback.format_exc())
    if result.wall_s is None:
        result.wall_s = round(time.perf_counter() - start, 2)
    # the whole cell: this process from its start (imports, data, model), and earlier runs of a resumed cell
    result.process_wall_s = round(time.time() - process_started_at() + cell.extra.get("earlier_wall_s", 0.0), 2)
    result.env.update(code_segments_summary(cell.extra.get("segments") or [], code_state()))
    written = write_result(cfg.results_dir, result)
    log.info("%s %s: %s", result.status, cell.name, _summary(result))
    print(written, flush=True)
    return result.as_dict()


def _keep_replaced(cell: Cell, previous: dict[str, Any]) -> Path:
    """Move the record of a cell being redone to ``<log_dir>/replaced/`` (out of the results)."""
    from harness.core.results import write_json_atomic

    target = cell.log_dir / "replaced" / f"{time.strftime('%Y%m%dT%H%M%S')}-{previous['status']}.json"
    write_json_atomic(target, {k: v for k, v in previous.items() if not k.startswith("_")})
    cell.result_path.unlink(missing_ok=True)
    return target


def new_result(cell: Cell, status: str = "failed", **fields: Any) -> Result:
    """A record of ``cell``: its names, its settings (``config``: the cell's identity), this
    process's environment, ``status`` and any other ``fields`` (e.g. ``error``)."""
    return Result(
        task=cell.task,
        mechanism=cell.mechanism,
        scale=cell.scale,
        seed=cell.seed,
        status=status,
        env=environment(),
        variant=cell.variant,
        variant_label=cell.variant_label,
        config_hash=cell.config_hash,
        config=cell.identity,
        **fields,
    )


def _ddp_worker_rank() -> int:
    """The local rank of a process Lightning's DDP launcher started (0 in the main one)."""
    import os

    return (
        int(os.environ.get("LOCAL_RANK", "0") or 0)
        if "PL_GLOBAL_SEED" in os.environ or "WORLD_SIZE" in os.environ
        else 0
    )


def _route_lightning_logs() -> None:
    """Lightning's own console handler would print every INFO line a second time next to
    Hydra's handlers: let its records go through the root logger only."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "torchmetrics"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


OUR_TRAINER_KEYS = ("accelerator", "devices", "strategy", "precision", "num_workers", "deterministic", "progress_bar")


MANAGED_TRAINER_KEYS = frozenset(
    {
        "max_steps",
        "val_check_interval",
        "check_val_every_n_epoch",
        "limit_val_batches",
        "callbacks",
        "use_distributed_sampler",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "enable_progress_bar",
        "logger",
        "log_every_n_steps",
        "num_sanity_val_steps",
        "enable_model_summary",
    }
)


def trainer_arguments() -> set[str]:
    """The names lightning.Trainer takes (what ``+trainer.KEY=VALUE`` may name)."""
    import inspect

    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def trainer_passthrough(cfg: DictConfig) -> dict[str, Any]:
    """Trainer settings that go to lightning.Trainer as they are (``accumulate_grad_batches``
    and anything added with ``+trainer.KEY=VALUE``), checked against its signature."""
    import inspect

    import lightning as L

    from harness.train.config import as_dict

    extra = {k: v for k, v in as_dict(cfg.trainer).items() if k not in OUR_TRAINER_KEYS}
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    managed = MANAGED_TRAINER_KEYS
    unknown = sorted(set(extra) - valid)
    if unknown:
        raise ValueError(f"trainer.{unknown[0]} is not a lightning.Trainer argument; valid: {', '.join(sorted(valid))}")
    clash = sorted(set(extra) & managed)
    if clash:
        raise ValueError(f"trainer.{clash[0]} is set by the harness from train.*/logger=; set it there")
    return extra


def build_logger(cfg: DictConfig, cell: Cell):
    """csv (default): <log_dir>/curves/metrics.csv; tensorboard: <log_dir>/tensorboard; wandb: a run per cell."""
    from lightning.pytorch.loggers import CSVLogger

    name = cfg.get("logger", {}).get("name", "csv")
    if name == "csv":
        return CSVLogger(cell.log_dir, name="", version="curves")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            return TensorBoardLogger(cell.log_dir, name="", version="tensorboard")
        except ModuleNotFoundError as exc:
            raise ValueError("logger=tensorboard needs tensorboard: pip install -e '.[tensorboard]'") from exc
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ValueError("logger=wandb needs wandb: pip install -e '.[wandb]'") from exc
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project=cfg.logger.project, name=cell.name, save_dir=str(cell.log_dir), config=cell.identity)
    raise ValueError(f"logger={name!r}; valid loggers: csv, tensorboard, wandb")


def _claim_checkpoints(cell: Cell) -> None:
    """Checkpoints belong to one config: a folder holding another config's is cleared
    before this cell resumes or starts (``seed<k>.cell.json`` beside it names the config)."""
    marker = cell.checkpoint_dir.with_name(cell.checkpoint_dir.name + ".cell.json")
    if cell.checkpoint_dir.exists():
        try:
            recorded = json.loads(marker.read_text()).get("config_hash")
        except (OSError, ValueError):
            recorded = None
        if recorded != cell.config_hash:
            log.warning(
                "checkpoints in %s are of another config (%s); starting %s from scratch",
                cell.checkpoint_dir,
                recorded or "unrecorded",
                cell.name,
            )
            shutil.rmtree(cell.checkpoint_dir, ignore_errors=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"config_hash": cell.config_hash, "config": cell.identity}, indent=1, default=str))


def _summary(result: Result) -> str:
    test = result.metrics.get("test", {})
    ci = test.get("accuracy_ci95")
    parts = [
        f"test accuracy {test['accuracy']:.4f}"
        + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        + f" (seed {result.seed})"
        if "accuracy" in test
        else None,
        f"test bits/token {test['bits_per_token']:.4f}" if "bits_per_token" in test else None,
        f"majority {result.data['majority_accuracy']:.4f}" if result.data.get("majority_accuracy") else None,
        f"{result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s else None,
        f"{result.wall_s}s" if result.wall_s else None,
        result.error,
    ]
    return ", ".join(p for p in parts if p)


def _train_and_test(cfg: DictConfig, cell: Cell, result: Result) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from harness.core.attention import computes_softmax
    from harness.core.registry import create_task, get_mechanism
    from harness.train.build import build_model
    from harness.train.config import train_settings
    from harness.train.model import ModelConfig, count_parameters
    from harness.train.training import CellMeter, CodeSegments, RandomStates, TaskDataModule, TaskModule

    _route_lightning_logs()  # after Lightning's import, which adds its own console handler
    L.seed_everything(result.seed, workers=True, verbose=False)

    task = create_task(result.task, scale=result.scale, **config_section(cell.identity, "task"))
    log.info("data: %s (source=%s)", task.name, task.source)
    dsd, data_info = task.load(cfg.cache_dir)
    result.data = data_info.as_record()
    for warning in result.data.get("warnings") or []:
        log.warning("data: %s", warning)
        result.warnings.append(warning)

    missing = get_mechanism(result.mechanism).capabilities.missing(task.requires)
    if missing:
        result.status = "unsupported"
        result.error = f"task '{task.name}' needs {', '.join(missing)}; mechanism '{result.mechanism}' lacks it"
        return

    model_cfg = ModelConfig(**cell.identity["model"])
    model = build_model(task, model_cfg, result.mechanism, config_section(cell.identity, "mechanism"))
    result.params = count_parameters(model)
    log.info("model: %s with %s, %d parameters", task.head, result.mechanism, result.params)
    result.softmax_equivalent = (
        computes_softmax(model.encoder.mechanisms[0], model.encoder.max_len, causal=model.causal)
        if model.encoder.mechanisms
        else None
    )
    if result.softmax_equivalent and result.mechanism != "softmax":
        log.info(
            "%s computes exactly softmax at %d tokens: the report marks this row",
            result.mechanism,
            model.encoder.max_len,
        )

    train = train_settings(cfg.train)
    module = TaskModule(model, train)
    warm = None
    if train.warmup_length:  # the warm start: the first steps on the same task at a shorter length
        at_length = getattr(task, "at_length", None)
        if at_length is None:
            raise ValueError(
                f"train.warmup_length is set, but task '{task.name}' cannot change its length "
                f"(it has no at_length); unset train.warmup_length"
            )
        short = create_task(result.task, scale=result.scale, **at_length(train.warmup_length))
        warm_dsd, warm_info = short.load(cfg.cache_dir)
        result.data["warmup"] = {
            "max_len": train.warmup_length,
            "fingerprint": warm_info.fingerprint,
            "steps": train.warmup_length_steps,
            "cache_path": warm_info.as_record()["cache_path"],
        }
        warm = (warm_dsd["train"], train.warmup_length_steps, train.warmup_batch_size or train.batch_size)
        log.info(
            "warm start: %d steps at %d tokens, then %d steps at %d",
            train.warmup_length_steps,
            train.warmup_length,
            train.max_steps - train.warmup_length_steps,
            task.max_len,
        )
    data = TaskDataModule(
        dsd, batch_size=train.batch_size, seed=result.seed, num_workers=cfg.trainer.num_workers, warmup=warm
    )
    ckpt_dir = cell.checkpoint_dir
    # Select on validation accuracy, or on validation loss (bits/token) for a language model.
    monitor, mode = ("val/loss", "min") if model.causal else ("val/accuracy", "max")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode, save_last=True, filename="best")
    meter = CellMeter(time_limit_s=train.time_limit_s)
    segments = CodeSegments(code_state)  # the code of every run this cell trains in, kept in its checkpoints
    show_progress = bool(cfg.trainer.progress_bar) and sys.stdout.isatty()  # no bars in log files
    resume = ckpt_dir / "last.ckpt"
    curves = cell.log_dir / "curves" / "metrics.csv"
    earlier_curves = _read_curves(curves) if resume.exists() else []
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_steps=train.max_steps,
        val_check_interval=min(train.eval_every, train.max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=train.eval_batches or None,
        gradient_clip_val=train.grad_clip or None,
        gradient_clip_algorithm=train.grad_clip_algorithm,
        deterministic="warn" if cfg.trainer.deterministic else False,
        use_distributed_sampler=False,  # the train batches shard themselves by rank (ResumableBatches)
        callbacks=[checkpoint, meter, segments, RandomStates(), *([RichProgressBar()] if show_progress else [])],
        enable_progress_bar=show_progress,
        # Per-step training curves: results/logs/<scale>/<task>/<mechanism>/[<variant>/]seed<k>/curves/metrics.csv
        logger=build_logger(cfg, cell),
        log_every_n_steps=max(1, min(50, train.max_steps // 10)),
        num_sanity_val_steps=0,
        enable_model_summary=False,
        **trainer_passthrough(cfg),
    )
    device_type = "cuda" if trainer.strategy.root_device.type == "cuda" else "cpu"
    reset_peak_memory(device_type)
    try:
        if train.pretrain_steps and not resume.exists():  # a resumed cell has its pretrained weights in the checkpoint
            from harness.train.pretrain import self_pretrain

            meter.start_timer()
            result.data["pretrain"] = self_pretrain(
                model,
                task,
                train,
                data,
                {
                    "accelerator": cfg.trainer.accelerator,
                    "devices": cfg.trainer.devices,
                    "precision": cfg.trainer.precision,
                    "enable_progress_bar": False,
                    "deterministic": "warn" if cfg.trainer.deterministic else False,
                },
            )
            log.info("self-pretraining: %s", result.data["pretrain"])
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume.exists() else None, weights_only=True)
        result.resumed_from_step = meter.resumed_from_step
        if meter.resumed_from_step is not None:
            log.info("resumed %s from step %d (%s)", cell.name, meter.resumed_from_step, resume)
        result.steps = trainer.global_step
        best = checkpoint.best_model_path or None
        score = checkpoint.best_model_score
        result.metrics["val"] = {monitor.split("/")[1]: float(score)} if score is not None else {}
        trainer.test(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)
        result.metrics["test"] = module.final_metrics.get("test", {})
        result.test_items = module.final_items.get("test", {})
        if getattr(data, "warm_sampler", None) is not None:  # warm-up batches this process trained on
            result.data["warmup"]["short_batches_this_run"] = data.warm_sampler.short_drawn
        ci = _test_interval(result.test_items, result.data.get("test_clusters"))
        if ci:
            result.metrics["test"]["accuracy_ci95"] = ci
        result.data["test_examples_evaluated"] = module.evaluated.get("test")
        if best:  # re-validate the selected checkpoint for its full validation metrics
            trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)
            result.metrics["val"] = module.final_metrics.get("val", result.metrics["val"])
            result.best_step = int(torch.load(best, map_location="cpu", weights_only=True).get("global_step", 0))
        evaluate = getattr(task, "evaluate_predictions", None)
        if evaluate is not None:  # task-level metrics that need decoding (e.g. Spider's exact match)
            module.eval()
            extra = evaluate(module.model, dsd["test"], device=module.device, batch_size=train.batch_size)
            result.metrics["test"].update(extra)
    finally:
        meter.stop_timer()
        cell.extra["segments"], cell.extra["earlier_wall_s"] = segments.segments, meter.elapsed_before
        result.resumed_from_step = meter.resumed_from_step
        result.wall_s = round(meter.wall_s, 2)
        result.peak_memory_mb = round(peak_memory_mb(device_type), 1)  # an oom or failed cell's peak too
        if earlier_curves:
            _prepend_curves(curves, earlier_curves, before_step=meter.resumed_from_step)
        result.val_curve = _earlier_val_curve(earlier_curves, meter.resumed_from_step) + module.val_curve
    result.mechanism_metrics = {
        k: v
        for k, v in result.metrics["test"].items()
        if k not in ("accuracy", "loss", "bits_per_token", "accuracy_ci95")
    }
    result.tokens_per_s = meter.tokens_per_s
    result.status = "ok"
    if not cfg.keep_checkpoints and _ddp_worker_rank() == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _read_curves(path: Path) -> list[dict[str, str]]:
    import csv

    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _prepend_curves(path: Path, earlier: list[dict[str, str]], *, before_step: int | None) -> None:
    """A resumed cell's curves continue the killed run's: its rows before the resume step,
    then the new ones (Lightning's CSV logger starts a fresh file)."""
    import csv

    keep = [r for r in earlier if before_step is None or _as_int(r.get("step")) < before_step]
    rows = keep + _read_curves(path)
    if not rows:
        return
    fields = sorted({k for r in rows for k in r})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _test_interval(items: dict[str, list[int]], clusters: list[int] | None) -> list[float] | None:
    """This seed's 95% interval of test accuracy from its per-item outcomes: cluster-robust over
    the test units' clusters (a per-position task's sequence is the unit of its queries)."""
    from harness.core.stats import clustered_interval

    correct, count = items.get("correct"), items.get("count")
    if not correct or not count or len(correct) != len(count):
        return None
    units = clusters if clusters and len(clusters) == len(correct) else None
    found = clustered_interval(correct, units, count=count)
    if not math.isfinite(found["half_width"]):
        return None
    return [
        round(max(0.0, found["accuracy"] - found["half_width"]), 6),
        round(min(1.0, found["accuracy"] + found["half_width"]), 6),
    ]


def _earlier_val_curve(rows: list[dict[str, str]], before_step: int | None) -> list[list[float]]:
    """The validation points a killed run logged up to the step this one resumed from (its
    checkpoint is written after that step's validation, which the resumed run does not repeat).
    ``val/at_step`` is the trainer's step; logs without it give the logger's count, one less."""
    out = []
    for row in rows:
        value = row.get("val/bits_per_token") or row.get("val/accuracy")
        step = _as_int(row.get("val/at_step")) if row.get("val/at_step") else _as_int(row.get("step")) + 1
        if value and (before_step is None or step <= before_step):
            out.append([step, round(float(value), 6)])
    return out


def _as_int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return -1


def check_names(overrides: list[str]) -> None:
    """Fail with one line listing the valid names when task=/mechanism= names an unknown one."""
    from harness.core.registry import UnknownNameError, get_mechanism, get_task

    lookups = {"task": get_task, "mechanism": get_mechanism}
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key in lookups and "(" not in value:  # glob(), choice(), ...: Hydra's sweep grammar checks them
            for name in value.split(","):
                try:
                    lookups[key](name.strip())
                except UnknownNameError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    sys.exit(2)


def _first_job(args: list[str]) -> list[str] | None:
    """The overrides of a sweep's first cell (each swept key at its first value), or None when
    the sweep needs Hydra's config loader to expand (``glob()`` over a group)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        out = []
        for override in OverridesParser.create().parse_overrides(args):
            if override.is_sweep_override():
                out.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
            elif override.input_line is None:  # parse_overrides keeps each override's text
                raise ValueError(f"override {override} has no input line")
            else:
                out.append(override.input_line)
        return out
    except Exception:  # Hydra's own parsing reports it
        return None


def compose_checked(overrides: list[str], command: str = "run") -> DictConfig:
    """``compose`` whose refusals are one-line ``UsageError``s: an unknown key lists the valid ones
    (with the closest), an unknown group option the valid options, a bad value its key."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from harness.core.overrides import UsageError, did_you_mean, unknown_key
    from harness.core.registry import discover, get_mechanism, get_task
    from harness.train.config import compose

    discover()
    lookups = {"task": get_task, "mechanism": get_mechanism}
    for key, _, value in (a.partition("=") for a in overrides):
        if key in lookups and "(" not in value:
            for name in value.split(","):
                lookups[key](name.strip())  # UnknownNameError: one line with the valid names
    try:
        return compose(overrides)
    except MissingConfigException as exc:  # scale=hugee: "Could not find 'scale/hugee'" + the options
        import re

        found = re.search(r"Could not find '([^']+)'", str(exc))
        group, _, option = (found.group(1) if found else "?/?").rpartition("/")
        lines = [ln.strip() for ln in str(exc).splitlines()]
        start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("Available options")), len(lines))
        options = [ln for ln in lines[start:] if ln and not ln.startswith(("Config search path", "provider="))]
        raise UsageError(
            f"{command}: unknown {group} '{option}'{did_you_mean(option, options)}; valid: {', '.join(options)}"
        ) from None
    except (HydraException, OmegaConfBaseException) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if text.startswith("Could not override '"):
            key = text.split("'")[1]
            parent, _, leaf = key.rpartition(".")
            base = compose([a for a in overrides if not a.startswith(f"{key}=")])
            node = OmegaConf.select(base, parent) if parent else base
            if node is not None and hasattr(node, "keys"):
                keys = [str(k) for k in node.keys()]
                valid = [f"{parent}.{k}" if parent else k for k in keys]
                raise unknown_key(key, valid, command) from None
        cause = exc.__cause__
        detail = f": {str(cause).strip().splitlines()[0]}" if cause is not None and str(cause).strip() else ""
        raise UsageError(f"{command}: {text}{detail}") from None


def check_before_hydra(args: list[str]) -> None:
    """Compose and check the cell's config (names, keys, values, ``results_dir``) before Hydra
    creates its output folder and log file below ``results_dir``: a typo'd key leaves no folder
    behind, and a results folder that cannot be written is one line ("cannot write to
    results_dir=...: why"), not Hydra's "Unable to configure handler 'file'". One line on
    stderr and exit 2 (an unknown key lists the valid ones, ``compose_checked``). A sweep
    (``--multirun``) is checked on its first cell."""
    from harness.core.names import UnsafeName
    from harness.core.registry import UnknownNameError
    from harness.core.results import check_writable_folder
    from harness.train.cells import resolve_cell

    flags = [a for a in args if a.startswith("-")]
    if any(f not in ("--multirun", "-m") for f in flags):  # --cfg, --help, --info ...: Hydra's own
        return
    overrides = [
        a for a in args if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))
    ]
    if flags:
        first = _first_job(overrides)
        if first is None:
            return
        overrides = first
    from harness.core.overrides import UsageError

    try:
        cfg = compose_checked(overrides)
    except (UsageError, UnknownNameError) as exc:  # one line, before Hydra creates anything
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        check_run_settings(cfg)
        check_config(cfg)
        resolve_cell(cfg)
        check_writable_folder(cfg.results_dir, "results_dir")
    except (UnknownNameError, UnsafeName, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Hydra entry point (``python -m harness.train ...`` or ``python -m harness run ...``;
    ``--multirun`` for a sweep)."""
    import hydra

    from harness.core.registry import discover
    from harness.train.config import CONF_DIR

    discover()
    check_names(sys.argv[1:])
    check_before_hydra(sys.argv[1:])

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _main(cfg: DictConfig) -> dict[str, Any]:
        from hydra.core.hydra_config import HydraConfig

        from harness.core.names import UnsafeName
        from harness.core.registry import UnknownNameError

        try:
            record = run_cell(cfg)
        except (UnknownNameError, UnsafeName, ValueError) as exc:  # bad settings: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except CellInterrupted as exc:
            print(f"{exc}: nothing recorded, checkpoints kept; rerun the same command to resume", file=sys.stderr)
            sys.exit(exc.exit_code)
        mode = HydraConfig.get().mode
        multirun = mode is not None and mode.name == "MULTIRUN"
        if record["status"] not in (*FINISHED, "running") and not multirun:
            sys.exit(1)
        return record  # a launcher's callbacks (the grid's progress line) read it

    try:
        _main()
    except (
        KeyboardInterrupt
    ) as exc:  # a sweep stopped (harness.grid.launcher.SweepInterrupted) or Ctrl-C outside a cell
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"interrupted by {signal.Signals(signum).name}: unfinished cells are not recorded and keep their "
            "checkpoints; rerun the same command to resume",
            file=sys.stderr,
        )
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
