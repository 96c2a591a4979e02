"""Tasks: the base class every task subclasses, the data cache, batching.

A task turns its source (``cfg.source``) into a ``datasets.DatasetDict`` with splits
``train``, ``validation``, ``test``. Columns by head:

* ``classifier``: ``input_ids`` (list[int]), ``label`` (int)
* ``matcher``:    ``input_ids_1``, ``input_ids_2``, ``label``  (two-tower retrieval)
* ``lm``:         ``input_ids``  (next-token prediction; the causal capability is required)

Token id 0 is padding for every task (``PAD_ID``). Prepared data is saved once with
``save_to_disk`` under ``<cache_dir>/<task>/<source>-<key>/``, the key a hash of the
task's config, so the grid never regenerates it; a ``meta.json`` beside it holds the
content fingerprint, split sizes, lengths and the majority-class baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

log = logging.getLogger(__name__)

PAD_ID = 0
SPLITS = ("train", "validation", "test")
CACHE_ENV = "HARNESS_CACHE_DIR"
DEFAULT_CACHE_DIR = ".cache/data"


class DataSourceError(RuntimeError):
    """The data source is missing or malformed; the message says what to do."""


class MalformedRecord(DataSourceError):
    """A record of a data file cannot be read: names the file and the line/record."""

    def __init__(self, path: str | Path, where: str | int, problem: str):
        where = f"line {where}" if isinstance(where, int) else where
        super().__init__(f"{path}, {where}: {problem}")


@dataclass
class DataInfo:
    """What a result records about the data it was trained and tested on."""

    source: str
    fingerprint: str
    majority_accuracy: float | None
    num_classes: int | None
    sizes: dict[str, int] = field(default_factory=dict)
    length_mean: float = 0.0
    length_max: int = 0
    cache_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Task:
    """Base class of a task. Subclasses are registered with ``register_task`` and set:

    head          which model head: "classifier", "matcher" or "lm"
    vocab_size    number of token ids, padding (0) included
    num_classes   classes for classifier/matcher heads
    build()       the DatasetDict from ``self.cfg.source`` (uncached; the base caches it)
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    sources: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    head: ClassVar[str] = "classifier"
    data_version: ClassVar[int] = 1  # bump when build() changes its output

    def __init__(self, cfg: Any, *, scale: str = "tiny"):
        self.cfg = cfg
        self.scale = scale
        source = getattr(cfg, "source", None)
        if source is not None and source not in self.sources:
            raise ValueError(f"task '{self.name}' has no source '{source}'; valid sources: {', '.join(self.sources)}")

    # -- to implement -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int | None:
        return None

    @property
    def max_len(self) -> int:
        """The longest sequence the model sees (one document for matcher tasks)."""
        return int(self.cfg.max_len)

    def build(self):
        """Return a datasets.DatasetDict with the splits train/validation/test."""
        raise NotImplementedError

    # -- caching ------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return str(getattr(self.cfg, "source", "default"))

    def cache_params(self) -> dict[str, Any]:
        """Everything that determines the prepared data (default: the whole config)."""
        return {"task": self.name, "version": self.data_version, **dataclasses.asdict(self.cfg)}

    def cache_key(self) -> str:
        blob = json.dumps(self.cache_params(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def cache_path(self, cache_dir: str | Path | None = None) -> Path:
        root = Path(cache_dir or os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))
        return root / self.name / f"{self.source}-{self.cache_key()}"

    def load(self, cache_dir: str | Path | None = None):
        """(DatasetDict, DataInfo): from the cache, building and saving it the first time."""
        import datasets

        path = self.cache_path(cache_dir)
        meta_path = path / "meta.json"
        if not meta_path.exists():
            log.info("preparing %s data (source=%s) into %s", self.name, self.source, path)
            dsd = self.build()
            missing = [s for s in SPLITS if s not in dsd]
            if missing:
                raise DataSourceError(f"task '{self.name}' built no split(s) {missing}")
            info = self.describe(dsd)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
            try:
                dsd.save_to_disk(str(tmp / "data"))
                (tmp / "meta.json").write_text(json.dumps(info.as_dict(), indent=1))
                if path.exists():  # a half-written cache from a killed run
                    shutil.rmtree(path)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        dsd = datasets.load_from_disk(str(path / "data"))
        info = DataInfo(**json.loads(meta_path.read_text()))
        info.cache_path = str(path)
        return dsd, info

    def describe(self, dsd) -> DataInfo:
        """Statistics of prepared data: sizes, lengths, majority baseline, fingerprint."""
        digest = hashlib.sha256()
        lengths: list[int] = []
        for split in SPLITS:
            ds = dsd[split]
            for column in sorted(ds.column_names):
                values = ds[column]
                if column.startswith("input_ids"):
                    lengths.extend(len(x) for x in values) if split == "test" else None
                    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in values]) if len(values) else []
                    digest.update(np.asarray(flat, dtype=np.int64).tobytes())
                    digest.update(np.asarray([len(x) for x in values], dtype=np.int64).tobytes())
                else:
                    digest.update(json.dumps(values, default=str).encode())
        majority = None
        if "label" in dsd["test"].column_names and len(dsd["test"]):
            train_counts = Counter(dsd["train"]["label"])
            majority_label = train_counts.most_common(1)[0][0]
            test_labels = dsd["test"]["label"]
            majority = sum(1 for y in test_labels if y == majority_label) / len(test_labels)
        return DataInfo(
            source=self.source,
            fingerprint=digest.hexdigest()[:16],
            majority_accuracy=majority,
            num_classes=self.num_classes,
            sizes={s: len(dsd[s]) for s in SPLITS},
            length_mean=float(np.mean(lengths)) if lengths else 0.0,
            length_max=int(max(lengths)) if lengths else 0,
        )


