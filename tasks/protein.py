"""Protein family / function classification from the amino-acid sequence alone.

One residue per token (20 standard amino acids, then the rare letters X B Z U O; any
other letter is read as X and counted in the log; 0 is padding). The first
``max_len`` residues of a sequence are kept. Three sources:

* ``metastudent`` (offline default): the UniProt proteins with Gene Ontology (GO)
  annotations of Debian's ``metastudent-data`` (``dataset_201401/<ontology>/``: a BLAST
  v4 protein database ``goasp.fasta.{pin,psq,phr}`` read with NumPy, and
  ``goasp_annot.dat``, accession then GO terms). Labels: the ``num_classes`` terms most
  often annotated directly, skipping the ontology's root and any term that is an
  ancestor or descendant (``is_a``/``part_of`` in ``goGraph.txt``) of one already chosen,
  so no chosen term implies another. A protein's label is the one chosen term its
  annotations imply (a term implies itself and its ancestors); proteins implying none or
  several of them are left out (counts logged). For MFO and 10 classes: metal ion
  binding, nucleotide binding, transferase, hydrolase, RNA binding, structural
  constituent of ribosome, oxidoreductase, DNA binding, ligase, lyase.
  ``task.data_dir`` may point at another copy of ``dataset_201401``.
* ``fasta``: ``task.data_dir`` holds FASTA file(s) (``*.fasta|*.fa|*.faa``, optionally
  ``.gz``) and ``labels.tsv`` (``id<TAB>label``, optional header ``id<TAB>label``); a
  FASTA id ``db|ACCESSION|NAME`` also matches its accession (UniProt style).
* ``pfam``: ``task.data_dir`` holds Pfam-style family files: Stockholm alignments
  (``*.sto|*.stk|*.sth|*.seed``, gaps removed, labelled by ``#=GF ID`` or the file name;
  a file may hold many alignments, like ``Pfam-A.seed``) or FASTA files (one family per
  file, labelled by the file name).

Then, for every source: copies of the same (cropped) sequence are kept once (a sequence
carrying two different labels is dropped), the ``num_classes`` most frequent labels are
kept, each down to at most ``max_per_class`` sequences (seeded; classes with fewer than
``min_class_size`` are an error), near-identical sequences are grouped (MinHash over
5-mers, about >90% identity; ``group_near_duplicates``), and whole groups go to
train/validation/test, stratified by label, so no sequence has a near-copy in another
split.

``tasks.protein_lm`` reads the same sequences for causal language modelling.
"""

from __future__ import annotations

import gzip
import logging
import re
import struct
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.data import DataSourceError, MalformedRecord, Task
from harness.registry import register_task

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- vocabulary

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
RARE = "XBZUO"  # unknown, Asx (D/N), Glx (E/Q), selenocysteine, pyrrolysine
ALPHABET = STANDARD + RARE  # token id = 1 + index; 0 is padding
VOCAB_SIZE = 1 + len(ALPHABET)
X_ID = 1 + ALPHABET.index("X")
GAPS = "-."
_GAP, _INVALID = 254, 255

_LETTER_IDS = np.full(256, _INVALID, dtype=np.uint8)
for _code in range(ord("A"), ord("Z") + 1):  # letters outside the alphabet (J, ...) read as X
    _LETTER_IDS[_code] = _LETTER_IDS[_code + 32] = X_ID
for _i, _letter in enumerate(ALPHABET):
    _LETTER_IDS[ord(_letter)] = _LETTER_IDS[ord(_letter.lower())] = 1 + _i
for _gap in GAPS:
    _LETTER_IDS[ord(_gap)] = _GAP
_OUTSIDE = np.zeros(256, dtype=bool)
_OUTSIDE[[c for c in range(256) if chr(c).isascii() and chr(c).isalpha() and chr(c).upper() not in ALPHABET]] = True

# BLAST databases store residues as NCBIstdaa codes: an index into this string.
NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_STDAA_IDS = np.full(256, X_ID, dtype=np.uint8)
for _i, _letter in enumerate(NCBISTDAA):
    if _letter in ALPHABET:
        _STDAA_IDS[_i] = 1 + ALPHABET.index(_letter)


def decode(ids) -> str:
    """Token ids back to residue letters (padding dropped)."""
    return "".join(ALPHABET[i - 1] for i in np.asarray(ids, dtype=np.int64) if i > 0)


