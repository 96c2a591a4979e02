"""Reading protein sequences for ``tasks.protein`` and ``tasks.protein_lm``.

* the residue vocabulary (20 amino acids, then the rare letters X B Z U O; 0 is padding),
* readers for FASTA (+ a ``labels.tsv``), Stockholm alignments (Pfam family files), and
  BLAST v4 protein databases (Debian ``metastudent-data``, with its GO annotations),
* de-duplication and a split that keeps near-identical sequences in one split.

Every reader raises ``harness.data.task.MalformedRecord`` naming the file and the record.
Sequences are held as one flat uint8 array of token ids (``SequenceSet``), so the 170
million residues of metastudent's MFO database read in seconds.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.data import DataSourceError, MalformedRecord, text_lines

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- vocabulary

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
RARE = "XBZUO"  # unknown, Asx (D/N), Glx (E/Q), selenocysteine, pyrrolysine
ALPHABET = STANDARD + RARE  # token id = 1 + index; 0 is padding
VOCAB_SIZE = 1 + len(ALPHABET)
X_ID = 1 + ALPHABET.index("X")
GAPS = "-."
_GAP, _INVALID = 254, 255

# Letter byte -> token id: the alphabet in either case, other letters (J) as X, gaps marked.
_LETTER_IDS = np.full(256, _INVALID, dtype=np.uint8)
for _code in range(ord("A"), ord("Z") + 1):
    _LETTER_IDS[_code] = _LETTER_IDS[_code + 32] = X_ID
for _i, _letter in enumerate(ALPHABET):
    _LETTER_IDS[ord(_letter)] = _LETTER_IDS[ord(_letter.lower())] = 1 + _i
for _gap in GAPS:
    _LETTER_IDS[ord(_gap)] = _GAP
_OUTSIDE = np.zeros(256, dtype=bool)  # letters read as X although they are not X
_OUTSIDE[[c for c in range(256) if chr(c).isascii() and chr(c).isalpha() and chr(c).upper() not in ALPHABET]] = True

# BLAST databases store residues as NCBIstdaa codes: an index into this string.
NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_STDAA_IDS = np.full(256, X_ID, dtype=np.uint8)  # gap, stop, J and unknown codes read as X
for _i, _letter in enumerate(NCBISTDAA):
    if _letter in ALPHABET:
        _STDAA_IDS[_i] = 1 + ALPHABET.index(_letter)


def encode(text: str) -> list[int]:
    """Residue letters to token ids (no checks; for tests and tools)."""
    return _LETTER_IDS[np.frombuffer(text.encode("ascii"), dtype=np.uint8)].tolist()


def decode(ids) -> str:
    """Token ids back to residue letters (padding and ids outside the alphabet dropped)."""
    return "".join(ALPHABET[i - 1] for i in np.asarray(ids, dtype=np.int64) if 0 < i <= len(ALPHABET))


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
            raise MalformedRecord(
                path,
                where,
                f"invalid character {chr(raw[bad[0]])!r} at residue {bad[0] + 1} "
                "(residues are letters; gaps '-' '.' are removed)",
            )
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
    ``residues[offsets[i]:offsets[i + 1]]``. ``labels`` are label names ("" = none)."""

    residues: np.ndarray
    offsets: np.ndarray
    ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int, max_len: int = 0) -> np.ndarray:
        """Sequence i, cut to its first ``max_len`` residues (0: whole)."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.residues[start : min(end, start + max_len) if max_len else end]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], ids: list[str], labels: list[str] | None = None) -> SequenceSet:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        residues = np.concatenate(arrays).astype(np.uint8) if arrays else np.zeros(0, dtype=np.uint8)
        return cls(residues, offsets, ids, labels or [])

    def subset(self, indices: list[int], max_len: int = 0) -> SequenceSet:
        """The chosen sequences, each cut to ``max_len``, as their own set."""
        return SequenceSet.from_arrays(
            [self.get(i, max_len) for i in indices],
            [self.ids[i] for i in indices] if self.ids else [],
            [self.labels[i] for i in indices] if self.labels else [],
        )


# ----------------------------------------------------------------------------- FASTA, Stockholm, labels.tsv

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")
STOCKHOLM_SUFFIXES = (".sto", ".stk", ".sth", ".stockholm", ".seed")
FASTA_WHAT = (
    "labels.tsv (id<TAB>label) and FASTA file(s) *.fasta|*.fa|*.faa, e.g. sequences exported "
    "from UniProt with their Pfam family or GO term as label"
)
PFAM_WHAT = (
    "Pfam-style family files: Stockholm alignments (*.sto, or Pfam-A.seed.gz from "
    "https://ftp.ebi.ac.uk/pub/databases/Pfam/current_release/) or one FASTA file per family"
)


def _stem(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.rsplit(".", 1)[0] if "." in name else name


def file_kind(path: Path) -> str | None:
    """ "fasta", "stockholm" or None, from the file name (``.gz`` allowed)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return "fasta" if suffix in FASTA_SUFFIXES else "stockholm" if suffix in STOCKHOLM_SUFFIXES else None


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

    for line_no, line in text_lines(path, encoding="latin-1", what="a FASTA file"):
        if line.startswith(">"):
            if name is not None:
                yield finish()
            fields = line[1:].split()
            if not fields:
                raise MalformedRecord(path, line_no, "FASTA header '>' without an id")
            name, header_line, chunks = fields[0], line_no, []
            if name in seen:
                raise MalformedRecord(
                    path, f"record '{name}' (line {line_no})", f"duplicate id (first at line {seen[name]})"
                )
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
    file (one or many alignments, as in ``Pfam-A.seed``); gaps removed, insert (lower-case)
    residues kept. The family is the alignment's ``#=GF ID``, else the file name."""
    stem = _stem(path)
    family, order, parts, start, inside, line_no = None, [], {}, 0, False, 0
    for line_no, line in text_lines(path, encoding="latin-1", what="a Stockholm alignment"):
        text = line.strip()
        if not inside:
            if not text:
                continue
            if not text.startswith("# STOCKHOLM"):
                raise MalformedRecord(
                    path, line_no, f"expected '# STOCKHOLM 1.0', got {text[:40]!r}: not a Stockholm file?"
                )
            inside, family, order, parts, start = True, None, [], {}, line_no
        elif text == "//":
            label = family or stem
            for name in order:
                where = f"sequence '{name}' of alignment '{label}'"
                ids = reader.encode("".join(parts[name]), path, where)
                if ids.size == 0:
                    raise MalformedRecord(path, where, "has no residues (only gaps)")
                yield label, name, ids
            inside = False
        elif text.startswith("#=GF"):
            fields = text.split(None, 2)
            if len(fields) == 3 and fields[1] == "ID":
                family = fields[2].strip()
        elif text and not text.startswith("#"):  # a sequence line (#=GS, #=GR, #=GC are skipped)
            fields = text.split()
            if len(fields) != 2:
                problem = (
                    "has no sequence"
                    if len(fields) == 1
                    else f"has {len(fields)} fields, expected '<name> <aligned sequence>'"
                )
                raise MalformedRecord(path, line_no, f"sequence line '{fields[0]}' {problem}")
            name, aligned = fields
            if name not in parts:
                order.append(name)
                parts[name] = []
            parts[name].append(aligned)
    if inside:
        raise MalformedRecord(
            path,
            f"alignment '{family or stem}' (line {start})",
            f"not terminated by '//' (file ends at line {line_no})",
        )


