"""Tasks: the base class every task subclasses, the data cache, batching, text readers.

A task turns its source (``cfg.source``) into a ``datasets.DatasetDict`` with splits
``train``, ``validation``, ``test``. Columns by head:

* ``classifier``: ``input_ids`` (list[int]), ``label`` (int)
* ``matcher``:    ``input_ids_1``, ``input_ids_2``, ``label``  (two-tower retrieval)
* ``lm``:         ``input_ids``  (next-token prediction; the causal capability is required)

Token id 0 is padding for every task (``PAD_ID``).

The cache. Prepared data is saved once with ``save_to_disk`` under
``<cache_dir>/<task>/<source>-<key>/``, so the grid never regenerates it; a ``meta.json``
beside it holds the content fingerprint, split sizes, lengths, the majority-class baseline
and warnings about the data. The key hashes the task's config (``cache_params``) **and**
the size and modification time of every file the task reads (``source_files``): a source
file edited, added or removed after the first preparation gives another key, so stale
data is never served. A build runs under a file lock per cache path (``<key>.lock``
beside it): a second process preparing the same data waits, then loads what the first
saved. A split that comes out empty is an error, never cached. A cache that cannot be read
(truncated or deleted Arrow files, a broken ``meta.json``, sizes that disagree with it) is
rebuilt once, with a warning naming its path. Temporary folders ``.<name>-*`` left by a
killed build are removed when no process holds their lock.

Readers of real files share ``text_lines``: LF or CRLF line ends, an optional UTF-8 byte
order mark, binary content reported as ``MalformedRecord(file, line)``, an empty file as a
``DataSourceError`` naming it.
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

from harness.core.results import CACHE_ENV, DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

PAD_ID = 0
SPLITS = ("train", "validation", "test")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The data cache's root: ``cache_dir``, else ``$HARNESS_CACHE_DIR``, else ``.cache/data``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


class DataSourceError(RuntimeError):
    """The data source is missing or malformed; the message says what to do."""


class MalformedRecord(DataSourceError):
    """A record of a data file cannot be read: names the file and the line/record."""

    def __init__(self, path: str | Path, where: str | int, problem: str):
        where = f"line {where}" if isinstance(where, int) else where
        super().__init__(f"{path}, {where}: {problem}")


# ----------------------------------------------------------------------------- text files as released

UTF8_BOM = b"\xef\xbb\xbf"
# Bytes no text file holds: C0 controls other than tab, line feed, vertical tab, form feed,
# carriage return and escape (0x1b, seen in terminal-coloured text). NUL is the usual sign of binary data.
_BINARY_BYTES = bytes(c for c in range(32) if c not in (9, 10, 11, 12, 13, 27))


def _binary_column(line: bytes) -> int:
    """1-based column of the first byte no text holds, 0 if none."""
    if len(line.translate(None, _BINARY_BYTES)) == len(line):
        return 0
    return next(i for i, b in enumerate(line, start=1) if b in _BINARY_BYTES)


def decode_text(path: str | Path, raw: bytes, *, encoding: str = "utf-8", what: str = "a text file") -> str:
    """A whole text file's bytes as a string, as ``text_lines`` reads lines: a UTF-8 BOM
    dropped, CRLF read as LF; binary or undecodable content raises ``MalformedRecord(path, line)``."""
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
    if len(raw.translate(None, _BINARY_BYTES)) != len(raw):
        at = next(i for i, b in enumerate(raw) if b in _BINARY_BYTES)
        line_start = raw.rfind(b"\n", 0, at) + 1
        raise MalformedRecord(
            path,
            raw.count(b"\n", 0, at) + 1,
            f"byte 0x{raw[at]:02x} at column {at - line_start + 1}: binary data, not {what}",
        )
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        raise MalformedRecord(
            path,
            raw.count(b"\n", 0, exc.start) + 1,
            f"not {encoding} text ({exc.reason} at column {exc.start - line_start + 1}); expected {what}",
        ) from exc
    return text.replace("\r\n", "\n")


def text_lines(path: str | Path, *, encoding: str = "utf-8", what: str = "a text file"):
    """(line number, line) of a text file as its publisher wrote it, streamed.

    Accepts LF and CRLF line ends (a lone CR inside a line is kept) and a UTF-8 byte order
    mark before line 1; ``.gz`` files are decompressed. A line with bytes that no text file
    holds (NUL and other C0 controls) or that does not decode as ``encoding`` raises
    ``MalformedRecord(path, line)``; an empty file (nothing but whitespace and a BOM)
    raises ``DataSourceError`` naming it. ``what`` says what the file should be, for the
    messages. Line numbers count every line, blank ones included."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    empty = True
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]
                if raw.endswith(b"\n"):
                    raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
                column = _binary_column(raw)
                if column:
                    raise MalformedRecord(
                        path, line_no, f"byte 0x{raw[column - 1]:02x} at column {column}: binary data, not {what}"
                    )
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as exc:
                    raise MalformedRecord(
                        path, line_no, f"not {encoding} text ({exc.reason} at column {exc.start + 1}); expected {what}"
                    ) from exc
                empty = empty and not line.strip()
                yield line_no, line
    except (OSError, EOFError) as exc:  # gzip: not a gzip file, truncated stream
        raise MalformedRecord(path, "file", f"cannot be read ({exc}); expected {what}") from exc
    if empty:
        raise DataSourceError(f"{path} is empty; expected {what}")


