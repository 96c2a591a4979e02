"""Byte-level document matching (LRA "Retrieval", Tay et al. 2021, arXiv:2011.04006).

Are two documents linked? Each document is read as bytes (token = byte + 1; 0 is
padding), truncated to ``max_len`` bytes, and encoded **separately** by one shared
encoder; the two-tower head (``harness.train.model.MatcherHead``) classifies
``[X1, X2, X1*X2, X1-X2]`` of the pooled states. Two classes, balanced. Sources:

* ``manpages`` (offline default): the Linux man-pages of Debian ``manpages`` and
  ``manpages-dev`` (``tasks/_manpages.py``: 1,100 documents, redirects folded in as
  aliases). Two pages are **linked** when either one's SEE ALSO names the other
  (``name(section)``, resolved through redirects; 3,584 links, 1,064 linked pages).
  So that the link can't simply be read off the text, a document is its page without
  the SEE ALSO section and without the ``.TH`` title line, its own ``name(section)``
  mentions reduced to ``name``. Mentions of other pages in the body stay: they are the
  text's citations, as in AAN's papers (~40% of linked pairs have one somewhere in the
  page, ~1% of unlinked pairs; few fall in the first bytes the small scale reads).

  Split by document: validation and test are grown as regions of the link graph
  (breadth-first from random seeds, ``region_size`` pages each, until
  ``val_fraction``/``test_fraction`` of the pages), the rest is train, so no document
  appears in two splits and most links stay inside one (a random 15% of the pages holds
  ~2% of the links, a region-grown 15% ~10%; 61% of all links stay inside a split, the
  rest cross splits and are dropped, counted). Positives: the links inside a split.
  Negatives: a degree-preserving shuffle of the positives' endpoints within the split
  (each document appears in as many negative as positive pairs, so no single document's
  text predicts the label), never a linked pair, a page with itself or a repeated pair.
  Pair order is random.
* ``aan``: LRA's released ACL Anthology Network pairs (Radev et al. 2013) in
  ``task.data_dir``: ``new_aan_pairs.{train,eval,test}.tsv``, tab-separated, no header,
  no quoting: ``label  id1  id2  text1  text2`` (label 0/1, read as a float as LRA
  does), LF or CRLF line ends, an optional UTF-8 BOM. Bytes are taken from the file as they
  are (LRA's byte encoder takes any bytes, so no text check beyond the fields).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.core import register_task
from harness.data.task import UTF8_BOM, DataSourceError, MalformedRecord, Task

log = logging.getLogger(__name__)

BYTE_VOCAB = 257  # 0 = padding, byte b -> b + 1
SPLITS = ("train", "validation", "test")
AAN_FILES = {
    "train": "new_aan_pairs.train.tsv",
    "validation": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}
AAN_COLUMNS = ("label", "id1", "id2", "text1", "text2")
AAN_HINT = (
    "Download LRA's release (lra_release.gz from github.com/google-research/long-range-arena), and set "
    "task.data_dir to its tsv_data folder holding new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv, "
    "new_aan_pairs.test.tsv"
)
CHUNK = 4096  # pairs per in-memory Arrow chunk (AAN's train split has ~147K pairs of up to 2 x 4K bytes)


@dataclass
class RetrievalConfig:
    source: str = "manpages"  # manpages | aan
    data_dir: str = ""  # aan: folder with new_aan_pairs.{train,eval,test}.tsv
    max_len: int = 4000  # bytes per document (LRA: 4000 each)
    val_fraction: float = 0.15  # manpages: of pages, grown as link-graph regions
    test_fraction: float = 0.15
    region_size: int = 8  # manpages: pages per breadth-first region of validation/test
    data_seed: int = 0  # manpages: split, negatives, pair order


def encode_bytes(data: bytes, max_len: int) -> list[int]:
    """Bytes + 1, truncated to ``max_len`` (0 stays free for padding)."""
    return (np.frombuffer(data[:max_len], dtype=np.uint8).astype(np.int64) + 1).tolist()


# ----------------------------------------------------------------------------- manpages


def link_graph(pages) -> dict[str, set[str]]:
    """{page key: linked page keys}: undirected links from every page's SEE ALSO."""
    from tasks._manpages import alias_index, see_also_refs

    index = alias_index(pages)
    neighbours: dict[str, set[str]] = {key: set() for key in pages}
    counts: Counter = Counter()
    for key, page in sorted(pages.items()):
        for title, section in see_also_refs(page.roff):
            target = index.get(f"{title}({section})")
            if target is None:
                counts["references to pages outside the packages"] += 1
            elif target == key:
                counts["references to the page itself"] += 1
            else:
                neighbours[key].add(target)
                neighbours[target].add(key)
                counts["resolved references"] += 1
    links = sum(len(n) for n in neighbours.values()) // 2
    isolated = sum(not n for n in neighbours.values())
    log.info(
        "man-page links: %d between %d pages (%d pages without links); SEE ALSO: %s",
        links,
        len(pages) - isolated,
        isolated,
        ", ".join(f"{n} {what}" for what, n in sorted(counts.items())),
    )
    return neighbours