def read_labels(path: Path) -> dict[str, str]:
    """``id<TAB>label`` rows (an optional header ``id<TAB>label``), UTF-8, LF or CRLF, an
    optional BOM; bad rows name file and line; an empty or header-only file names the file."""
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line_no, line in text_lines(path, what="labels.tsv (id<TAB>label rows)"):
        if not line.strip():
            continue
        fields = [x.strip() for x in line.split("\t")]
        if line_no == 1 and [x.lower() for x in fields] == ["id", "label"]:
            continue
        if len(fields) != 2:
            raise MalformedRecord(path, line_no, f"expected 2 tab-separated fields 'id<TAB>label', got {len(fields)}")
        seq_id, label = fields
        if not seq_id or not label:
            raise MalformedRecord(path, line_no, "empty id or label")
        if seq_id in labels and labels[seq_id] != label:
            raise MalformedRecord(
                path,
                line_no,
                f"id '{seq_id}' labelled '{label}', but '{labels[seq_id]}' at line {first_line[seq_id]}",
            )
        labels[seq_id] = label
        first_line.setdefault(seq_id, line_no)
    if not labels:
        raise DataSourceError(f"{path} holds only its header, no 'id<TAB>label' rows")
    return labels


def _id_keys(seq_id: str) -> list[str]:
    """The ways a FASTA id may appear in labels.tsv: itself, and UniProt's ``db|ACCESSION|NAME`` accession."""
    parts = seq_id.split("|")
    return [seq_id, parts[1]] if len(parts) >= 3 and parts[1] else [seq_id]


