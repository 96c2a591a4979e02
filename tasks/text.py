"""Byte-level document classification (LRA "Text", Tay et al. 2021, arXiv:2011.04006).

A document, read as UTF-8 bytes (token = byte + 1; 0 is padding), truncated to
``max_len`` bytes, is classified as a whole. Two sources:

* ``manpages`` (offline default): the Linux man-pages of Debian ``manpages`` and
  ``manpages-dev`` (1,100 documents once redirects are folded in; see
  ``tasks/_manpages.py``), converted from roff to plain text. The label is the page's
  **manual section** (``task.sections``, default ``2,3``: system calls vs library
  functions), which must be inferred from the prose: the ``.TH`` title line and the
  page's mentions of itself with a section (``read(2)`` in read's own page → ``read``)
  are removed. Documents are split (train/validation/test) **by page**, stratified by
  section; an example is the start of a page (``windows_per_doc=1``, LRA's truncation) or
  up to ``windows_per_doc`` consecutive ``max_len``-byte windows of it. Each split is then
  balanced by subsampling the larger classes (counts logged).
* ``imdb``: IMDB reviews (Maas et al. 2011), positive vs negative, as in LRA, from
  ``task.data_dir`` holding either the ``aclImdb/{train,test}/{pos,neg}/*.txt`` release,
  a ``save_to_disk`` copy of the HF dataset ``stanfordnlp/imdb`` or its parquet files
  (``plain_text/{train,test}-*.parquet``). Never downloaded. Review files are read as
  released (UTF-8, ``<br />`` tags kept as LRA's byte pipeline keeps them); a BOM is
  dropped and CRLF read as LF. LRA validated on the test
  set; here a validation split (``val_fraction``, stratified, ``data_seed``) is carved
  from train and test is only used for the final number.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.core import register_task
from harness.data.task import DataSourceError, MalformedRecord, Task, decode_text, files_under, stratified_split

log = logging.getLogger(__name__)

BYTE_VOCAB = 257  # 0 = padding, byte b -> b + 1
IMDB_FILE_RE = re.compile(r"^(\d+)_(\d+)\.txt$")  # <review id>_<rating 1-10>.txt
IMDB_LABELS = {"neg": 0, "pos": 1}
IMDB_HINT = (
    "Download IMDB (https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz) and extract it so that "
    "<data_dir>/aclImdb/train/pos exists, or save the HF dataset: "
    "datasets.load_dataset('stanfordnlp/imdb').save_to_disk('<data_dir>') (or download its "
    "plain_text/{train,test}-00000-of-00001.parquet files into <data_dir>); then set task.data_dir=<data_dir>"
)


@dataclass
class TextConfig:
    source: str = "manpages"  # manpages | imdb
    data_dir: str = ""  # imdb: folder with aclImdb/, a save_to_disk copy of stanfordnlp/imdb, or its parquet files
    max_len: int = 1000  # bytes per document (LRA's released config: 1000)
    sections: str = "2,3"  # manpages: manual sections, one class each, in this order
    windows_per_doc: int = 1  # manpages: examples per page (consecutive max_len-byte windows; 1 = its start)
    val_fraction: float = 0.1  # of pages (manpages) or of IMDB's train set (imdb)
    test_fraction: float = 0.1  # manpages: of pages (IMDB has its own test set)
    data_seed: int = 0  # page split, class balancing, IMDB validation split


def encode_bytes(text: str, max_len: int) -> list[int]:
    """UTF-8 bytes + 1, truncated to ``max_len`` (0 stays free for padding)."""
    raw = np.frombuffer(text.encode("utf-8")[:max_len], dtype=np.uint8)
    return (raw.astype(np.int64) + 1).tolist()


def byte_windows(text: str, max_len: int, count: int) -> list[list[int]]:
    """Up to ``count`` consecutive windows of ``max_len`` bytes; a window after the first
    is kept only when at least half full."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 1
    windows = []
    for start in range(0, max(len(raw), 1), max_len):
        piece = raw[start : start + max_len]
        if windows and (len(windows) >= count or 2 * len(piece) < max_len):
            break
        windows.append(piece.tolist())
    return windows


def balance(labels: list[int], seed: int, what: str) -> list[int]:
    """Indices keeping every class at the size of the smallest (seeded subsample)."""
    counts = Counter(labels)
    if not counts:
        return []
    smallest = min(counts.values())
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for y in sorted(counts):
        idx = [i for i, label in enumerate(labels) if label == y]
        keep.extend(int(i) for i in rng.choice(idx, size=smallest, replace=False))
    dropped = len(labels) - len(keep)
    if dropped:
        log.info(
            "%s: balanced classes to %d each, dropped %d of %d examples (%s)",
            what,
            smallest,
            dropped,
            len(labels),
            ", ".join(f"class {y}: {n}" for y, n in sorted(counts.items())),
        )
    return sorted(keep)


# ----------------------------------------------------------------------------- manpages


