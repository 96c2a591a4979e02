"""Multi-query associative recall, bidirectional (Zoology: Arora et al. 2023, arXiv:2312.04927;
HazyResearch/zoology ``zoology/data/associative_recall.py``).

A sequence of ``max_len`` tokens holds ``num_pairs`` key–value pairs ``k v`` at random,
non-overlapping places in its first half (``context_fraction``), every key distinct, then
each key once more, alone, at a random place in the second half: a *query*. Every other
position holds a noise token. The model reads the whole sequence (bidirectional) and, at
each query position, classifies the value that followed that key in the context
(``num_values`` classes; chance is ``1 / num_values``). Loss and accuracy count query
positions only (the ``tagger`` head: targets are -100 elsewhere).

    context:  n n k3 v7 n k1 v2 n n k8 v2 n ...        queries:  n k1 n n k8 n k3 n ...
    targets:  -   -  -  -  - -  -  - - -  -  - ...               - 2  - - 2  - 7  - ...

Vocabulary: 0 padding, then ``num_keys`` keys, ``num_values`` values, ``num_noise`` noise
tokens (three disjoint ranges, so a token says what it is; Zoology draws keys and values
from disjoint halves of its vocabulary too). A key's value is recoverable from the
sequence alone: it is the token right after the key's first occurrence
(``solve`` does exactly that; the tests check it against the targets).

Differences from Zoology's generator, all deliberate:

* bidirectional: Zoology's queries are ``k v`` pairs scored causally at ``v``; here the value
  is not in the input at the query (it would give the answer away to a bidirectional
  model), the query key is, and the head classifies at that position;
* queries are placed uniformly in the second half (Zoology: a power law in the distance
  to the context), and the context pairs are spread over the first half rather than packed
  at its start, so recall distances range over the whole sequence;
* noise tokens come from their own range (Zoology fills gaps with random key/value ids);
* the values of one sequence are distinct, as its keys are. With values drawn with
  replacement from a small vocabulary, a value that occurs often in the sequence is more
  likely the answer: a bag of tokens then beats chance (measured: 0.44 against 0.25 with 8
  pairs over 4 values). With distinct values the bag says only which values are present,
  so the shortcut's ceiling is ``1 / num_pairs``; with ``num_values = num_pairs`` that is chance.

Splits are generated with one seed (``data_seed``); a validation or test sequence whose
token list equals one of train is regenerated, so no split leaks into another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from harness.core import register_task
from harness.data import Task, unseen_splits

log = logging.getLogger(__name__)

IGNORE = -100  # target of a position that is not a query (cross_entropy's ignore_index)


@dataclass
class MQARConfig:
    source: str = "generated"
    max_len: int = 1024  # tokens per sequence
    num_pairs: int = 16  # key–value pairs (= queries) per sequence
    num_keys: int = 64  # key vocabulary (>= num_pairs: keys are distinct within a sequence)
    num_values: int = 16  # value vocabulary = classes (>= num_pairs, distinct too; chance 1 / num_values)
    num_noise: int = 16  # filler tokens
    context_fraction: float = 0.5  # the pairs lie in the first max_len * context_fraction tokens
    num_train: int = 8000
    # training sequences at the warm start's short length (``train.warmup_length``); 0 = num_train. A
    # long column needs few sequences at its own length (60 steps of 1 at 16K) but the warm start
    # needs many short ones: 8,000 sequences of 16K tokens would be 131M tokens to generate and cache.
    num_train_short: int = 0
    num_val: int = 500
    num_test: int = 500
    data_seed: int = 0

    def __post_init__(self):
        for key in ("num_keys", "num_values"):
            if getattr(self, key) < self.num_pairs:
                raise ValueError(
                    f"task.{key}={getattr(self, key)} < task.num_pairs={self.num_pairs}: "
                    f"{key[4:]} must be distinct within a sequence"
                )
        context = int(self.max_len * self.context_fraction)
        if 2 * self.num_pairs > context or self.num_pairs > self.max_len - context:
            raise ValueError(
                f"task.max_len={self.max_len} cannot hold {self.num_pairs} pairs in its first {context} tokens "
                f"and {self.num_pairs} queries after them; raise task.max_len or lower task.num_pairs"
            )
        if self.num_train_short < 0:
            raise ValueError(f"task.num_train_short must be >= 0 (0 = task.num_train; got {self.num_train_short})")
        for key in ("num_values", "num_noise", "num_train", "num_val", "num_test"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.{key} must be >= 1 (got {getattr(self, key)})")


def token_ranges(cfg: MQARConfig) -> tuple[int, int, int]:
    """First ids of keys, values and noise tokens (0 is padding)."""
    key0 = 1
    value0 = key0 + cfg.num_keys
    noise0 = value0 + cfg.num_values
    return key0, value0, noise0


def _places(rng: np.random.Generator, n: int, slots: int, width: int) -> np.ndarray:
    """(n,) sorted start positions of ``n`` non-overlapping runs of ``width`` tokens in ``slots``
    positions, uniformly over such arrangements (stars and bars)."""
    free = slots - n * width
    gaps = np.sort(rng.choice(free + n, size=n, replace=False)) - np.arange(n)
    return gaps + np.arange(n) * width


def generate(cfg: MQARConfig, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, max_len) int64, targets (n, max_len) int64 with IGNORE off the queries)."""
    key0, value0, noise0 = token_ranges(cfg)
    length, pairs = cfg.max_len, cfg.num_pairs
    context = int(length * cfg.context_fraction)
    inputs = noise0 + rng.integers(0, cfg.num_noise, size=(n, length))
    targets = np.full((n, length), IGNORE, dtype=np.int64)
    rows = np.arange(n)[:, None]
    keys = np.argsort(rng.random((n, cfg.num_keys)), axis=1)[:, :pairs]  # distinct keys per sequence
    values = np.argsort(rng.random((n, cfg.num_values)), axis=1)[:, :pairs]  # distinct values too (see below)
    at = np.stack([_places(rng, pairs, context, 2) for _ in range(n)])  # (n, pairs) pair starts
    inputs[rows, at] = key0 + keys
    inputs[rows, at + 1] = value0 + values
    order = np.argsort(rng.random((n, pairs)), axis=1)  # queries in a random order of the keys
    query_at = context + np.stack([_places(rng, pairs, length - context, 1) for _ in range(n)])
    inputs[rows, query_at] = key0 + np.take_along_axis(keys, order, axis=1)
    targets[rows, query_at] = np.take_along_axis(values, order, axis=1)
    return inputs.astype(np.int64), targets