def _require_dir(data_dir: str, source: str, what: str) -> Path:
    if not data_dir:
        raise DataSourceError(f"task.source={source} needs task.data_dir=<folder with {what}>")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataSourceError(f"task.data_dir={folder} does not exist; it should hold {what}")
    return folder


def read_fasta_folder(data_dir: str, reader: ResidueReader, *, with_labels: bool) -> SequenceSet:
    """Every FASTA file in ``data_dir`` (with its label from ``labels.tsv`` when ``with_labels``;
    records without a row there are left out, counted)."""
    folder = _require_dir(data_dir, "fasta", FASTA_WHAT if with_labels else "FASTA file(s) *.fasta|*.fa|*.faa")
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_kind(p) == "fasta")
    if not files:
        raise DataSourceError(
            f"no FASTA files (*.fasta, *.fa, *.faa, optionally .gz) in {folder}; it should hold {FASTA_WHAT}"
        )
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
            raise DataSourceError(
                f"none of the FASTA ids in {folder} appear in labels.tsv (e.g. labels.tsv has '{example}')"
            )
        if unlabelled:
            log.warning("protein: %d FASTA records have no row in labels.tsv and are left out", unlabelled)
        if len(labels) > len(used):
            log.warning("protein: %d ids of labels.tsv have no FASTA record", len(labels) - len(used))
    return SequenceSet.from_arrays(arrays, ids, names)


def read_family_folder(data_dir: str, reader: ResidueReader) -> SequenceSet:
    """Every family file (Stockholm alignments or one FASTA file per family) in ``data_dir``."""
    folder = _require_dir(data_dir, "pfam", PFAM_WHAT)
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_kind(p))
    if not files:
        raise DataSourceError(f"no family files in {folder}; task.source=pfam needs {PFAM_WHAT}")
    arrays, ids, names = [], [], []
    for path in files:
        if file_kind(path) == "stockholm":
            records = read_stockholm(path, reader)
        else:
            records = ((_stem(path), name, seq) for name, seq in read_fasta(path, reader))
        for family, name, seq in records:
            arrays.append(seq)
            ids.append(name)
            names.append(family)
    return SequenceSet.from_arrays(arrays, ids, names)


# ----------------------------------------------------------------------------- BLAST databases, metastudent

METASTUDENT_PACKAGE = "metastudent-data"
METASTUDENT_DIR = "usr/share/metastudent-data/dataset_201401"
ONTOLOGIES = {"MFO": "GO:0003674", "BPO": "GO:0008150", "CCO": "GO:0005575"}  # and their root terms
HIERARCHY = ("is_a", "part_of")