def parse_sections(spec: str) -> list[str]:
    sections = [s.strip() for s in spec.split(",") if s.strip()]
    if len(sections) < 2 or len(set(sections)) != len(sections) or not all(s.isdigit() for s in sections):
        raise ValueError(f"task.sections='{spec}': give two or more distinct manual sections, e.g. '2,3' or '2,3,7'")
    return sections


def manpage_documents(sections: list[str]) -> list[tuple[str, str, int]]:
    """(page key, plain text, label) of every page in ``sections``, sorted by key."""
    from tasks._manpages import load_corpus

    pages = load_corpus()
    docs = [
        (key, page.text(), sections.index(page.section))
        for key, page in sorted(pages.items())
        if page.section in sections
    ]
    counts = Counter(sections[y] for _, _, y in docs)
    log.info("man pages by section: %s", ", ".join(f"{s}: {counts[s]}" for s in sections))
    missing = [s for s in sections if not counts[s]]
    if missing:
        raise DataSourceError(f"no man pages of section(s) {missing} in manpages/manpages-dev; valid: 1-8")
    return docs


def split_documents(cfg: TextConfig) -> dict[str, list[tuple[str, str, int]]]:
    """{split: [(page key, text, label)]}: pages split by document, stratified by section."""
    docs = manpage_documents(parse_sections(cfg.sections))
    fractions = (1.0 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction)
    if min(fractions) <= 0:
        raise ValueError(
            f"task.val_fraction={cfg.val_fraction} and task.test_fraction={cfg.test_fraction} must be > 0 and sum < 1"
        )
    parts = stratified_split([y for _, _, y in docs], fractions, cfg.data_seed)
    return {split: [docs[i] for i in idx] for split, idx in zip(("train", "validation", "test"), parts)}


def build_manpages(cfg: TextConfig) -> dict[str, tuple[list[list[int]], list[int], list[int]]]:
    """{split: (ids, labels, clusters)}: a window's cluster is its page (windows of one page are
    not independent test units; the report's intervals are cluster-robust over them)."""
    splits = {}
    for k, (split, docs) in enumerate(split_documents(cfg).items()):
        ids, labels, pages = [], [], []
        for page, (_, text, y) in enumerate(docs):
            for window in byte_windows(text, cfg.max_len, cfg.windows_per_doc):
                ids.append(window)
                labels.append(y)
                pages.append(page)
        keep = balance(labels, cfg.data_seed + 1 + k, f"text/manpages {split}")
        splits[split] = ([ids[i] for i in keep], [labels[i] for i in keep], [pages[i] for i in keep])
    return splits


# ----------------------------------------------------------------------------- IMDB


def read_aclimdb_split(folder: Path) -> tuple[list[str], list[int]]:
    """Reviews and labels of ``aclImdb/<split>`` (``pos``/``neg`` folders of ``<id>_<rating>.txt``)."""
    texts, labels = [], []
    for name, label in IMDB_LABELS.items():
        sub = folder / name
        if not sub.is_dir():
            raise DataSourceError(f"{sub} not found: an aclImdb split needs pos/ and neg/ folders. {IMDB_HINT}")
        files = sorted(sub.iterdir(), key=lambda p: (len(p.name), p.name))
        for path in files:
            m = IMDB_FILE_RE.match(path.name)
            if not m:
                raise MalformedRecord(path, "file name", "expected <id>_<rating>.txt as in the aclImdb release")
            rating = int(m.group(2))
            if (label == 1 and not 7 <= rating <= 10) or (label == 0 and not 1 <= rating <= 4):
                raise MalformedRecord(
                    path, "file name", f"rating {rating} does not belong in {name}/ (neg: 1-4, pos: 7-10)"
                )
            text = decode_text(path, path.read_bytes(), what="an IMDB review (UTF-8 text)")
            if not text.strip():
                raise DataSourceError(f"{path} is empty; expected an IMDB review (UTF-8 text)")
            texts.append(text)
            labels.append(label)
    return texts, labels


def _check_rows(path: Path, texts: list, labels: list) -> tuple[list[str], list[int]]:
    for i, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not text.strip():
            raise MalformedRecord(path, f"record {i}", f"'text' is empty or not a string: {text!r:.60}")
        if label not in (0, 1):
            raise MalformedRecord(path, f"record {i}", f"'label' {label!r} is not 0 (neg) or 1 (pos)")
    return list(texts), [int(y) for y in labels]


