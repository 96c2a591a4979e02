"""ListOps (Nangia & Bowman 2018; long version of LRA, Tay et al. 2021, arXiv:2011.04006).

Evaluate a nested list expression over the digits 0-9, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]``
= 9. Ten classes (the value). Two sources:

* ``generated`` (offline default): a seeded port of LRA's generator
  (``lra_benchmarks/data/listops.py``). A node is a value with probability 0.75
  (``random() > VALUE_P = 0.25``), always a value at ``max_depth`` (root = depth 1),
  otherwise one of ``[MIN [MAX [MED [SM`` with ``randint(2, max_args)`` arguments. The
  tree is left-nested ``((((op, a1), a2), ...), ])`` and printed with parentheses around
  every pair, as LRA writes it. Length = values + 2 per operator; a tree is kept when
  ``min_length < length < max_length``; duplicates are dropped (first occurrence kept,
  so the same seed gives the same files).
* ``lra``: LRA's released ``basic_{train,val,test}.tsv`` in ``task.data_dir``, read as its
  generator writes them (Python's ``csv`` defaults: CRLF line ends; LF and a BOM are read too).

Tokenised as LRA's input pipeline does: parentheses dropped, operators, digits and
``]`` are the tokens. ``python -m harness tool listops-generate data_dir=DIR ...`` writes the
generated source in LRA's file format.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.core import register_task
from harness.data import DataSourceError, MalformedRecord, Task, text_lines

log = logging.getLogger(__name__)

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUES = tuple(range(10))
VALUE_P = 0.25
TOKENS = ("<pad>", *map(str, VALUES), *OPERATORS, END)
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
DIGITS = frozenset(map(str, VALUES))
SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}


@dataclass
class ListOpsConfig:
    source: str = "generated"  # generated | lra
    data_dir: str = ""  # lra: folder with basic_{train,val,test}.tsv
    max_len: int = 2000  # longest token sequence the model sees (LRA: 2000)
    min_length: int = 500  # generated: keep trees with min_length < length < max_length
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10
    num_train: int = 96000
    num_val: int = 2000
    num_test: int = 2000
    data_seed: int = 0  # generator seed (independent of the training seed)


# ----------------------------------------------------------------------------- generator


def generate_tree(rng: random.Random, depth: int = 1, *, max_depth: int = 10, max_args: int = 10):
    """(tree, length): LRA's recursive generator, with an explicit random source."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2
    args = []
    for _ in range(rng.randint(2, max_args)):
        sub, sub_len = generate_tree(rng, depth + 1, max_depth=max_depth, max_args=max_args)
        args.append(sub)
        length += sub_len
    tree = (rng.choice(OPERATORS), args[0])
    for arg in args[1:]:
        tree = (tree, arg)
    return (tree, END), length


def to_string(tree) -> str:
    """LRA's printing: parentheses around every pair, tokens separated by spaces."""
    if isinstance(tree, (str, int)):
        return str(tree)
    return f"( {to_string(tree[0])} {to_string(tree[1])} )"


def apply_operator(op: str, args: list[int]) -> int:
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == MED:
        return int(np.median(args))
    if op == SUM_MOD:
        return sum(args) % 10
    raise ValueError(f"unknown operator {op}")


def to_value(tree) -> int:
    """The value of a left-nested tree (as LRA's ``to_value``)."""
    if not isinstance(tree, tuple):
        return tree
    left, right = tree
    if right == END:
        op, args = _collect(left)
        return apply_operator(op, args)
    raise ValueError("a tree must end with ]")


def _collect(tree) -> tuple[str, list[int]]:
    """((op, a1), a2)... -> (op, [a1, a2, ...]) without recursion on the spine."""
    args = []
    while isinstance(tree, tuple) and tree[0] not in OPERATORS:
        tree, arg = tree
        args.append(to_value(arg))
    op, first = tree
    args.append(to_value(first))
    return op, args[::-1]


def generate_split_rows(cfg: ListOpsConfig) -> dict[str, list[tuple[str, int]]]:
    """{split: [(source string, value)]}, distinct trees, seeded."""
    rng = random.Random(cfg.data_seed)
    wanted = cfg.num_train + cfg.num_val + cfg.num_test
    trees: dict = {}
    attempts = 0
    while len(trees) < wanted:
        tree, length = generate_tree(rng, max_depth=cfg.max_depth, max_args=cfg.max_args)
        attempts += 1
        if cfg.min_length < length < cfg.max_length:
            trees.setdefault(tree, None)
        if attempts > 2000 * wanted + 100_000:
            raise DataSourceError(
                f"ListOps generator found only {len(trees)} of {wanted} trees with "
                f"{cfg.min_length} < length < {cfg.max_length} in {attempts} draws; widen the window"
            )
    rows = [(to_string(t), to_value(t)) for t in trees]
    cut1, cut2 = cfg.num_train, cfg.num_train + cfg.num_val
    log.info("ListOps generator: %d draws for %d distinct trees", attempts, wanted)
    return {"train": rows[:cut1], "validation": rows[cut1:cut2], "test": rows[cut2:]}


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    """LRA's file format, as its generator writes it: ``csv.writer(f, delimiter='\\t')``
    (CRLF line ends), header ``Source\\tTarget``, one expression per line."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows(rows)


# ----------------------------------------------------------------------------- reading


def tokenize(source: str) -> list[str]:
    """LRA's input pipeline: drop parentheses, split on whitespace."""
    return source.replace("(", " ").replace(")", " ").split()


