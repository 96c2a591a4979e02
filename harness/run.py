"""One grid cell, start to finish: ``python -m harness run task=listops mechanism=softmax``.

seed → data (cached) → capability check → model → Lightning fit, selecting on validation
→ test the best checkpoint → result JSON (the last line printed is its path).

A cell that raises, hits a NaN loss, runs out of memory or time writes a result with that
status and the error's last line; ``run`` then exits non-zero, while a Hydra multirun
(the grid) records it and goes on to the next cell. A recorded cell is skipped on re-run
(``rerun=failed`` retries failed ones, ``rerun=all`` everything); a killed cell resumes
from its last checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.results import FINISHED, Result, environment, read_result, result_path, write_result

log = logging.getLogger("harness.run")


class _DropAdvertising(logging.Filter):
    """Lightning prints a LitLogger advertisement on every Trainer; keep cell logs readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertising())


def _status_of(exc: BaseException) -> str:
    import torch

    from harness.training import CellTimeout, NonFiniteLoss

    if isinstance(exc, NonFiniteLoss):
        return "nan"
    if isinstance(exc, CellTimeout):
        return "timeout"
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    return "failed"


def _last_line(exc: BaseException) -> str:
    lines = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _peak_memory_mb(device_type: str) -> float:
    import resource

    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def checkpoint_dir(results_dir: str | Path, scale: str, task: str, mechanism: str, seed: int) -> Path:
    return Path(results_dir) / "checkpoints" / scale / task / mechanism / f"seed{seed}"