class ResidueReader:
    """Turns sequence text into token ids; counts letters read as X (logged once)."""

    def __init__(self) -> None:
        self.outside: Counter[str] = Counter()

    def encode(self, text: str, path: Path, where: str) -> np.ndarray:
        raw = np.frombuffer("".join(text.split()).encode("latin-1", "replace"), dtype=np.uint8)
        if raw.size and raw[-1] == ord("*"):  # a translation's stop codon
            raw = raw[:-1]
        ids = _LETTER_IDS[raw]
        bad = np.flatnonzero(ids == _INVALID)
        if bad.size:
            char = chr(raw[bad[0]])
            raise MalformedRecord(path, where, f"invalid character {char!r} at residue {bad[0] + 1} (residues are letters; gaps '-' '.' are removed)")
        outside = raw[_OUTSIDE[raw]]
        if outside.size:
            self.outside.update(chr(c).upper() for c in outside.tolist())
        return ids[ids != _GAP]

    def report(self, what: str) -> None:
        if self.outside:
            letters = ", ".join(f"{k}: {v}" for k, v in sorted(self.outside.items()))
            log.info("%s: %d residues outside %s read as X (%s)", what, sum(self.outside.values()), ALPHABET, letters)


# ----------------------------------------------------------------------------- sequences


@dataclass
class SequenceSet:
    """Sequences as one flat uint8 array of token ids: sequence i is
    ``residues[offsets[i]:offsets[i + 1]]``. ``labels`` are label names (or empty)."""

    residues: np.ndarray
    offsets: np.ndarray
    ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> np.ndarray:
        return self.residues[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], ids: list[str], labels: list[str] | None = None) -> SequenceSet:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        residues = np.concatenate(arrays).astype(np.uint8) if arrays else np.zeros(0, dtype=np.uint8)
        return cls(residues, offsets, ids, labels or [])


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="latin-1")
    return open(path, encoding="latin-1")


def read_fasta(path: Path, reader: ResidueReader) -> Iterator[tuple[str, np.ndarray]]:
    """(id, token ids) per FASTA record; a record with no sequence, a header with no id,
    a duplicate id or data before the first header is an error naming file and record."""
    seen: dict[str, int] = {}
    name, header_line, chunks = None, 0, []

    def finish():
        where = f"record '{name}' (line {header_line})"
        if not any(c.strip() for c in chunks):
            raise MalformedRecord(path, where, "has no sequence")
        ids = reader.encode("".join(chunks), path, where)
        if ids.size == 0:
            raise MalformedRecord(path, where, "has no residues (only gaps)")
        return name, ids

    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line.startswith(">"):
                if name is not None:
                    yield finish()
                fields = line[1:].split()
                if not fields:
                    raise MalformedRecord(path, line_no, "FASTA header '>' without an id")
                name, header_line, chunks = fields[0], line_no, []
                if name in seen:
                    raise MalformedRecord(path, f"record '{name}' (line {line_no})", f"duplicate id (first at line {seen[name]})")
                seen[name] = line_no
            elif name is None:
                if line.strip():
                    raise MalformedRecord(path, line_no, "sequence data before the first '>' header: not a FASTA file?")
            else:
                chunks.append(line)
    if name is not None:
        yield finish()


def read_stockholm(path: Path, reader: ResidueReader) -> Iterator[tuple[str, str, np.ndarray]]:
    """(family, sequence name, token ids) per sequence of every alignment in a Stockholm
    file; gaps removed, insert (lower-case) residues kept. The family is the alignment's
    ``#=GF ID``, else the file name."""
    stem = _stem(path)
    with _open_text(path) as f:
        family, order, parts, start, header_seen = None, [], {}, 0, False
        line_no = 0
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not header_seen:
                if not text:
                    continue
                if not text.startswith("# STOCKHOLM"):
                    raise MalformedRecord(path, line_no, f"expected '# STOCKHOLM 1.0', got {text[:40]!r}: not a Stockholm file?")
                header_seen, family, order, parts, start = True, None, [], {}, line_no
                continue
            if not text:
                continue
            if text == "//":
                label = family or stem
                for name in order:
                    where = f"sequence '{name}' of alignment '{label}'"
                    ids = reader.encode("".join(parts[name]), path, where)
                    if ids.size == 0:
                        raise MalformedRecord(path, where, "has no residues (only gaps)")
                    yield label, name, ids
                header_seen = False
                continue
            if text.startswith("#=GF"):
                fields = text.split(None, 2)
                if len(fields) == 3 and fields[1] == "ID":
                    family = fields[2].strip()
                continue
            if text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) != 2:
                problem = "has no sequence" if len(fields) == 1 else f"expected '<name> <aligned sequence>', got {len(fields)} fields"
                raise MalformedRecord(path, line_no, f"sequence line '{fields[0]}' {problem}")
            name, aligned = fields
            if name not in parts:
                order.append(name)
                parts[name] = []
            parts[name].append(aligned)
        if header_seen:
            raise MalformedRecord(path, f"alignment '{family or stem}' (line {start})", f"not terminated by '//' (file ends at line {line_no})")