def metastudent_folder(data_dir: str, ontology: str) -> Path:
    """``dataset_201401``: ``data_dir`` if given, else Debian's ``metastudent-data``."""
    if ontology not in ONTOLOGIES:
        raise ValueError(f"task.ontology='{ontology}'; valid: {', '.join(ONTOLOGIES)}")
    if data_dir:
        folder = Path(data_dir)
    else:
        from harness.data.debian import debian_path

        folder = debian_path(METASTUDENT_PACKAGE, METASTUDENT_DIR)
    needed = [folder / ontology / "goasp.fasta.pin", folder / ontology / "goasp.fasta.psq"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise DataSourceError(
            f"{', '.join(missing)} not found: task.source=metastudent reads Debian's {METASTUDENT_PACKAGE} "
            f"(/{METASTUDENT_DIR}); install it (apt-get install {METASTUDENT_PACKAGE}) or set task.data_dir "
            f"to a copy of dataset_201401"
        )
    return folder


def read_blast_db(prefix: Path, *, accessions: bool = True) -> SequenceSet:
    """A BLAST v4 protein database (``prefix.pin``, ``.psq``, ``.phr``), vectorised.

    ``.pin`` (big-endian): version 4, type 1 (protein), title and date (length-prefixed),
    N, total residues (8 bytes, little-endian), max length, N+1 header offsets, N+1
    sequence offsets. Sequence i is ``psq[off[i] : off[i+1] - 1]`` in NCBIstdaa codes (a
    0 byte ends each). With ``accessions``, a sequence's id is its header's title (an
    ASN.1 VisibleString) up to its first ``|`` (metastudent: ``ACCESSION|GO:...``)."""
    pin_path, psq_path, phr_path = (prefix.with_name(prefix.name + s) for s in (".pin", ".psq", ".phr"))
    pin = pin_path.read_bytes()
    try:
        version, kind = struct.unpack_from(">II", pin, 0)
        if (version, kind) != (4, 1):
            raise MalformedRecord(
                pin_path,
                "header",
                f"expected a BLAST v4 protein database (version 4, type 1), got version {version}, type {kind}",
            )
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
    psq = np.fromfile(psq_path, dtype=np.uint8)
    if offsets[-1] != psq.size or np.any(np.diff(offsets) < 1):
        raise MalformedRecord(
            psq_path, "offsets", f"sequence offsets of {pin_path.name} do not fit the {psq.size}-byte file"
        )
    lengths = np.diff(offsets) - 1
    if int(lengths.sum()) != total:
        log.warning("%s: index says %d residues, offsets give %d", pin_path, total, int(lengths.sum()))
    keep = np.ones(psq.size, dtype=bool)  # drop the leading byte and the 0 after every sequence
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
        text = tag + 2 + (size & 0x7F if size & 0x80 else 0)  # long-form lengths: 0x8n then n bytes
        bar = phr.find(b"|", text, end)
        if bar < 0:
            raise MalformedRecord(
                phr_path, f"record {i}", f"title {phr[text : text + 30]!r} has no 'ACCESSION|' prefix"
            )
        accessions.append(phr[text:bar].decode("ascii", "replace"))
    return accessions


def read_annotations(path: Path) -> list[tuple[str, frozenset[str]]]:
    """(accession, GO terms) per line of ``goasp_annot.dat`` (repeated terms count once)."""
    rows = []
    with open(path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) < 2 or not all(t.startswith("GO:") for t in fields[1:]):
                raise MalformedRecord(
                    path, line_no, f"expected 'ACCESSION<TAB>GO:nnnnnnn ...', got {line.strip()[:60]!r}"
                )
            rows.append((fields[0], frozenset(fields[1:])))
    return rows


def read_go_parents(path: Path) -> dict[str, set[str]]:
    """child -> parents over is_a/part_of edges of ``goGraph.txt`` (parent, child, 1, relation)."""
    parents: dict[str, set[str]] = defaultdict(set)
    with open(path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) != 4:
                raise MalformedRecord(
                    path, line_no, f"expected 'PARENT CHILD DISTANCE RELATION', got {len(fields)} fields"
                )
            if fields[3] in HIERARCHY:
                parents[fields[1]].add(fields[0])
    return parents


class Ancestors:
    """Memoised ancestor sets of GO terms (the term itself included)."""

    def __init__(self, parents: dict[str, set[str]]):
        self.parents: dict[str, set[str]] = parents
        self.memo: dict[str, frozenset[str]] = {}

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
    """The ``count`` terms most often annotated directly, skipping the root and any term
    that is an ancestor or descendant of one already chosen (so none implies another)."""
    direct = Counter(t for terms in annotations for t in terms)
    chosen: list[str] = []
    for term, _ in sorted(direct.items(), key=lambda kv: (-kv[1], kv[0])):
        if term == root or any(term in ancestors(c) or c in ancestors(term) for c in chosen):
            continue
        chosen.append(term)
        if len(chosen) == count:
            break
    return chosen


def read_metastudent(data_dir: str, ontology: str, *, num_classes: int = 0) -> SequenceSet:
    """The ontology's sequences; with ``num_classes``, labelled by GO term: the chosen terms
    (``choose_terms``), a protein labelled by the one chosen term its annotations imply (a
    term implies itself and its ancestors), "" when it implies none or several (counted)."""
    folder = metastudent_folder(data_dir, ontology)
    log.info("metastudent %s: step 1/3, reading the BLAST database (first preparation only; ~40 s in all)", ontology)
    db = read_blast_db(folder / ontology / "goasp.fasta", accessions=bool(num_classes))
    log.info("metastudent %s: %d sequences, %d residues", ontology, len(db), db.residues.size)
    if not num_classes:
        return db
    annot_path = folder / ontology / "goasp_annot.dat"
    log.info("metastudent %s: step 2/3, reading the GO annotations %s", ontology, annot_path.name)
    rows = read_annotations(annot_path)
    if len(rows) != len(db):
        raise MalformedRecord(
            annot_path, "end of file", f"{len(rows)} annotation lines for {len(db)} database sequences"
        )
    for i, ((accession, _), db_accession) in enumerate(zip(rows, db.ids)):
        if accession != db_accession:
            raise MalformedRecord(
                annot_path, i + 1, f"accession {accession} where the database's record {i} is {db_accession}"
            )
    terms = [t for _, t in rows]
    log.info("metastudent %s: step 3/3, the GO graph and the class choice", ontology)
    ancestors = Ancestors(read_go_parents(folder / "goGraph.txt"))
    chosen = set(choose_terms(terms, ancestors, num_classes, ONTOLOGIES[ontology]))
    names = _go_names(folder / "nameMapping.txt", chosen)
    labels, none, several = [], 0, 0
    for annotated in terms:
        implied = set().union(*(ancestors(t) for t in annotated)) & chosen
        labels.append(next(iter(implied)) if len(implied) == 1 else "")
        none += not implied
        several += len(implied) > 1
    log.info("metastudent %s classes: %s", ontology, "; ".join(f"{t} {names.get(t, '?')}" for t in sorted(chosen)))
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


def read_sequences(source: str, data_dir: str, *, ontology: str = "MFO", num_classes: int = 0) -> SequenceSet:
    """The sequences of a source; labelled when ``num_classes`` (metastudent: that many
    GO terms; fasta: labels.tsv; pfam: always, by family)."""
    reader = ResidueReader()
    if source == "metastudent":
        seqs = read_metastudent(data_dir, ontology, num_classes=num_classes)
    elif source == "fasta":
        seqs = read_fasta_folder(data_dir, reader, with_labels=bool(num_classes))
    elif source == "pfam":
        seqs = read_family_folder(data_dir, reader)
    else:
        raise ValueError(f"unknown protein source '{source}'")
    reader.report(f"protein ({source})")
    return seqs


def protein_cache_params(cfg, params: dict) -> dict:
    """Cache-key parts of the protein tasks: the ontology matters only for metastudent; a
    source folder is keyed by its resolved path (its files by ``protein_source_files``)."""
    if cfg.source != "metastudent":
        params.pop("ontology", None)
    if cfg.data_dir:
        params["data_dir"] = str(Path(cfg.data_dir).resolve())
    return params


def protein_source_files(cfg, *, with_labels: bool) -> list[Path]:
    """The files ``read_sequences`` reads for ``cfg`` (for the data cache key); none when the
    source is missing (the build says what to provide)."""
    if cfg.source == "metastudent":
        try:
            folder = metastudent_folder(cfg.data_dir, cfg.ontology)
        except DataSourceError:
            return []
        db = [folder / cfg.ontology / f"goasp.fasta.{ext}" for ext in ("pin", "psq", "phr")]
        return db + (
            [folder / cfg.ontology / "goasp_annot.dat", folder / "goGraph.txt", folder / "nameMapping.txt"]
            if with_labels
            else []
        )
    folder = Path(cfg.data_dir) if cfg.data_dir else None
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_kind(p))
    if cfg.source == "fasta":
        files = [p for p in files if file_kind(p) == "fasta"] + ([folder / "labels.tsv"] if with_labels else [])
    return files


