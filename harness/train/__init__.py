"""Training one cell: the typed config and ``compose`` (``config``), a cell's identity and lock
(``cells``), the model (``model``, ``seq2seq``, ``build``), the Lightning module and data
(``training``), self-pretraining (``pretrain``), ``run_cell`` (``run``) and testing a kept checkpoint
(``evaluate``). Builds on ``harness.core`` and ``harness.data``."""

from harness.train.build import build_model
from harness.train.cells import Cell, resolve_cell
from harness.train.config import TrainConfig, compose
from harness.train.model import ModelConfig, count_parameters
from harness.train.run import run_cell
from harness.train.training import TaskDataModule, TaskModule

__all__ = [
    "Cell",
    "ModelConfig",
    "TaskDataModule",
    "TaskModule",
    "TrainConfig",
    "build_model",
    "compose",
    "count_parameters",
    "resolve_cell",
    "run_cell",
]