def split_by_regions(
    neighbours: dict[str, set[str]], fractions: tuple[float, float], region_size: int, seed: int
) -> dict[str, set[str]]:
    """{split: page keys}: validation and test grown as breadth-first regions of at most
    ``region_size`` pages from random seeds, each up to its fraction of the pages; the rest
    is train. Every page lands in exactly one split."""
    keys = sorted(neighbours)
    rng = np.random.default_rng(seed)
    seeds = [keys[i] for i in rng.permutation(len(keys))]
    free = set(keys)
    parts: dict[str, set[str]] = {}
    for split, fraction in zip(("test", "validation"), fractions[::-1]):
        target, part = int(round(fraction * len(keys))), set()
        for start in seeds:
            if len(part) >= target:
                break
            if start not in free:
                continue
            free.discard(start)
            part.add(start)
            region, queue = 1, deque([start])
            while queue and region < region_size and len(part) < target:
                current = queue.popleft()
                candidates = sorted(neighbours[current] & free)
                for page in (candidates[i] for i in rng.permutation(len(candidates))):
                    if region >= region_size or len(part) >= target:
                        break
                    free.discard(page)
                    part.add(page)
                    queue.append(page)
                    region += 1
        parts[split] = part
    parts["train"] = free
    return {split: parts[split] for split in SPLITS}