def read_labels(path: Path) -> dict[str, str]:
    """``id<TAB>label`` rows (an optional header ``id<TAB>label``); bad rows name file and line."""
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = [x.strip() for x in line.rstrip("\r\n").split("\t")]
            if line_no == 1 and [x.lower() for x in fields] == ["id", "label"]:
                continue
            if len(fields) != 2:
                raise MalformedRecord(path, line_no, f"expected 2 tab-separated fields 'id<TAB>label', got {len(fields)}")
            seq_id, label = fields
            if not seq_id or not label:
                raise MalformedRecord(path, line_no, "empty id or label")
            if seq_id in labels and labels[seq_id] != label:
                raise MalformedRecord(path, line_no, f"id '{seq_id}' labelled '{label}', but '{labels[seq_id]}' at line {first_line[seq_id]}")
            labels[seq_id] = label
            first_line.setdefault(seq_id, line_no)
    return labels


FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")
STOCKHOLM_SUFFIXES = (".sto", ".stk", ".sth", ".stockholm", ".seed")


def _stem(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.rsplit(".", 1)[0] if "." in name else name


def _kind(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return "fasta" if suffix in FASTA_SUFFIXES else "stockholm" if suffix in STOCKHOLM_SUFFIXES else None


def _require_dir(cfg: Any, what: str) -> Path:
    if not cfg.data_dir:
        raise DataSourceError(f"task.source={cfg.source} needs task.data_dir=<folder with {what}>")
    folder = Path(cfg.data_dir)
    if not folder.is_dir():
        raise DataSourceError(f"task.data_dir={folder} does not exist; it should hold {what}")
    return folder


FASTA_WHAT = "labels.tsv (id<TAB>label) and FASTA file(s) *.fasta|*.fa|*.faa, e.g. sequences exported from UniProt with their Pfam family or GO term as label"
PFAM_WHAT = (
    "Pfam-style family files: Stockholm alignments (*.sto, or Pfam-A.seed.gz from "
    "https://ftp.ebi.ac.uk/pub/databases/Pfam/current_release/) or one FASTA file per family"
)


def read_fasta_folder(cfg: Any, reader: ResidueReader, *, with_labels: bool) -> SequenceSet:
    """Every FASTA file in ``data_dir`` (and its labels from ``labels.tsv``)."""
    folder = _require_dir(cfg, FASTA_WHAT if with_labels else "FASTA file(s) *.fasta|*.fa|*.faa")
    files = sorted(p for p in folder.iterdir() if p.is_file() and _kind(p) == "fasta")
    if not files:
        raise DataSourceError(f"no FASTA files (*.fasta, *.fa, *.faa, optionally .gz) in {folder}; it should hold {FASTA_WHAT}")
    labels: dict[str, str] = {}
    if with_labels:
        tsv = folder / "labels.tsv"
        if not tsv.exists():
            raise DataSourceError(f"{tsv} not found; task.source=fasta needs {FASTA_WHAT}")
        labels = read_labels(tsv)
    arrays, ids, names, unlabelled, used = [], [], [], 0, set()
    for path in files:
        for seq_id, seq in read_fasta(path, reader):
            if with_labels:
                key = next((k for k in _id_keys(seq_id) if k in labels), None)
                if key is None:
                    unlabelled += 1
                    continue
                used.add(key)
                names.append(labels[key])
            arrays.append(seq)
            ids.append(seq_id)
    if with_labels:
        if not arrays:
            example = next(iter(labels), "?")
            raise DataSourceError(f"none of the FASTA ids in {folder} appear in labels.tsv (e.g. labels.tsv has '{example}')")
        if unlabelled:
            log.warning("protein: %d FASTA records have no row in labels.tsv and are left out", unlabelled)
        if len(labels) > len(used):
            log.warning("protein: %d ids of labels.tsv have no FASTA record", len(labels) - len(used))
    return SequenceSet.from_arrays(arrays, ids, names)


def _id_keys(seq_id: str) -> list[str]:
    parts = seq_id.split("|")
    return [seq_id, parts[1]] if len(parts) >= 3 and parts[1] else [seq_id]


def read_family_folder(cfg: Any, reader: ResidueReader) -> SequenceSet:
    """Every family file (Stockholm or FASTA) in ``data_dir``; label = family."""
    folder = _require_dir(cfg, PFAM_WHAT)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _kind(p))
    if not files:
        raise DataSourceError(f"no family files in {folder}; task.source=pfam needs {PFAM_WHAT}")
    arrays, ids, names = [], [], []
    for path in files:
        if _kind(path) == "stockholm":
            for family, name, seq in read_stockholm(path, reader):
                arrays.append(seq)
                ids.append(name)
                names.append(family)
        else:
            for name, seq in read_fasta(path, reader):
                arrays.append(seq)
                ids.append(name)
                names.append(_stem(path))
    return SequenceSet.from_arrays(arrays, ids, names)


# ----------------------------------------------------------------------------- metastudent

METASTUDENT_PACKAGE = "metastudent-data"
METASTUDENT_DIR = "usr/share/metastudent-data/dataset_201401"
ONTOLOGIES = {"MFO": "GO:0003674", "BPO": "GO:0008150", "CCO": "GO:0005575"}  # and their roots
HIERARCHY = ("is_a", "part_of")


def metastudent_folder(cfg: Any) -> Path:
    if cfg.data_dir:
        folder = Path(cfg.data_dir)
    else:
        from harness.debian import debian_path

        folder = debian_path(METASTUDENT_PACKAGE, METASTUDENT_DIR)
    if cfg.ontology not in ONTOLOGIES:
        raise ValueError(f"task.ontology='{cfg.ontology}'; valid: {', '.join(ONTOLOGIES)}")
    needed = [folder / cfg.ontology / "goasp.fasta.pin", folder / cfg.ontology / "goasp.fasta.psq"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise DataSourceError(
            f"{', '.join(missing)} not found: task.source=metastudent reads Debian's {METASTUDENT_PACKAGE} "
            f"(/{METASTUDENT_DIR}); install it (apt-get install {METASTUDENT_PACKAGE}) or set task.data_dir to a copy of dataset_201401"
        )
    return folder


def read_blast_db(prefix: Path, *, accessions: bool = True) -> SequenceSet:
    """A BLAST v4 protein database (``prefix.pin``, ``.psq``, ``.phr``), vectorised.

    ``.pin`` (big-endian): version 4, type 1 (protein), title and date (length-prefixed),
    N, total residues (8 bytes, little-endian), max length, N+1 header offsets, N+1
    sequence offsets. Sequence i is ``psq[off[i] : off[i+1] - 1]`` in NCBIstdaa codes. The
    accession is the header's title (an ASN.1 VisibleString) up to its first ``|``."""
    pin_path, psq_path, phr_path = (prefix.with_name(prefix.name + s) for s in (".pin", ".psq", ".phr"))
    pin = pin_path.read_bytes()
    try:
        version, kind = struct.unpack_from(">II", pin, 0)
        pos = 8
        for _ in ("title", "date"):
            (size,) = struct.unpack_from(">I", pin, pos)
            pos += 4 + size
        (count,) = struct.unpack_from(">I", pin, pos)
        (total,) = struct.unpack_from("<Q", pin, pos + 4)
        pos += 16  # count, total residues, max length
        header_offsets = np.frombuffer(pin, dtype=">u4", count=count + 1, offset=pos).astype(np.int64)
        offsets = np.frombuffer(pin, dtype=">u4", count=count + 1, offset=pos + 4 * (count + 1)).astype(np.int64)
    except (struct.error, ValueError) as exc:
        raise MalformedRecord(pin_path, "index", f"truncated BLAST index ({exc})") from exc
    if (version, kind) != (4, 1):
        raise MalformedRecord(pin_path, "header", f"expected a BLAST v4 protein database (version 4, type 1), got version {version}, type {kind}")
    psq = np.fromfile(psq_path, dtype=np.uint8)
    if offsets[-1] != psq.size or np.any(np.diff(offsets) < 1):
        raise MalformedRecord(psq_path, "offsets", f"sequence offsets of {pin_path.name} do not fit the {psq.size}-byte file")
    lengths = np.diff(offsets) - 1
    if int(lengths.sum()) != total:
        log.warning("%s: index says %d residues, offsets give %d", pin_path, total, int(lengths.sum()))
    # Drop the separator byte after every sequence while mapping codes to token ids.
    keep = np.ones(psq.size, dtype=bool)
    keep[: offsets[0]] = False
    keep[offsets[1:] - 1] = False
    codes = psq[keep]
    odd = np.isin(codes, [NCBISTDAA.index(c) for c in "-*J"])
    if odd.any():
        log.info("%s: %d residues coded gap/stop/J read as X", psq_path.name, int(odd.sum()))
    new_offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    ids = _blast_accessions(phr_path, header_offsets) if accessions else []
    return SequenceSet(_STDAA_IDS[codes], new_offsets, ids)


def _blast_accessions(phr_path: Path, offsets: np.ndarray) -> list[str]:
    phr = phr_path.read_bytes()
    accessions = []
    for i in range(len(offsets) - 1):
        start, end = int(offsets[i]), int(offsets[i + 1])
        tag = phr.find(b"\x1a", start, end)  # VisibleString: the defline title
        if tag < 0 or tag + 1 >= end:
            raise MalformedRecord(phr_path, f"record {i}", "header has no title string")
        size = phr[tag + 1]
        text = tag + 2 + (size & 0x7F if size & 0x80 else 0)
        bar = phr.find(b"|", text, end)
        if bar < 0:
            raise MalformedRecord(phr_path, f"record {i}", f"title {phr[text:text + 30]!r} has no 'ACCESSION|' prefix")
        accessions.append(phr[text:bar].decode("ascii", "replace"))
    return accessions


def read_annotations(path: Path) -> list[tuple[str, frozenset[str]]]:
    """(accession, GO terms) per line of ``goasp_annot.dat``."""
    rows = []
    with open(path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                raise MalformedRecord(path, line_no, "empty line (expected 'ACCESSION<TAB>GO:...')")
            bad = [t for t in fields[1:] if not t.startswith("GO:")]
            if bad or len(fields) < 2:
                raise MalformedRecord(path, line_no, f"expected 'ACCESSION<TAB>GO:nnnnnnn ...', got {line.strip()[:60]!r}")
            rows.append((fields[0], frozenset(fields[1:])))
    return rows


def read_go_parents(path: Path) -> dict[str, set[str]]:
    """child -> parents over is_a/part_of edges of ``goGraph.txt`` (parent, child, 1, relation)."""
    parents: dict[str, set[str]] = defaultdict(set)
    with open(path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) != 4:
                raise MalformedRecord(path, line_no, f"expected 'PARENT CHILD DISTANCE RELATION', got {len(fields)} fields")
            if fields[3] in HIERARCHY:
                parents[fields[1]].add(fields[0])
    return parents


class Ancestors:
    """Memoised ancestor sets (the term itself included)."""

    def __init__(self, parents: dict[str, set[str]]):
        self.parents, self.memo = parents, {}

    def __call__(self, term: str) -> frozenset[str]:
        if term not in self.memo:
            stack, seen = [term], {term}
            while stack:
                for parent in self.parents.get(stack.pop(), ()):
                    if parent not in seen:
                        seen.add(parent)
                        stack.append(parent)
            self.memo[term] = frozenset(seen)
        return self.memo[term]


def choose_terms(annotations: list[frozenset[str]], ancestors: Ancestors, count: int, root: str) -> list[str]:
    """The ``count`` most often directly annotated terms, none implying another."""
    direct = Counter(t for terms in annotations for t in terms)
    chosen: list[str] = []
    for term, _ in sorted(direct.items(), key=lambda kv: (-kv[1], kv[0])):
        if term == root or any(term in ancestors(c) or c in ancestors(term) for c in chosen):
            continue
        chosen.append(term)
        if len(chosen) == count:
            break
    return chosen


def read_metastudent(cfg: Any, *, with_labels: bool) -> SequenceSet:
    folder = metastudent_folder(cfg)
    db = read_blast_db(folder / cfg.ontology / "goasp.fasta", accessions=with_labels)
    log.info("metastudent %s: %d sequences, %d residues", cfg.ontology, len(db), db.residues.size)
    if not with_labels:
        return db
    annot_path = folder / cfg.ontology / "goasp_annot.dat"
    rows = read_annotations(annot_path)
    if len(rows) != len(db):
        raise MalformedRecord(annot_path, "end of file", f"{len(rows)} annotation lines for {len(db)} database sequences")
    for i, ((accession, _), db_accession) in enumerate(zip(rows, db.ids)):
        if accession != db_accession:
            raise MalformedRecord(annot_path, i + 1, f"accession {accession} where the database's record {i} is {db_accession}")
    terms = [t for _, t in rows]
    ancestors = Ancestors(read_go_parents(folder / "goGraph.txt"))
    chosen = choose_terms(terms, ancestors, cfg.num_classes, ONTOLOGIES[cfg.ontology])
    chosen_set = set(chosen)
    names = _go_names(folder / "nameMapping.txt", chosen_set)
    labels, none, several = [], 0, 0
    for annotated in terms:
        implied = chosen_set.intersection(*()) if False else set()
        for t in annotated:
            implied |= ancestors(t) & chosen_set
        if len(implied) == 1:
            labels.append(implied.pop())
        else:
            labels.append("")
            none += not implied
            several += len(implied) > 1
    log.info("metastudent %s classes: %s", cfg.ontology, "; ".join(f"{t} {names.get(t, '?')}" for t in chosen))
    log.info("metastudent: %d proteins imply none of the chosen terms, %d imply several: left out", none, several)
    db.labels = labels
    return db


def _go_names(path: Path, terms: set[str]) -> dict[str, str]:
    if not path.exists():
        return {}
    names = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            term, _, name = line.rstrip("\n").partition("\t")
            if term in terms:
                names[term] = name
    return names


# ----------------------------------------------------------------------------- splitting


def crop_and_dedupe(seqs: SequenceSet, order: np.ndarray, max_len: int, *, labelled: bool, limit: int = 0) -> list[int]:
    """Indices (in ``order``) of distinct cropped sequences, the first copy of each kept;
    with labels, a sequence seen with two different labels is dropped altogether.
    Stops after ``limit`` distinct ones (0: no limit)."""
    first: dict[bytes, int] = {}
    conflicting: set[bytes] = set()
    copies = 0
    for i in order.tolist():
        start = seqs.offsets[i]
        key = seqs.residues[start : min(seqs.offsets[i + 1], start + max_len)].tobytes()
        j = first.get(key)
        if j is None:
            first[key] = i
            if limit and not labelled and len(first) >= limit:
                break
        else:
            copies += 1
            if labelled and seqs.labels[j] != seqs.labels[i]:
                conflicting.add(key)
    kept = [i for key, i in first.items() if key not in conflicting]
    if copies or conflicting:
        log.info("protein: %d copies of an identical (cropped) sequence dropped; %d sequences with conflicting labels dropped",
                 copies, len(conflicting))
    return kept


def _kmer_codes(residues: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k-mer codes, owning sequence) of every window inside a sequence."""
    n = residues.size
    if n < k:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    codes = np.zeros(n - k + 1, dtype=np.uint64)
    for j in range(k):
        codes = codes * np.uint64(32) + residues[j : n - k + 1 + j].astype(np.uint64)
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[: n - k + 1]
    inside = np.arange(n - k + 1) + k <= offsets[1:][owner]
    return codes[inside], owner[inside]


def near_duplicate_groups(seqs: SequenceSet, *, k: int = 5, bands: int = 16, rows: int = 4, seed: int = 0) -> np.ndarray:
    """A group id per sequence: sequences whose k-mer sets are alike (MinHash LSH, ``bands``
    of ``rows`` hashes: pairs with Jaccard >= 0.5 are grouped with probability > 0.6, >= 0.7
    with > 0.99; for 5-mers that is roughly > 90% identity) share a group, transitively."""
    n = len(seqs)
    codes, owner = _kmer_codes(seqs.residues, seqs.offsets, k)
    rng = np.random.default_rng(seed)
    mult = rng.integers(1, 2**63, size=bands * rows, dtype=np.uint64) | np.uint64(1)
    add = rng.integers(0, 2**63, size=bands * rows, dtype=np.uint64)
    has = np.bincount(owner, minlength=n) > 0
    starts = np.searchsorted(owner, np.flatnonzero(has))
    signature = np.zeros((n, bands * rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for h in range(bands * rows):
            hashed = (codes * mult[h] + add[h]) >> np.uint64(32)
            if starts.size:
                signature[has, h] = np.minimum.reduceat(hashed, starts)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    members = np.flatnonzero(has)
    for b in range(bands):
        band = signature[members, b * rows : (b + 1) * rows]
        _, bucket = np.unique(band, axis=0, return_inverse=True)
        order = np.argsort(bucket.ravel(), kind="stable")
        sorted_bucket = bucket.ravel()[order]
        for a, c in zip(order[:-1][sorted_bucket[1:] == sorted_bucket[:-1]], order[1:][sorted_bucket[1:] == sorted_bucket[:-1]]):
            ra, rc = find(int(members[a])), find(int(members[c]))
            if ra != rc:
                parent[max(ra, rc)] = min(ra, rc)
    return np.array([find(i) for i in range(n)])


def group_split(groups: np.ndarray, labels: np.ndarray | None, fractions: tuple[float, float], seed: int) -> list[list[int]]:
    """Indices for (train, validation, test): whole groups go to one split; with labels,
    each class's groups (a group counts for its most common label) fill the validation and
    test quotas (``fractions``, at least one sequence each) in a seeded random order."""
    rng = np.random.default_rng(seed)
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups.tolist()):
        by_group[g].append(i)
    strata: dict[int, list[int]] = defaultdict(list)
    for g, idx in by_group.items():
        key = Counter(labels[idx].tolist()).most_common(1)[0][0] if labels is not None else 0
        strata[key].append(g)
    parts: list[list[int]] = [[], [], []]
    for _, members in sorted(strata.items()):
        members = [members[j] for j in rng.permutation(len(members))]
        total = sum(len(by_group[g]) for g in members)
        quota = {2: max(1, round(fractions[1] * total)), 1: max(1, round(fractions[0] * total))}
        filled = {1: 0, 2: 0}
        for g in members:
            split = 2 if filled[2] < quota[2] else 1 if filled[1] < quota[1] else 0
            if split:
                filled[split] += len(by_group[g])
            parts[split].extend(by_group[g])
    return [sorted(p) for p in parts]


def split_sizes_note(parts: list[list[int]], groups: np.ndarray) -> str:
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    return (f"train/validation/test {len(parts[0])}/{len(parts[1])}/{len(parts[2])}; "
            f"{sizes.size} groups of near-identical sequences, largest {sizes.max() if sizes.size else 0}")


def to_rows(seqs: SequenceSet, indices: list[int], max_len: int) -> list[list[int]]:
    return [seqs.residues[seqs.offsets[i] : min(seqs.offsets[i + 1], seqs.offsets[i] + max_len)].tolist() for i in indices]


def log_truncation(seqs: SequenceSet, indices: list[int], max_len: int, what: str) -> None:
    longer = int((seqs.lengths[indices] > max_len).sum()) if indices else 0
    if longer:
        log.info("%s: %d of %d sequences longer than max_len=%d are cut to their first %d residues", what, longer, len(indices), max_len, max_len)


def source_signature(folder: Path) -> list[tuple[str, int]]:
    """Names and sizes of a real source's files, so a changed source gets a new cache key."""
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def read_sequences(cfg: Any, *, with_labels: bool) -> SequenceSet:
    """The sequences of ``cfg.source`` (with label names when ``with_labels``)."""
    reader = ResidueReader()
    if cfg.source == "metastudent":
        seqs = read_metastudent(cfg, with_labels=with_labels)
    elif cfg.source == "fasta":
        seqs = read_fasta_folder(cfg, reader, with_labels=with_labels)
    elif cfg.source == "pfam":
        seqs = read_family_folder(cfg, reader)
    else:
        raise ValueError(f"unknown protein source '{cfg.source}'")
    reader.report(f"protein ({cfg.source})")
    return seqs


# ----------------------------------------------------------------------------- the task


@dataclass
class ProteinConfig:
    source: str = "metastudent"  # metastudent | fasta | pfam
    data_dir: str = ""  # fasta/pfam: the source folder; metastudent: optional copy of dataset_201401
    max_len: int = 1024  # residues kept from the start of each sequence
    num_classes: int = 10  # the most frequent labels (metastudent: GO terms, see the module docstring)
    ontology: str = "MFO"  # metastudent: MFO | BPO | CCO
    max_per_class: int = 2000  # sequences sampled per class (0: all)
    min_class_size: int = 20  # fewer distinct sequences in a kept class is an error
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    group_near_duplicates: bool = True  # keep near-identical sequences in one split (else exact copies only)
    data_seed: int = 0


# LRA has no protein task. Its closest one is byte-level text classification
# (google-research/long-range-arena, lra_benchmarks/text_classification/configs/
# base_tc_config.py): batch_size 32, learning_rate 0.05 with "constant * linear_warmup *
# rsqrt_decay", warmup 8000, num_train_steps 20000, weight_decay 0.1, emb_dim 256,
# num_heads 4, num_layers 4, qkv_dim 256, mlp_dim 1024, classifier_pool "CLS",
# max_length 1000; eval_frequency 100 there, 500 here (as the listops preset does).
# Sequences: 1024 residues (the config's 1000 rounded up; keeps 97% of MFO proteins whole).
LRA_MODEL = {"dim": 256, "depth": 4, "heads": 4, "mlp_dim": 1024, "dropout": 0.1, "positions": "learned"}
LRA_TRAIN = {"max_steps": 20000, "batch_size": 32, "lr": 0.05, "schedule": "rsqrt", "warmup_steps": 8000, "weight_decay": 0.1, "eval_every": 500}


@register_task(
    "protein",
    ProteinConfig,
    sources=("metastudent", "fasta", "pfam"),
    requires=("key_padding",),
    scales={
        # CI: 4 GO classes, 120 sequences each, first 128 residues.
        "tiny": {"task": {"max_len": 128, "num_classes": 4, "max_per_class": 120}},
        # 2 CPU cores: 10 balanced GO classes, first 512 residues.
        "small": {
            "task": {"max_len": 512, "num_classes": 10, "max_per_class": 800},
            "train": {"max_steps": 600, "batch_size": 32, "lr": 2.0e-3, "warmup_steps": 50, "schedule": "cosine", "eval_every": 150},
        },
        "lra": {
            "task": {"max_len": 1024, "num_classes": 10, "max_per_class": 5000},
            "model": {**LRA_MODEL, "pooling": "cls"},
            "train": LRA_TRAIN,
        },
    },
)
class Protein(Task):
    """Protein function / family classification from the residue sequence."""

    head = "classifier"
    debian_packages: ClassVar[tuple[str, ...]] = (METASTUDENT_PACKAGE,)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_classes(self) -> int:
        return int(self.cfg.num_classes)

    def cache_params(self) -> dict[str, Any]:
        params = super().cache_params()
        if self.cfg.source != "metastudent":
            params.pop("ontology")
        if self.cfg.data_dir:
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
            params["files"] = source_signature(Path(self.cfg.data_dir))
        return params

    def build(self):
        import datasets

        cfg = self.cfg
        seqs = read_sequences(cfg, with_labels=True)
        labelled = np.array([i for i, name in enumerate(seqs.labels) if name], dtype=np.int64)
        kept = crop_and_dedupe(seqs, labelled, cfg.max_len, labelled=True)
        counts = Counter(seqs.labels[i] for i in kept)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(ranked) < cfg.num_classes:
            raise DataSourceError(f"protein ({cfg.source}) has {len(ranked)} labels, fewer than task.num_classes={cfg.num_classes}; lower it")
        classes = [name for name, _ in ranked[: cfg.num_classes]]
        small = [f"{name} ({n})" for name, n in ranked[: cfg.num_classes] if n < cfg.min_class_size]
        if small:
            raise DataSourceError(
                f"protein ({cfg.source}): classes with fewer than task.min_class_size={cfg.min_class_size} distinct sequences: "
                f"{', '.join(small)}; lower task.num_classes or task.min_class_size"
            )
        dropped = sum(n for _, n in ranked[cfg.num_classes :])
        if dropped:
            log.info("protein: %d sequences of %d less frequent labels left out (num_classes=%d)", dropped, len(ranked) - cfg.num_classes, cfg.num_classes)
        classes.sort()
        class_id = {name: c for c, name in enumerate(classes)}
        rng = np.random.default_rng(cfg.data_seed)
        chosen: list[int] = []
        for name in classes:
            members = np.array([i for i in kept if seqs.labels[i] == name])
            members = members[rng.permutation(members.size)]
            chosen.extend(sorted(members[: cfg.max_per_class or None].tolist()))
        if cfg.max_per_class:
            capped = sum(max(0, counts[c] - cfg.max_per_class) for c in classes)
            log.info("protein: %d sequences beyond max_per_class=%d not sampled", capped, cfg.max_per_class)
        subset = _subset(seqs, chosen, cfg.max_len)
        labels = np.array([class_id[seqs.labels[i]] for i in chosen])
        groups = near_duplicate_groups(subset, seed=cfg.data_seed) if cfg.group_near_duplicates else np.arange(len(chosen))
        parts = group_split(groups, labels, (cfg.val_fraction, cfg.test_fraction), cfg.data_seed)
        log.info("protein: %d classes; %s", len(classes), split_sizes_note(parts, groups))
        log_truncation(seqs, chosen, cfg.max_len, "protein")
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint8")), "label": datasets.ClassLabel(names=classes)})
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"input_ids": to_rows(subset, idx, cfg.max_len), "label": labels[idx].tolist()}, features=features
                )
                for split, idx in zip(("train", "validation", "test"), parts)
            }
        )


def _subset(seqs: SequenceSet, indices: list[int], max_len: int) -> SequenceSet:
    """The chosen sequences, cropped to ``max_len``, as their own SequenceSet."""
    arrays = [seqs.residues[seqs.offsets[i] : min(seqs.offsets[i + 1], seqs.offsets[i] + max_len)] for i in indices]
    return SequenceSet.from_arrays(arrays, [seqs.ids[i] for i in indices] if seqs.ids else [])


__all__ = [
    "ALPHABET", "VOCAB_SIZE", "Protein", "ProteinConfig", "ResidueReader", "SequenceSet", "decode", "group_split",
    "near_duplicate_groups", "read_blast_db", "read_fasta", "read_labels", "read_sequences", "read_stockholm",
]
_ = re  # (kept for readers that extend the FASTA id rules)