# ----------------------------------------------------------------------------- the cache


def cache_lock(path: Path, timeout: float = -1):
    """The file lock guarding the cache folder ``path`` (``<path>.lock`` beside it)."""
    from filelock import FileLock

    return FileLock(str(path.parent / f"{path.name}.lock"), timeout=timeout)


def remove_orphans(folder: Path) -> list[Path]:
    """Remove temporary cache folders ``.<name>-*`` in ``folder`` that no build is writing
    now (their ``<name>.lock`` is free); returns what was removed."""
    from filelock import Timeout

    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if not (entry.name.startswith(".") and "-" in entry.name and entry.is_dir()):
            continue
        lock = cache_lock(folder / entry.name[1:].rsplit("-", 1)[0], timeout=0)
        try:
            with lock:
                if entry.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        except Timeout:  # a build of that cache is running and owns the folder
            continue
    if removed:
        log.info(
            "removed %d temporary cache folder(s) left by interrupted builds: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed


def stat_files(paths) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) per file, sorted; a missing file is (path, -1, -1)."""
    stats = []
    for p in map(os.fspath, paths):
        try:
            st = os.stat(p)
            stats.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((p, -1, -1))
    return sorted(stats)


def files_under(folder: str | Path, *patterns: str) -> list[Path]:
    """The files below ``folder`` (recursively, links followed) whose names match any of
    ``patterns`` (default: all), sorted; none when the folder does not exist."""
    import fnmatch

    found: list[str] = []
    for root, _, names in os.walk(folder, followlinks=True):
        if patterns:
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        found.extend(os.path.join(root, n) for n in names)
    return [Path(p) for p in sorted(found)]


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
    warnings: list[str] = field(
        default_factory=list
    )  # about the data (e.g. a single-class test split); into the result
    cache_root: str = ""  # the cache's root, absolute, when it was loaded (``cache_path`` lies below it)
    # per test example, the cluster of test units it shares with others (a ``cluster`` column: windows
    # of one page, pairs sharing a document); the report's intervals are cluster-robust over them
    test_clusters: list[int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_record(self) -> dict[str, Any]:
        """What a result records: ``cache_path`` relative to ``cache_root`` (absolute), so the
        report finds the data from any working folder, and under another root when it moved."""
        out = self.as_dict()
        if self.cache_root and self.cache_path:
            try:
                out["cache_path"] = Path(self.cache_path).resolve().relative_to(self.cache_root).as_posix()
            except ValueError:  # not below the root (a link): the absolute path
                out["cache_path"] = str(Path(self.cache_path).resolve())
        return out


def unseen_splits(generate, sizes: tuple[int, int, int], seed: int, *, fails: str) -> dict[str, tuple]:
    """train/validation/test of a synthetic task from one seed: ``generate(n, rng)`` gives (inputs,
    targets) arrays of n sequences; a held-out sequence equal to a train one is redrawn (up to 100
    rounds, then RuntimeError(``fails``)), so no split leaks into another."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    out = {}
    for split, n in zip(("train", "validation", "test"), sizes):
        x, y = generate(n, rng)
        if split != "train":
            for _ in range(100):
                dup = np.array([row.tobytes() in seen for row in x])
                if not dup.any():
                    break
                x[dup], y[dup] = generate(int(dup.sum()), rng)
            else:
                raise RuntimeError(fails)
        seen.update(row.tobytes() for row in x)
        out[split] = (x, y)
    return out