def degree_preserving_negatives(
    positives: list[tuple[str, str]], linked: dict[str, set[str]], rng: np.random.Generator, *, max_rounds: int = 20
) -> list[tuple[str, str]]:
    """As many unlinked pairs as ``positives``, built by shuffling the positives' endpoints:
    each page appears in as many negatives as positives. A pair that is linked, a page with
    itself or a repeat is repaired by swapping partners with another pair (searched in random
    order); what is still invalid after ``max_rounds`` passes is dropped (logged)."""
    stubs = [page for pair in positives for page in pair]
    stubs = [stubs[i] for i in rng.permutation(len(stubs))]
    pairs = [[stubs[2 * i], stubs[2 * i + 1]] for i in range(len(stubs) // 2)]

    def key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a < b else (b, a)

    seen = Counter(key(a, b) for a, b in pairs)

    def bad(a: str, b: str) -> bool:
        return a == b or b in linked[a] or seen[key(a, b)] > 1

    def fits(a: str, b: str) -> bool:  # a new pair that may be created
        return a != b and b not in linked[a] and not seen[key(a, b)]

    for _ in range(max_rounds):
        broken = [i for i, (a, b) in enumerate(pairs) if bad(a, b)]
        if not broken:
            break
        for i in broken:
            a, b = pairs[i]
            if not bad(a, b):  # repaired by an earlier swap
                continue
            for j in rng.permutation(len(pairs)):
                c, d = pairs[j]
                if j == i or key(a, d) == key(c, b) or not (fits(a, d) and fits(c, b)):
                    continue
                seen[key(a, b)] -= 1
                seen[key(c, d)] -= 1
                pairs[i], pairs[j] = [a, d], [c, b]
                seen[key(a, d)] += 1
                seen[key(c, b)] += 1
                break
    negatives = [(a, b) for a, b in pairs if not (a == b or b in linked[a])]
    negatives = list({key(a, b): (a, b) for a, b in negatives}.values())
    if len(negatives) < len(positives):
        log.warning(
            "negatives: %d of %d could not be paired without a link or a repeat (dropped)",
            len(positives) - len(negatives),
            len(positives),
        )
    return negatives


def check_config(cfg: RetrievalConfig) -> None:
    if cfg.max_len < 1:
        raise ValueError(f"task.max_len={cfg.max_len} must be >= 1")
    if min(cfg.val_fraction, cfg.test_fraction) <= 0 or cfg.val_fraction + cfg.test_fraction >= 1:
        raise ValueError(
            f"task.val_fraction={cfg.val_fraction} and task.test_fraction={cfg.test_fraction} "
            f"must be > 0 and sum to less than 1"
        )
    if cfg.region_size < 1:
        raise ValueError(f"task.region_size={cfg.region_size} must be >= 1")


def manpage_pairs(pages, cfg: RetrievalConfig) -> dict[str, list[tuple[str, str, int]]]:
    """{split: [(page key 1, page key 2, label)]} over ``pages`` (see the module docstring)."""
    check_config(cfg)
    neighbours = link_graph(pages)
    parts = split_by_regions(neighbours, (cfg.val_fraction, cfg.test_fraction), cfg.region_size, cfg.data_seed)
    rng = np.random.default_rng(cfg.data_seed + 1)
    out: dict[str, list[tuple[str, str, int]]] = {}
    cut = 0
    for split in SPLITS:
        part = parts[split]
        positives = sorted((a, b) for a in part for b in neighbours[a] if b in part and a < b)
        cut += sum(1 for a in part for b in neighbours[a] if b not in part)
        negatives = degree_preserving_negatives(positives, neighbours, rng)
        if len(negatives) < len(positives):  # keep the classes balanced
            positives = [positives[i] for i in sorted(rng.choice(len(positives), len(negatives), replace=False))]
        rows = [(a, b, 1) for a, b in positives] + [(a, b, 0) for a, b in negatives]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        flips = rng.random(len(rows)) < 0.5
        out[split] = [(b, a, y) if flip else (a, b, y) for (a, b, y), flip in zip(rows, flips)]
        log.info(
            "retrieval/manpages %s: %d pages, %d linked pairs, %d unlinked pairs",
            split,
            len(part),
            len(positives),
            len(negatives),
        )
    log.info("retrieval/manpages: %d links cross splits (dropped)", cut // 2)
    return out


def build_manpages(cfg: RetrievalConfig, pages=None) -> dict[str, tuple[list[list[int]], list[list[int]], list[int]]]:
    """{split: (ids of document 1, ids of document 2, labels)}; ``pages`` defaults to the
    whole corpus of ``tasks._manpages.load_corpus``."""
    if pages is None:
        from tasks._manpages import load_corpus

        pages = load_corpus()
    pairs = manpage_pairs(pages, cfg)
    used = sorted({key for rows in pairs.values() for a, b, _ in rows for key in (a, b)})
    ids = {key: encode_bytes(pages[key].text(drop=("SEE ALSO",)).encode("utf-8"), cfg.max_len) for key in used}
    from harness.core.stats import shared_unit_clusters

    # a pair's cluster: the pairs linked to it through shared documents (not independent test units)
    return {
        split: (
            [ids[a] for a, _, _ in rows],
            [ids[b] for _, b, _ in rows],
            [y for _, _, y in rows],
            shared_unit_clusters([(a, b) for a, b, _ in rows]),
        )
        for split, rows in pairs.items()
    }


# ----------------------------------------------------------------------------- AAN


def read_aan_tsv(path: Path, max_len: int):
    """Chunks of (ids 1, ids 2, labels) from one of LRA's ``new_aan_pairs.*.tsv`` files;
    a malformed line raises ``MalformedRecord`` naming the file and the line."""
    if not path.exists():
        raise DataSourceError(f"{path} not found. {AAN_HINT}")
    ids1: list[list[int]] = []
    ids2: list[list[int]] = []
    labels: list[int] = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM) :]
            line = line[:-1] if line.endswith(b"\n") else line
            line = line[:-1] if line.endswith(b"\r") else line  # CRLF
            if not line.strip():
                continue
            fields = line.split(b"\t")
            if len(fields) != len(AAN_COLUMNS):
                raise MalformedRecord(
                    path,
                    line_no,
                    f"expected {len(AAN_COLUMNS)} tab-separated fields ({', '.join(AAN_COLUMNS)}), got {len(fields)}",
                )
            try:
                label = float(fields[0])
            except ValueError:
                label = None
            if label not in (0.0, 1.0):
                raise MalformedRecord(
                    path, line_no, f"label {fields[0][:20].decode('utf-8', 'replace')!r} is not 0 or 1"
                )
            for name, text in zip(("text1", "text2"), fields[3:]):
                if not text.strip():
                    raise MalformedRecord(path, line_no, f"{name} is empty")
            ids1.append(encode_bytes(fields[3], max_len))
            ids2.append(encode_bytes(fields[4], max_len))
            labels.append(int(label))
            if len(labels) == CHUNK:
                yield ids1, ids2, labels
                ids1, ids2, labels = [], [], []
    if labels:
        yield ids1, ids2, labels


def aan_split(path: Path, max_len: int):
    """One AAN file as a ``datasets.Dataset`` (built chunk by chunk, ids stored as int16)."""
    import datasets

    parts = [_pairs_dataset(*chunk) for chunk in read_aan_tsv(path, max_len)]
    if not parts:
        raise DataSourceError(f"{path} is empty (no pairs). {AAN_HINT}")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ----------------------------------------------------------------------------- the task


def _pairs_dataset(ids1: list[list[int]], ids2: list[list[int]], labels: list[int], clusters: list[int] | None = None):
    import datasets

    ids = datasets.List(datasets.Value("int16"))
    columns = {"input_ids_1": ids1, "input_ids_2": ids2, "label": labels}
    kinds = {"input_ids_1": ids, "input_ids_2": ids, "label": datasets.Value("int64")}
    if clusters is not None:
        columns["cluster"], kinds["cluster"] = clusters, datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(kinds))