def encode(source: str) -> list[int]:
    return [TOKEN_ID[t] for t in tokenize(source)]


def read_tsv(path: Path) -> list[tuple[list[int], int]]:
    """(token ids, label) per row of an LRA ListOps TSV, as LRA's generator writes it
    (``csv.writer(f, delimiter='\\t')``: CRLF line ends; LF and a UTF-8 BOM are read too).
    Malformed rows name file and line; an empty or header-only file is an error naming it."""
    if not path.exists():
        raise DataSourceError(
            f"{path} not found. Download LRA's release (lra_release.gz from "
            f"github.com/google-research/long-range-arena), and set task.data_dir to its "
            f"listops-1000 folder with basic_train.tsv, basic_val.tsv, basic_test.tsv"
        )
    rows = []
    for line_no, line in text_lines(path, what="a ListOps TSV (header Source<TAB>Target)"):
        fields = line.split("\t")
        if line_no == 1:
            if fields != ["Source", "Target"]:
                raise MalformedRecord(path, 1, f"expected header 'Source<TAB>Target', got {line.strip()[:60]!r}")
            continue
        if not line.strip():
            continue
        if len(fields) != 2:
            raise MalformedRecord(path, line_no, f"expected 2 tab-separated fields, got {len(fields)}")
        source, target = fields
        unknown = sorted({t for t in tokenize(source) if t not in TOKEN_ID})
        if unknown:
            raise MalformedRecord(path, line_no, f"unknown tokens {unknown[:5]}; valid: {' '.join(TOKENS[1:])}")
        if target.strip() not in DIGITS:
            raise MalformedRecord(path, line_no, f"target {target!r} is not a digit 0-9")
        rows.append((encode(source), int(target)))
    if not rows:
        raise DataSourceError(f"{path} holds only its header, no expressions; expected LRA's basic_*.tsv rows")
    return rows


@register_task(
    "listops",
    ListOpsConfig,
    sources=("generated", "lra"),
    requires=("key_padding",),
    scales={
        # CI: short expressions, a few seconds per cell.
        "tiny": {
            "task": {
                "max_len": 64,
                "min_length": 8,
                "max_length": 64,
                "num_train": 640,
                "num_val": 128,
                "num_test": 128,
            }
        },
        # 2 CPU cores, a minute or two per cell.
        "small": {
            "task": {
                "max_len": 128,
                "min_length": 16,
                "max_length": 128,
                "num_train": 12000,
                "num_val": 500,
                "num_test": 1000,
            }
        },
        # scale=lra: harness/conf/protocol/<protocol>/listops.yaml (protocol=lra, pytorch, nystromformer;
        # docs/protocols.md)
    },
)
class ListOps(Task):
    """ListOps: nested MIN/MAX/MED/SUM-MOD expressions over digits, 10 classes."""

    head = "classifier"

    @property
    def vocab_size(self) -> int:
        return len(TOKENS)

    @property
    def num_classes(self) -> int:
        return 10

    def cache_params(self):
        params = super().cache_params()
        if self.cfg.source == "lra":  # generator knobs don't matter for files
            for key in (
                "min_length",
                "max_length",
                "max_depth",
                "max_args",
                "num_train",
                "num_val",
                "num_test",
                "data_seed",
            ):
                params.pop(key)
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
        return params

    def source_files(self) -> list[Path]:
        if self.cfg.source == "lra" and self.cfg.data_dir:
            return [Path(self.cfg.data_dir) / name for name in SPLIT_FILES.values()]
        return []

    def build(self):
        import datasets

        if self.cfg.source == "lra":
            if not self.cfg.data_dir:
                raise DataSourceError("task.source=lra needs task.data_dir=<folder with basic_{train,val,test}.tsv>")
            splits = {s: read_tsv(Path(self.cfg.data_dir) / f) for s, f in SPLIT_FILES.items()}
        else:
            splits = {s: [(encode(src), y) for src, y in rows] for s, rows in generate_split_rows(self.cfg).items()}
        truncated = sum(len(ids) > self.max_len for rows in splits.values() for ids, _ in rows)
        if truncated:
            log.warning("ListOps: %d sequences longer than max_len=%d are truncated", truncated, self.max_len)
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"input_ids": [ids[: self.max_len] for ids, _ in rows], "label": [y for _, y in rows]}
                )
                for split, rows in splits.items()
            }
        )


@dataclass
class GenerateSettings:
    """Write the generated source as LRA's basic_{train,val,test}.tsv (read back with task.source=lra
    task.data_dir=DIR)."""

    data_dir: str = "???"  # the folder to write basic_{train,val,test}.tsv into
    num_train: int = 96000
    num_val: int = 2000
    num_test: int = 2000
    seed: int = 0  # the generator's seed (the task's data_seed)
    min_length: int = 500  # a tree is kept when min_length < length < max_length
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10


def generate(settings: GenerateSettings) -> int:
    """``python -m harness tool listops-generate``: write the three files, print one line each."""
    cfg = ListOpsConfig(
        num_train=settings.num_train,
        num_val=settings.num_val,
        num_test=settings.num_test,
        data_seed=settings.seed,
        min_length=settings.min_length,
        max_length=settings.max_length,
        max_depth=settings.max_depth,
        max_args=settings.max_args,
    )
    out = Path(settings.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate_split_rows(cfg).items():
        write_tsv(out / SPLIT_FILES[split], rows)
        print(f"{out / SPLIT_FILES[split]}: {len(rows)} rows")
    return 0