class Task:
    """Base class of a task. Subclasses are registered with ``register_task`` and set:

    head            which model head: "classifier", "matcher" or "lm"
    vocab_size      number of token ids, padding (0) included
    num_classes     classes for classifier/matcher heads
    build()         the DatasetDict from ``self.cfg.source`` (uncached; the base caches it)
    source_files()  the files ``build()`` reads (default: none, e.g. a seeded generator);
                    their sizes and modification times are part of the cache key
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

    def source_files(self) -> list[Path]:
        """The files ``build()`` reads for the configured source (none by default). Listing
        them must be cheap and must not fail on a missing source (``build()`` says what is
        missing): return what exists."""
        return []

    # -- caching ------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return str(getattr(self.cfg, "source", "default"))

    def cache_params(self) -> dict[str, Any]:
        """Everything that determines the prepared data (default: the whole config)."""
        return {"task": self.name, "version": self.data_version, **dataclasses.asdict(self.cfg)}

    def cache_key(self) -> str:
        """Hash of ``cache_params()`` and of the size and mtime of every ``source_files()``."""
        params = self.cache_params()
        stats = stat_files(self.source_files())
        if stats:
            params = {**params, "source_files": hashlib.sha256(json.dumps(stats).encode()).hexdigest()}
        blob = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def cache_path(self, cache_dir: str | Path | None = None) -> Path:
        return cache_root(cache_dir) / self.name / f"{self.source}-{self.cache_key()}"

    def load(self, cache_dir: str | Path | None = None):
        """(DatasetDict, DataInfo): from the cache, building and saving it the first time.

        Reading a complete cache takes no lock. Building takes the cache's lock; a process
        that finds it taken waits, then loads what the other one saved."""
        from filelock import Timeout

        path = self.cache_path(cache_dir)
        loaded = self._read_cache(path, quiet=True) if (path / "meta.json").exists() else None
        if loaded is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = cache_lock(path)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("another process is preparing %s; waiting for it", path)
                lock.acquire()
            try:
                remove_orphans(path.parent)
                loaded = self._read_cache(path) if path.exists() else None
                if loaded is None:
                    self._build_cache(path)
                    loaded = self._read_cache(path, rebuilt=True)
            finally:
                lock.release()
        dsd, info = loaded
        info.cache_root = str(cache_root(cache_dir).resolve())
        for warning in info.warnings:
            log.warning("%s data (source=%s): %s", self.name, self.source, warning)
        return dsd, info

    def _read_cache(self, path: Path, *, quiet: bool = False, rebuilt: bool = False):
        """(DatasetDict, DataInfo) of a cache folder, or None when it cannot be read (then
        it is moved aside for a rebuild, unless ``quiet``: a lock-free look that may race a
        build). Freshly ``rebuilt`` and unreadable is an error naming the path."""
        import datasets

        try:
            info = DataInfo(**json.loads((path / "meta.json").read_text()))
            dsd = datasets.load_from_disk(str(path / "data"))
            sizes = {s: len(dsd[s]) for s in SPLITS}
            if sizes != info.sizes:
                raise DataSourceError(f"split sizes {sizes} differ from meta.json's {info.sizes}")
        except Exception as exc:  # noqa: BLE001 - any failure to read means the cache is broken
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if rebuilt:
                raise DataSourceError(
                    f"the data cache {path} was just built but cannot be read ({problem}); "
                    f"check the disk (space, permissions) and run again"
                ) from exc
            if not quiet:
                log.warning("data cache %s cannot be read (%s); rebuilding it", path, problem)
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
                os.replace(path, aside / "broken")
                shutil.rmtree(aside, ignore_errors=True)
            return None
        info.cache_path = str(path)
        return dsd, info

    def _build_cache(self, path: Path) -> None:
        """Build the data, check it, save it to ``path`` atomically (temp folder + rename)."""
        log.info("preparing %s data (source=%s) into %s", self.name, self.source, path)
        dsd = self.build()
        missing = [s for s in SPLITS if s not in dsd]
        if missing:
            raise DataSourceError(f"task '{self.name}' built no split(s) {missing}")
        empty = [s for s in SPLITS if len(dsd[s]) == 0]
        if empty:
            raise DataSourceError(
                f"task '{self.name}' (source={self.source}) built an empty {', '.join(empty)} split; nothing was "
                f"cached. Check the source files (every split needs examples) or the task's size settings"
            )
        info = self.describe(dsd)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            dsd.save_to_disk(str(tmp / "data"))
            (tmp / "meta.json").write_text(json.dumps(info.as_dict(), indent=1))
            if path.exists():  # a folder without meta.json, or moved aside above
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def describe(self, dsd) -> DataInfo:
        """Statistics of prepared data: sizes, lengths, majority baseline, fingerprint, warnings."""
        digest = hashlib.sha256()
        lengths: list[int] = []
        for split in SPLITS:
            ds = dsd[split]
            for column in sorted(ds.column_names):
                values = ds[column]
                if column.startswith("input_ids"):
                    if split == "test":
                        lengths.extend(len(x) for x in values)
                    flat = [np.asarray(x, dtype=np.int64) for x in values]
                    digest.update((np.concatenate(flat) if flat else np.zeros(0, np.int64)).tobytes())
                    digest.update(np.asarray([len(x) for x in values], dtype=np.int64).tobytes())
                else:
                    digest.update(json.dumps(values, default=str).encode())
        majority = None
        warnings: list[str] = []
        if "label" in dsd["test"].column_names and len(dsd["test"]):
            train_counts = Counter(dsd["train"]["label"])
            majority_label = train_counts.most_common(1)[0][0]
            test_labels = dsd["test"]["label"]
            majority = sum(1 for y in test_labels if y == majority_label) / len(test_labels)
            for split in ("validation", "test"):
                classes = Counter(dsd[split]["label"])
                if len(classes) == 1:
                    ((label, count),) = classes.items()
                    warnings.append(
                        f"the {split} split holds a single class (label {label}, all {count} examples): "
                        f"its accuracy only says how often the model predicts that class"
                    )
        return DataInfo(
            source=self.source,
            fingerprint=digest.hexdigest()[:16],
            majority_accuracy=majority,
            num_classes=self.num_classes,
            sizes={s: len(dsd[s]) for s in SPLITS},
            length_mean=float(np.mean(lengths)) if lengths else 0.0,
            length_max=int(max(lengths)) if lengths else 0,
            warnings=warnings,
            test_clusters=[int(c) for c in dsd["test"]["cluster"]] if "cluster" in dsd["test"].column_names else None,
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
        index: tuple[int | slice, ...] = (i, *[slice(0, n) for n in a.shape])
        out[index] = a
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
        elif (
            values
            and isinstance(values[0], str)
            or (isinstance(values[0], list) and values[0] and isinstance(values[0][0], str))
        ):
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