@register_task(
    "retrieval",
    RetrievalConfig,
    sources=("manpages", "aan"),
    requires=("key_padding",),
    scales={
        # CI: the first 64 bytes of each page.
        "tiny": {"task": {"max_len": 64}},
        # 2 CPU cores: the first 64 bytes (the NAME line: names and a one-line summary, what
        # links pages most visibly; a byte-trigram cosine on them scores ~0.73). Longer
        # documents learn slower in this budget (128 bytes: ~0.60 after 600 steps). Softmax:
        # 0.63 test accuracy vs 0.50 majority, ~80 s of CPU for 1,000 steps.
        "small": {"task": {"max_len": 64}, "train": {"max_steps": 1000, "lr": 3.0e-3, "eval_every": 250}},
        # scale=lra: harness/conf/protocol/<protocol>/retrieval.yaml (protocol=lra, pytorch, nystromformer;
        # docs/protocols.md)
    },
)
class Retrieval(Task):
    """Byte-level document matching: man pages linked by SEE ALSO (offline) or AAN citations."""

    head = "matcher"
    debian_packages: ClassVar[tuple[str, ...]] = ("manpages", "manpages-dev")

    def __init__(self, cfg: RetrievalConfig, *, scale: str = "tiny"):
        super().__init__(cfg, scale=scale)
        check_config(cfg)  # a bad config fails here, not after the data is read

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    @property
    def num_classes(self) -> int:
        return 2

    def cache_params(self):
        params = super().cache_params()
        if self.cfg.source == "aan":
            for key in ("val_fraction", "test_fraction", "region_size", "data_seed"):
                params.pop(key)
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
        else:
            params.pop("data_dir")
        return params

    def source_files(self) -> list[Path]:
        if self.cfg.source == "aan":
            return [Path(self.cfg.data_dir) / name for name in AAN_FILES.values()] if self.cfg.data_dir else []
        from tasks._manpages import source_files

        return source_files()

    def build(self):
        import datasets

        if self.cfg.source == "aan":
            if not self.cfg.data_dir:
                raise DataSourceError(f"task.source=aan needs task.data_dir. {AAN_HINT}")
            folder = Path(self.cfg.data_dir)
            return datasets.DatasetDict(
                {split: aan_split(folder / name, self.max_len) for split, name in AAN_FILES.items()}
            )
        splits = build_manpages(self.cfg)
        return datasets.DatasetDict({split: _pairs_dataset(*rows) for split, rows in splits.items()})