def log_dir(results_dir: str | Path, scale: str, task: str, mechanism: str, seed: int) -> Path:
    """Where the cell's Hydra log (run.log) and training curves go."""
    return Path(results_dir) / "logs" / scale / task / mechanism / f"seed{seed}"


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run one cell (or skip it when already recorded); return its result record."""
    from harness.registry import discover, plugin_errors

    discover()
    for plugin, error in plugin_errors().items():
        log.warning("plugin %s failed to load: %s", plugin, error)

    task_name, mech_name, scale, seed = cfg.task.name, cfg.mechanism.name, cfg.scale.name, int(cfg.seed)
    path = result_path(cfg.results_dir, scale, task_name, mech_name, seed)
    previous = read_result(path)
    if previous is not None and cfg.rerun != "all":
        if previous["status"] in FINISHED or cfg.rerun == "none":
            log.info("skip %s/%s/%s/seed%d: recorded as %s (rerun=%s to redo)", scale, task_name, mech_name, seed,
                     previous["status"], "all" if previous["status"] in FINISHED else "failed")
            return previous

    if previous is not None:  # a recorded cell redone starts afresh; only a killed (unrecorded) one resumes
        shutil.rmtree(checkpoint_dir(cfg.results_dir, scale, task_name, mech_name, seed), ignore_errors=True)
        shutil.rmtree(log_dir(cfg.results_dir, scale, task_name, mech_name, seed) / "curves", ignore_errors=True)

    mechanism_config = {k: v for k, v in _container(cfg.mechanism).items() if k != "name"}
    result = Result(
        task=task_name, mechanism=mech_name, mechanism_config=mechanism_config, scale=scale, seed=seed,
        status="failed", env=environment(), task_config={k: v for k, v in _container(cfg.task).items() if k != "name"}, model_config=_container(cfg.model),
        train_config=_container(cfg.train),
    )
    start = time.perf_counter()
    try:
        _train_and_test(cfg, result)
    except BaseException as exc:  # recorded, never lost
        if isinstance(exc, KeyboardInterrupt):
            raise
        result.status, result.error = _status_of(exc), _last_line(exc)
        log.error("cell %s/%s/seed%d %s: %s", task_name, mech_name, seed, result.status, result.error)
        log.debug("traceback:\n%s", traceback.format_exc())
    result.wall_s = round(time.perf_counter() - start, 2)
    written = write_result(cfg.results_dir, result)
    log.info("%s %s/%s/seed%d: %s", result.status, task_name, mech_name, seed, _summary(result))
    print(written, flush=True)
    return result.as_dict()


def _summary(result: Result) -> str:
    test = result.metrics.get("test", {})
    parts = [f"test accuracy {test['accuracy']:.4f}" if "accuracy" in test else None,
             f"test bits/token {test['bits_per_token']:.4f}" if "bits_per_token" in test else None,
             f"majority {result.data['majority_accuracy']:.4f}" if result.data.get("majority_accuracy") else None,
             f"{result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s else None,
             f"{result.wall_s}s" if result.wall_s else None, result.error]
    return ", ".join(p for p in parts if p)


def _train_and_test(cfg: DictConfig, result: Result) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from harness.model import ModelConfig, build_model, count_parameters
    from harness.registry import create_task, get_mechanism
    from harness.training import CellMeter, TaskDataModule, TaskModule

    L.seed_everything(result.seed, workers=True, verbose=False)

    task = create_task(result.task, scale=result.scale, **result.task_config)
    log.info("data: %s (source=%s)", task.name, task.source)
    dsd, data_info = task.load(cfg.cache_dir)
    result.data = data_info.as_dict()

    missing = get_mechanism(result.mechanism).capabilities.missing(task.requires)
    if missing:
        result.status = "unsupported"
        result.error = f"task '{task.name}' needs {', '.join(missing)}; mechanism '{result.mechanism}' lacks it"
        return

    model_cfg = ModelConfig(**result.model_config)
    model = build_model(task, model_cfg, result.mechanism, result.mechanism_config)
    result.params = count_parameters(model)
    log.info("model: %s with %s, %d parameters", task.head, result.mechanism, result.params)

    train = OmegaConf.to_object(cfg.train)
    module = TaskModule(model, train)
    data = TaskDataModule(dsd, batch_size=train.batch_size, seed=result.seed, num_workers=cfg.trainer.num_workers)
    ckpt_dir = checkpoint_dir(cfg.results_dir, result.scale, result.task, result.mechanism, result.seed)
    # Select on validation accuracy, or on validation loss (bits/token) for a language model.
    monitor, mode = ("val/loss", "min") if model.causal else ("val/accuracy", "max")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode, save_last=True, filename="best")
    meter = CellMeter(time_limit_s=train.time_limit_s)
    progress = RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=max(1, train.eval_every // 5))
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
        deterministic="warn" if cfg.trainer.deterministic else False,
        callbacks=[checkpoint, meter, *([progress] if cfg.trainer.progress_bar else [])],
        enable_progress_bar=bool(cfg.trainer.progress_bar),
        # Per-step training curves: results/logs/<scale>/<task>/<mechanism>/seed<k>/curves/metrics.csv
        logger=CSVLogger(log_dir(cfg.results_dir, result.scale, result.task, result.mechanism, result.seed),
                         name="", version="curves"),
        log_every_n_steps=max(1, min(50, train.max_steps // 10)),
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    device_type = "cuda" if trainer.strategy.root_device.type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resume = ckpt_dir / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume.exists() else None)
    result.steps = trainer.global_step
    best = checkpoint.best_model_path or None
    score = checkpoint.best_model_score
    result.metrics["val"] = {monitor.split("/")[1]: float(score)} if score is not None else {}
    trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    result.metrics["test"] = module.final_metrics.get("test", {})
    if best:  # re-validate the selected checkpoint for its full validation metrics
        trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False)
        result.metrics["val"] = module.final_metrics.get("val", result.metrics["val"])
        result.best_step = int(torch.load(best, map_location="cpu", weights_only=False).get("global_step", 0))
    result.mechanism_metrics = {k: v for k, v in result.metrics["test"].items() if k not in ("accuracy", "loss", "bits_per_token")}
    result.tokens_per_s = meter.tokens_per_s
    result.peak_memory_mb = round(_peak_memory_mb(device_type), 1)
    result.status = "ok"
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def check_names(overrides: list[str]) -> None:
    """Fail with one line listing the valid names when task=/mechanism= names an unknown one."""
    from harness.registry import UnknownNameError, get_mechanism, get_task

    lookups = {"task": get_task, "mechanism": get_mechanism}
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key in lookups:
            for name in value.split(","):
                try:
                    lookups[key](name.strip())
                except UnknownNameError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    sys.exit(2)


def main() -> None:
    """Hydra entry point (``python -m harness.run ...``, or ``--multirun`` for a sweep)."""
    import hydra

    from harness.config import CONF_DIR
    from harness.registry import discover

    discover()
    check_names(sys.argv[1:])

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        record = run_cell(cfg)
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        if record["status"] not in FINISHED and not multirun:
            sys.exit(1)

    _main()


if __name__ == "__main__":
    main()