def solve(tokens, cfg: MQARConfig) -> list[int]:
    """An independent solver: the target of every position read from the tokens alone (the
    value after a key's first occurrence, at the key's later occurrences; IGNORE elsewhere)."""
    key0, value0, _ = token_ranges(cfg)
    seen: dict[int, int] = {}
    out = []
    for i, t in enumerate(tokens):
        t = int(t)
        if key0 <= t < value0:
            if t in seen:
                out.append(seen[t])
                continue
            seen[t] = int(tokens[i + 1]) - value0
        out.append(IGNORE)
    return out


def generate_splits(cfg: MQARConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/validation/test from one seed; held-out sequences equal to a train one are redrawn."""
    return unseen_splits(
        lambda n, rng: generate(cfg, n, rng),
        (cfg.num_train, cfg.num_val, cfg.num_test),
        cfg.data_seed,
        fails="mqar: could not draw held-out sequences unseen in train; widen the vocabulary",
    )


@register_task(
    "mqar",
    MQARConfig,
    sources=("generated",),
    scales={
        # CI: 256 tokens, 8 pairs.
        "tiny": {
            "task": {
                "max_len": 256,
                "num_pairs": 8,
                "num_keys": 32,
                "num_values": 8,
                "num_train": 2000,
                "num_val": 200,
                "num_test": 200,
            },
            "model": {"positions": "none", "short_conv": 2},
        },
        # 2 CPU cores: 1K tokens, 16 pairs over 16 value classes (chance 6.25%), one layer of width 64 with
        # 2 heads after a short convolution (kernel 2: the value's position also sees its key, so one
        # attention layer can match a query to it; without it, 2 layers stayed at chance after 1500 steps
        # at 128 tokens), no position embeddings (the recall is by content, and the model trained short
        # then runs long unchanged). Warm start: 300 steps of 64 sequences at 64 tokens, then 60 steps
        # of 8 at 1K. Measured in the CPU grid's run (make benchmark at 567b2a2, seeds 0/1/2): softmax
        # 0.997/0.987/0.999 at 1K and 0.957/0.818/0.977 at 4K (`task.max_len=4096 train.batch_size=4`);
        # linear 0.064/0.068/0.067 at 1K (chance 0.0625).
        "small": {
            "task": {"max_len": 1024},
            "model": {
                "dim": 64,
                "depth": 1,
                "heads": 2,
                "mlp_dim": 128,
                "dropout": 0.0,
                "positions": "none",
                "short_conv": 2,
            },
            "train": {
                "max_steps": 360,
                "batch_size": 8,
                "lr": 3e-3,
                "weight_decay": 0.0,
                "warmup_steps": 20,
                "eval_every": 60,
                "eval_batches": 16,
                "warmup_length": 64,
                "warmup_length_steps": 300,
                "warmup_batch_size": 64,
            },
        },
        # a GPU: 4K tokens, 64 pairs, 2 layers of width 128.
        "lra": {
            "task": {
                "max_len": 4096,
                "num_pairs": 64,
                "num_keys": 256,
                "num_values": 64,
                "num_train": 100000,
                "num_val": 2000,
                "num_test": 2000,
            },
            "model": {
                "dim": 128,
                "depth": 2,
                "heads": 4,
                "mlp_dim": 256,
                "dropout": 0.0,
                "positions": "none",
                "short_conv": 2,
            },
            "train": {"max_steps": 20000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 500, "eval_every": 1000},
        },
    },
)
class MQAR(Task):
    """Multi-query associative recall: classify each query key's value (tagger head)."""

    head = "tagger"

    @property
    def vocab_size(self) -> int:
        return 1 + self.cfg.num_keys + self.cfg.num_values + self.cfg.num_noise

    @property
    def num_classes(self) -> int:
        return self.cfg.num_values

    def at_length(self, length: int) -> dict:
        """The task config at another sequence length (the warm start's short sequences, as many
        as ``num_train_short`` when it is set)."""
        import dataclasses

        train = self.cfg.num_train_short or self.cfg.num_train
        return {**dataclasses.asdict(self.cfg), "max_len": int(length), "num_train": train, "num_train_short": 0}

    def build(self):
        import datasets

        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict({"input_ids": x.tolist(), "targets": y.tolist()})
                for split, (x, y) in generate_splits(self.cfg).items()
            }
        )