def pad_sequences(seqs: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L) long, padding_mask (B, L) bool True at padding), L = longest in batch."""
    length = max((len(s) for s in seqs), default=0) or 1
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, torch.arange(length)[None, :] >= lengths[:, None]


def pad_nested(values: list[list], pad_id: int = PAD_ID) -> torch.Tensor:
    """Stack per-example nested lists of unequal sizes, e.g. (L,), (L, F) or (L, L), into one
    long tensor (B, *max sizes), right-padded with ``pad_id``."""
    arrays = [np.asarray(v, dtype=np.int64) for v in values]
    ndim = max(a.ndim for a in arrays)
    arrays = [a.reshape(a.shape + (0,) * (ndim - a.ndim)) if a.size == 0 else a for a in arrays]
    shape = [max(a.shape[d] for a in arrays) for d in range(ndim)]
    out = np.full((len(arrays), *shape), pad_id, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return torch.from_numpy(out)


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad every ``input_ids*`` column (adding ``padding_mask*``); pad ``relations`` (B, L, L)
    and any other ``*_ids``/``*_links`` column of unequal lengths (decoder targets, copy ids)
    with PAD_ID; keep string columns as lists; stack the rest."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key.startswith("input_ids"):
            suffix = key[len("input_ids") :]
            batch[key], batch[f"padding_mask{suffix}"] = pad_sequences(values)
        elif values and isinstance(values[0], str) or (isinstance(values[0], list) and values[0] and isinstance(values[0][0], str)):
            batch[key] = values
        elif key == "relations" or key.endswith("_ids") or key.endswith("_links"):
            batch[key] = pad_nested(values)
        else:
            batch[key] = torch.as_tensor(values)
    return batch


def stratified_split(labels: list[int], fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Indices split per class in the given fractions (last part takes the remainder)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for _, idx in sorted(by_class.items()):
        idx = list(rng.permutation(idx))
        start = 0
        for p, frac in enumerate(fractions):
            end = len(idx) if p == len(fractions) - 1 else start + int(round(frac * len(idx)))
            parts[p].extend(int(i) for i in idx[start:end])
            start = end
    return [sorted(p) for p in parts]
