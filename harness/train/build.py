"""``build_model``: a task's model, by its head (the encoder heads of ``harness.train.model``, or the
encoder–decoder of ``harness.train.seq2seq``)."""

from __future__ import annotations

from typing import Any

from harness.train.model import HEADS, Encoder, Head, ModelConfig
from harness.train.seq2seq import build_seq2seq


def build_model(task, model_cfg: ModelConfig, mechanism: str, mechanism_cfg: Any = None) -> Head:
    """The model for a task: its encoder with ``mechanism`` in every block, and its head
    (``seq2seq``: the encoder–decoder of ``harness.train.seq2seq``)."""
    if task.head == "seq2seq":
        return build_seq2seq(task, model_cfg, mechanism, mechanism_cfg)
    if task.head not in HEADS:
        raise ValueError(
            f"task '{task.name}' asks for head '{task.head}'; valid heads: {', '.join([*HEADS, 'seq2seq'])}"
        )
    encoder = Encoder(
        model_cfg, vocab_size=task.vocab_size, max_len=task.max_len, mechanism=mechanism, mechanism_cfg=mechanism_cfg
    )
    size = task.vocab_size if task.head == "lm" else task.num_classes
    return HEADS[task.head](encoder, size)