# ----------------------------------------------------------------------------- de-duplication and splitting


def crop_and_dedupe(
    seqs: SequenceSet, order: np.ndarray, max_len: int, *, labelled: bool, limit: int = 0, what: str = "protein"
) -> list[int]:
    """Indices (taken in ``order``) of distinct sequences once cut to ``max_len``, the
    first copy of each kept; with ``labelled``, a sequence seen with two different labels is
    dropped altogether. Unlabelled, stops after ``limit`` distinct ones (0: no limit)."""
    first: dict[bytes, int] = {}
    conflicting: set[bytes] = set()
    copies = 0
    for i in order.tolist():
        key = seqs.get(i, max_len).tobytes()
        j = first.get(key)
        if j is None:
            first[key] = i
            if limit and not labelled and len(first) >= limit:
                break
        else:
            copies += 1
            if labelled and seqs.labels[j] != seqs.labels[i]:
                conflicting.add(key)
    if copies:
        log.info("%s: %d copies of an identical (cut) sequence dropped", what, copies)
    if conflicting:
        log.info("%s: %d sequences carrying different labels dropped", what, len(conflicting))
    return [i for key, i in first.items() if key not in conflicting]


def _kmer_codes(residues: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k-mer codes, owning sequence) of every k-residue window inside one sequence."""
    n = residues.size
    if n < k:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    codes = np.zeros(n - k + 1, dtype=np.uint64)
    for j in range(k):  # 5 bits per residue (ids < 32)
        codes = codes * np.uint64(32) + residues[j : n - k + 1 + j].astype(np.uint64)
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[: n - k + 1]
    inside = np.arange(n - k + 1) + k <= offsets[1:][owner]
    return codes[inside], owner[inside]


def near_duplicate_groups(
    seqs: SequenceSet, *, k: int = 5, bands: int = 20, rows: int = 3, seed: int = 0
) -> np.ndarray:
    """A group id per sequence; sequences with alike k-mer sets share a group, transitively.

    MinHash LSH over the sets of 5-mers, ``bands`` bands of ``rows`` hashes: a pair with
    Jaccard similarity J is grouped with probability 1 - (1 - J^rows)^bands. Two sequences
    at identity p share about p^5 of their 5-mers (J = p^5 / (2 - p^5)), so with 20 x 3:
    95% identity is grouped with probability > 0.99, 90% about 0.8, 80% about 0.15,
    unrelated proteins (J ~ 0) practically never."""
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
            hashed = (codes * mult[h] + add[h]) >> np.uint64(32)  # multiply-shift hashing
            if starts.size:
                signature[has, h] = np.minimum.reduceat(hashed, starts)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    members = np.flatnonzero(has)  # sequences shorter than k stay alone
    for b in range(bands):
        _, bucket = np.unique(signature[members, b * rows : (b + 1) * rows], axis=0, return_inverse=True)
        bucket = bucket.ravel()
        order = np.argsort(bucket, kind="stable")
        same = bucket[order[1:]] == bucket[order[:-1]]
        for a, c in zip(members[order[:-1][same]].tolist(), members[order[1:][same]].tolist()):
            ra, rc = find(a), find(c)
            if ra != rc:
                parent[max(ra, rc)] = min(ra, rc)
    return np.array([find(i) for i in range(n)])


def group_split(
    groups: np.ndarray, labels: np.ndarray | None, fractions: tuple[float, float], seed: int
) -> list[list[int]]:
    """Indices for (train, validation, test): whole groups go to one split. Per class (a
    group counts for its most common label; one class without labels), the groups, in a
    seeded random order, fill the test quota, then the validation quota (``fractions`` =
    (validation, test) of the class, at least one sequence each), then train."""
    rng = np.random.default_rng(seed)
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups.tolist()):
        by_group[g].append(i)
    strata: dict[int, list[int]] = defaultdict(list)
    for g, idx in by_group.items():
        strata[Counter(labels[idx].tolist()).most_common(1)[0][0] if labels is not None else 0].append(g)
    parts: list[list[int]] = [[], [], []]
    for _, members in sorted(strata.items()):
        total = sum(len(by_group[g]) for g in members)
        quota = {2: max(1, round(fractions[1] * total)), 1: max(1, round(fractions[0] * total))}
        filled = {1: 0, 2: 0}
        for j in rng.permutation(len(members)):
            g = members[j]
            split = 2 if filled[2] < quota[2] else 1 if filled[1] < quota[1] else 0
            if split:
                filled[split] += len(by_group[g])
            parts[split].extend(by_group[g])
    return [sorted(p) for p in parts]


def split_note(parts: list[list[int]], groups: np.ndarray) -> str:
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1].ravel()) if groups.size else np.zeros(0, dtype=int)
    largest = sizes.max() if sizes.size else 0
    return (
        f"train/validation/test {len(parts[0])}/{len(parts[1])}/{len(parts[2])}; {sizes.size} groups of "
        f"near-identical sequences ({int((sizes > 1).sum())} with more than one, largest {largest})"
    )


def log_cut(lengths: np.ndarray, max_len: int, what: str) -> None:
    longer = int((lengths > max_len).sum())
    if longer:
        log.info("%s: %d of %d sequences longer than %d residues are cut to them", what, longer, lengths.size, max_len)