def read_imdb(data_dir: Path) -> dict[str, tuple[list[str], list[int]]]:
    """{"train"|"test": (texts, labels)} from any of IMDB's published layouts in ``data_dir``."""
    if not data_dir.is_dir():
        raise DataSourceError(f"task.data_dir={data_dir} is not a folder. {IMDB_HINT}")
    for root in (data_dir, data_dir / "aclImdb"):
        if (root / "train" / "pos").is_dir():
            return {split: read_aclimdb_split(root / split) for split in ("train", "test")}
    if (data_dir / "dataset_dict.json").exists():
        import datasets

        dsd = datasets.load_from_disk(str(data_dir))
        out = {}
        for split in ("train", "test"):
            if split not in dsd or not {"text", "label"} <= set(dsd[split].column_names):
                raise DataSourceError(
                    f"{data_dir}: expected splits train/test with columns text, label (stanfordnlp/imdb)"
                )
            out[split] = _check_rows(data_dir / split, dsd[split]["text"], dsd[split]["label"])
        return out
    parquet = {split: sorted(data_dir.rglob(f"{split}-*.parquet")) for split in ("train", "test")}
    if parquet["train"] and parquet["test"]:
        import pyarrow.parquet as pq

        out = {}
        for split, paths in parquet.items():
            texts, labels = [], []
            for path in paths:
                try:
                    table = pq.read_table(path, columns=["text", "label"])
                except Exception as exc:  # corrupt file or missing columns
                    raise MalformedRecord(
                        path, "whole file", f"not a parquet table with columns text, label ({exc})"
                    ) from exc
                rows = _check_rows(path, table.column("text").to_pylist(), table.column("label").to_pylist())
                texts += rows[0]
                labels += rows[1]
            out[split] = (texts, labels)
        return out
    raise DataSourceError(f"no IMDB data in {data_dir}. {IMDB_HINT}")


def imdb_files(data_dir: Path) -> list[Path]:
    """The files ``read_imdb`` reads in ``data_dir`` (whichever layout it holds)."""
    for root in (data_dir, data_dir / "aclImdb"):
        if (root / "train" / "pos").is_dir():
            return [
                p
                for split in ("train", "test")
                for name in IMDB_LABELS
                for p in files_under(root / split / name, "*.txt")
            ]
    return files_under(data_dir)


def build_imdb(cfg: TextConfig) -> dict[str, tuple[list[list[int]], list[int]]]:
    if not cfg.data_dir:
        raise DataSourceError(f"task.source=imdb needs task.data_dir. {IMDB_HINT}")
    data = read_imdb(Path(cfg.data_dir))
    texts, labels = data["train"]
    train_idx, val_idx = stratified_split(labels, (1.0 - cfg.val_fraction, cfg.val_fraction), cfg.data_seed)
    test_texts, test_labels = data["test"]
    rows = {
        "train": ([texts[i] for i in train_idx], [labels[i] for i in train_idx]),
        "validation": ([texts[i] for i in val_idx], [labels[i] for i in val_idx]),
        "test": (test_texts, test_labels),
    }
    return {split: ([encode_bytes(t, cfg.max_len) for t in ts], ys) for split, (ts, ys) in rows.items()}


# ----------------------------------------------------------------------------- the task


@register_task(
    "text",
    TextConfig,
    sources=("manpages", "imdb"),
    requires=("key_padding",),
    scales={
        # CI: the first 256 bytes of each page, a few hundred pages.
        "tiny": {"task": {"max_len": 256}},
        # 2 CPU cores: 256-byte windows, up to 4 per page (pages split by document), 1,758 train
        # examples; softmax: 0.78 test accuracy vs 0.50 majority, ~60 s of CPU for 600 steps.
        "small": {"task": {"max_len": 256, "windows_per_doc": 4}},
        # scale=lra: harness/conf/protocol/<protocol>/text.yaml (protocol=lra, pytorch, nystromformer;
        # docs/protocols.md)
    },
)
class Text(Task):
    """Byte-level document classification: man page section (offline) or IMDB sentiment."""

    head = "classifier"
    debian_packages: ClassVar[tuple[str, ...]] = ("manpages", "manpages-dev")

    def __init__(self, cfg: TextConfig, *, scale: str = "tiny"):
        super().__init__(cfg, scale=scale)
        if cfg.source == "manpages":
            parse_sections(cfg.sections)  # a bad task.sections fails here, not after training starts
        if cfg.max_len < 1:
            raise ValueError(f"task.max_len={cfg.max_len} must be >= 1")

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    @property
    def num_classes(self) -> int:
        return 2 if self.cfg.source == "imdb" else len(parse_sections(self.cfg.sections))

    def cache_params(self):
        params = super().cache_params()
        if self.cfg.source == "imdb":
            for key in ("sections", "windows_per_doc", "test_fraction"):
                params.pop(key)
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
        else:
            params.pop("data_dir")
        return params

    def source_files(self) -> list[Path]:
        if self.cfg.source == "imdb":
            return imdb_files(Path(self.cfg.data_dir)) if self.cfg.data_dir else []
        from tasks._manpages import source_files

        return source_files()

    def build(self):
        import datasets

        splits = build_imdb(self.cfg) if self.cfg.source == "imdb" else build_manpages(self.cfg)
        columns = ("input_ids", "label", "cluster")  # IMDB reviews are their own units: no cluster column
        return datasets.DatasetDict(
            {split: datasets.Dataset.from_dict(dict(zip(columns, parts))) for split, parts in splits.items()}
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.text [sections]``: print a converted page per section (a sanity look)."""
    import sys

    sections = parse_sections((argv or sys.argv[1:] or ["2,3"])[0])
    docs = manpage_documents(sections)
    for s in sections:
        key, text, _ = next(d for d in docs if sections[d[2]] == s)
        print(json.dumps({"page": key, "text": text[:400]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
