"""Test a kept checkpoint: ``python -m harness evaluate <the cell's overrides> [checkpoint=PATH]``.

The cell is composed from the same overrides as ``run`` (so its model is built exactly as
trained), the checkpoint's weights are loaded (``weights_only=True``), and the split is
evaluated with the same exact sums as training's test; the metrics print as JSON. Nothing
is written. Without ``checkpoint=``, the cell's own ``best.ckpt`` (kept by
``keep_checkpoints=true``) is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvaluateSettings:
    """``python -m harness evaluate`` settings; every other ``key=value`` is the cell's (as ``run``)."""

    checkpoint: str | None = None  # a .ckpt file; null = the cell's own best.ckpt (kept by keep_checkpoints=true)
    split: str = "test"  # test | validation


def evaluate(overrides: list[str], checkpoint: str | None = None, split: str = "test") -> dict:
    import lightning as L
    import torch

    from harness.core.registry import create_task
    from harness.train.build import build_model
    from harness.train.cells import resolve_cell
    from harness.train.config import compose, train_settings
    from harness.train.model import ModelConfig
    from harness.train.training import TaskDataModule, TaskModule

    cfg = compose(overrides)
    cell = resolve_cell(cfg)
    path = Path(checkpoint) if checkpoint else cell.checkpoint_dir / "best.ckpt"
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}; run the cell with keep_checkpoints=true, or pass checkpoint=PATH"
        )
    task_cfg = {k: v for k, v in cell.identity["task"].items() if k != "name"}
    task = create_task(cell.task, scale=cell.scale, **task_cfg)
    dsd, info = task.load(cfg.cache_dir)
    model = build_model(
        task,
        ModelConfig(**cell.identity["model"]),
        cell.mechanism,
        {k: v for k, v in cell.identity["mechanism"].items() if k != "name"},
    )
    module = TaskModule(model, train_settings(cfg.train))
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    data = TaskDataModule(dsd, batch_size=cfg.train.batch_size, seed=cell.seed)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if split == "test":
        trainer.test(module, datamodule=data, verbose=False)
    elif split == "validation":
        trainer.validate(module, datamodule=data, verbose=False)
    else:
        raise ValueError(f"split={split!r}; valid: test, validation")
    metrics = module.final_metrics["test" if split == "test" else "val"]
    return {
        "cell": cell.name,
        "checkpoint": str(path),
        "step": state.get("global_step"),
        "split": split,
        "data": {"source": info.source, "fingerprint": info.fingerprint},
        "metrics": metrics,
    }


def parse(argv: list[str]) -> tuple[EvaluateSettings, list[str]]:
    """The evaluate settings and the cell's overrides (checked by composing them): UsageError if bad."""
    from harness.core.overrides import check_choice
    from harness.core.overrides import parse as parse_settings
    from harness.train.run import compose_checked

    own = [a for a in argv if a.partition("=")[0] in ("checkpoint", "split")]
    cell = [a for a in argv if a not in own]
    settings = parse_settings(EvaluateSettings, own, command="evaluate")
    check_choice("split", settings.split, ("test", "validation"))
    compose_checked(cell, "evaluate")
    return settings, cell


def main(argv: list[str]) -> int:
    """Evaluate the checkpoint; exit 1 when there is none to evaluate."""
    settings, cell = parse(argv)
    try:
        print(json.dumps(evaluate(cell, settings.checkpoint, settings.split), indent=2))
    except FileNotFoundError as exc:
        import sys

        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
