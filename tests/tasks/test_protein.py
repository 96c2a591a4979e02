"""Protein classification: readers on fixtures in the published layouts (FASTA + labels.tsv,
Stockholm/Pfam, BLAST v4 + GO annotations as in Debian's metastudent-data), the offline
builder's statistics and splits, malformed records, and one tiny cell end to end."""

import gzip
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from harness.core.registry import create_task
from harness.data.task import DataSourceError, MalformedRecord
from harness.train.config import compose
from harness.train.run import run_cell
from tasks import _protein_io as pio

STANDARD = pio.STANDARD


# ----------------------------------------------------------------------------- fixture writers


def mutate(rng: random.Random, seq: str, identity: float) -> str:
    """A copy of ``seq`` with about (1 - identity) of its residues substituted."""
    return "".join(rng.choice(STANDARD) if rng.random() > identity else c for c in seq)


def families(seed: int, count: int, per_family: int, length: int = 80, identity: float = 0.6) -> dict[str, list[str]]:
    """``count`` families of ``per_family`` distant relatives of a random ancestor each."""
    rng = random.Random(seed)
    out = {}
    for f in range(count):
        ancestor = "".join(rng.choice(STANDARD) for _ in range(length))
        out[f"fam{f}"] = [
            "M" + mutate(rng, ancestor, identity)[: rng.randint(length // 2, length)] for _ in range(per_family)
        ]
    return out


def write_fasta(path: Path, records: list[tuple[str, str]], width: int = 60) -> None:
    """FASTA as UniProt writes it: '>' header lines, sequence wrapped at 60 columns."""
    lines = []
    for header, seq in records:
        lines.append(f">{header}")
        lines.extend(seq[i : i + width] for i in range(0, len(seq), width))
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def write_fasta_source(folder: Path, fams: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """A ``task.source=fasta`` folder: two FASTA files (one gzipped), UniProt-style ids, and
    labels.tsv keyed by accession. Returns (accession, label, sequence) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        (f"P{f:02d}{i:03d}", label, seq) for f, (label, seqs) in enumerate(fams.items()) for i, seq in enumerate(seqs)
    ]
    records = [(f"sp|{acc}|PROT{n}_HUMAN Protein {n} OS=Homo sapiens", seq) for n, (acc, _, seq) in enumerate(rows)]
    write_fasta(folder / "uniprot_a.fasta", records[::2])
    write_fasta(folder / "uniprot_b.fa.gz", records[1::2])
    (folder / "labels.tsv").write_text("id\tlabel\n" + "".join(f"{acc}\t{label}\n" for acc, label, _ in rows))
    return rows


def write_blast_db(prefix: Path, titles: list[str], seqs: list[str]) -> None:
    """A BLAST v4 protein database as makeblastdb writes it (the layout of metastudent-data)."""

    def pstring(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    psq, seq_offsets = bytearray(b"\x00"), []
    for seq in seqs:
        seq_offsets.append(len(psq))
        psq += bytes(pio.NCBISTDAA.index(c) for c in seq) + b"\x00"
    seq_offsets.append(len(psq))
    phr, header_offsets = bytearray(), []
    for title in titles:  # Blast-def-line-set { { title VisibleString, seqid { local str "BL_ORD_ID" }, ... } }
        header_offsets.append(len(phr))
        text = title.encode()
        length = bytes([len(text)]) if len(text) < 128 else bytes([0x81, len(text)])
        phr += (
            b"\x30\x80\x30\x80\xa0\x80\x1a"
            + length
            + text
            + b"\x00\x00\xa1\x80\x30\x80\xaa\x80\x1a\x09BL_ORD_ID\x00\x00\x00\x00"
        )
    header_offsets.append(len(phr))
    pin = (
        struct.pack(">II", 4, 1)
        + pstring(b"dataset_201401/MFO/goasp.fasta")
        + pstring(b"Jan 20, 2022  10:32 AM\x00\x00\x00\x00")
    )
    pin += (
        struct.pack(">I", len(seqs)) + struct.pack("<Q", sum(map(len, seqs))) + struct.pack(">I", max(map(len, seqs)))
    )
    pin += np.asarray(header_offsets, dtype=">u4").tobytes() + np.asarray(seq_offsets, dtype=">u4").tobytes()
    prefix.with_name(prefix.name + ".pin").write_bytes(pin)
    prefix.with_name(prefix.name + ".psq").write_bytes(bytes(psq))
    prefix.with_name(prefix.name + ".phr").write_bytes(bytes(phr))


# A GO fragment: root -> binding -> {ion binding -> metal ion binding, nucleotide binding};
# root -> catalytic -> {hydrolase, transferase}.
GO_EDGES = [
    ("GO:0003674", "GO:0005488"),
    ("GO:0005488", "GO:0043167"),
    ("GO:0043167", "GO:0046872"),
    ("GO:0005488", "GO:0000166"),
    ("GO:0003674", "GO:0003824"),
    ("GO:0003824", "GO:0016787"),
    ("GO:0003824", "GO:0016740"),
]
GO_NAMES = {
    "GO:0003674": "molecular_function",
    "GO:0005488": "binding",
    "GO:0043167": "ion binding",
    "GO:0046872": "metal ion binding",
    "GO:0000166": "nucleotide binding",
    "GO:0003824": "catalytic activity",
    "GO:0016787": "hydrolase activity",
    "GO:0016740": "transferase activity",
}


def write_metastudent(folder: Path, proteins: list[tuple[str, list[str], str]]) -> Path:
    """``dataset_201401`` with an MFO database: (accession, GO terms, sequence) per protein."""
    (folder / "MFO").mkdir(parents=True)
    titles = [f"{acc}|{','.join(terms)}" for acc, terms, _ in proteins]
    write_blast_db(folder / "MFO" / "goasp.fasta", titles, [seq for _, _, seq in proteins])
    (folder / "MFO" / "goasp_annot.dat").write_text(
        "".join(f"{acc}\t" + "\t".join(t for term in terms for t in (term, term)) + "\n" for acc, terms, _ in proteins)
    )
    (folder / "goGraph.txt").write_text(
        "".join(f"{p}\t{c}\t1\tis_a\n" for p, c in GO_EDGES) + "GO:0016787\tGO:0000166\t1\tregulates\n"
    )
    (folder / "nameMapping.txt").write_text("".join(f"{t}\t{n}\n" for t, n in GO_NAMES.items()))
    return folder


def metastudent_sample(seed: int = 0) -> list[tuple[str, list[str], str]]:
    """Proteins of four functions (60, 50, 40, 25 of them), plus: proteins annotated with
    two chosen terms, with only the root, exact copies, and near-copies of others."""
    fams = families(seed, 4, 60)
    terms = ["GO:0046872", "GO:0016787", "GO:0000166", "GO:0016740"]
    proteins = []
    for f, (count, term) in enumerate(zip((60, 50, 40, 25), terms)):
        proteins += [(f"Q{f}{i:04d}", [term], seq) for i, seq in enumerate(fams[f"fam{f}"][:count])]
    rng = random.Random(seed)
    proteins += [(f"S{i:04d}", ["GO:0046872", "GO:0016787"], fams["fam0"][i] + "W") for i in range(5)]  # two classes
    proteins += [(f"R{i:04d}", ["GO:0003674"], fams["fam1"][i] + "W") for i in range(5)]  # root only: no class
    proteins += [(f"C{i:04d}", [terms[0]], fams["fam0"][i]) for i in range(6)]  # exact copies
    proteins += [(f"N{i:04d}", [terms[1]], mutate(rng, fams["fam1"][i], 0.97)) for i in range(6)]  # near copies
    return proteins


def split_sequences(dsd) -> dict[str, list[str]]:
    return {s: [pio.decode(ids) for ids in dsd[s]["input_ids"]] for s in ("train", "validation", "test")}


# ----------------------------------------------------------------------------- vocabulary and readers


def test_vocabulary_keeps_rare_letters_and_reads_others_as_x(tmp_path):
    assert pio.ALPHABET == "ACDEFGHIKLMNPQRSTVWYXBZUO" and pio.VOCAB_SIZE == 26
    write_fasta(tmp_path / "rare.fasta", [("r1", "MKXBZUO"), ("r2", "mkjac*")])
    reader = pio.ResidueReader()
    (_, r1), (_, r2) = pio.read_fasta(tmp_path / "rare.fasta", reader)
    assert pio.decode(r1) == "MKXBZUO" and len(set(r1.tolist())) == 7  # every rare letter its own token
    assert pio.decode(r2) == "MKXAC"  # lower case read, J read as X, the final stop codon dropped
    assert reader.outside == Counter({"J": 1})


def test_fasta_with_labels_tsv_loads_in_uniprot_layout(tmp_path):
    fams = families(1, 3, 8)
    rows = write_fasta_source(tmp_path / "src", fams)
    write_fasta(tmp_path / "src" / "extra.faa", [("sp|P99999|UNLAB_HUMAN", "MKV")])  # no label row: left out
    task = create_task(
        "protein",
        source="fasta",
        data_dir=str(tmp_path / "src"),
        num_classes=3,
        min_class_size=5,
        max_per_class=0,
        max_len=64,
        group_near_duplicates=False,
    )
    dsd, info = task.load(tmp_path / "cache")
    assert info.source == "fasta" and info.num_classes == 3 and sum(info.sizes.values()) == 24
    names = dsd["train"].features["label"].names
    assert names == ["fam0", "fam1", "fam2"]
    expected = {seq[:64]: label for _, label, seq in rows}
    for split in ("train", "validation", "test"):
        assert dsd[split]["label"], split  # every split has every class (stratified, at least one each)
        assert {names[y] for y in dsd[split]["label"]} == set(names)
        for ids, y in zip(dsd[split]["input_ids"], dsd[split]["label"]):
            assert expected[pio.decode(ids)] == names[y]  # the sequence with its own label, cut to max_len


def test_labels_tsv_errors_name_file_and_line(tmp_path):
    write_fasta_source(tmp_path / "src", families(2, 2, 3))
    with open(tmp_path / "src" / "labels.tsv", "a") as f:
        f.write("P00000\tfam1\n")  # P00000 is fam0 on line 2
    with pytest.raises(
        MalformedRecord, match=r"labels\.tsv, line 8: id 'P00000' labelled 'fam1', but 'fam0' at line 2"
    ):
        create_task("protein", source="fasta", data_dir=str(tmp_path / "src")).load(tmp_path / "cache")
    (tmp_path / "src" / "labels.tsv").write_text("P00000 fam0\n")
    with pytest.raises(MalformedRecord, match=r"labels\.tsv, line 1: expected 2 tab-separated fields"):
        create_task("protein", source="fasta", data_dir=str(tmp_path / "src")).load(tmp_path / "cache")


STOCKHOLM = """# STOCKHOLM 1.0
#=GF ID   Kin
#=GF AC   PF00069.29
#=GS K1/1-20 AC P12345.1
K1/1-20   MK.VLA--GEyy
K2/5-24   MKAVLAS-GE..
#=GR K1/1-20 SS CCHHHHHHHHCC
#=GC SS_cons CCHHHHHHHHCC

K1/1-20   WWPLK
K2/5-24   WW-LK
//
# STOCKHOLM 1.0
#=GF ID   Fn3
F1/3-9    PEV-SG.K
F2/3-9    PEVTSG-K
F3/1-7    AEVTAGrK
//
"""


def test_pfam_folder_reads_stockholm_and_family_fasta(tmp_path):
    src = tmp_path / "pfam"
    src.mkdir()
    (src / "Pfam-A.seed").write_text(STOCKHOLM)
    write_fasta(src / "Globin.fa", [("HBA_HUMAN", "MVLSPADKTNVKAAW"), ("HBB_HUMAN", "MVHLTPEEKSAVTAL")])
    (src / "notes.txt").write_text("not a family file\n")  # ignored
    seqs = pio.read_family_folder(str(src), pio.ResidueReader())
    got = {(label, name): pio.decode(seqs.get(i)) for i, (label, name) in enumerate(zip(seqs.labels, seqs.ids))}
    assert got == {
        ("Globin", "HBA_HUMAN"): "MVLSPADKTNVKAAW",
        ("Globin", "HBB_HUMAN"): "MVHLTPEEKSAVTAL",
        ("Kin", "K1/1-20"): "MKVLAGEYYWWPLK",
        ("Kin", "K2/5-24"): "MKAVLASGEWWLK",  # blocks joined, gaps dropped
        ("Fn3", "F1/3-9"): "PEVSGK",
        ("Fn3", "F2/3-9"): "PEVTSGK",
        ("Fn3", "F3/1-7"): "AEVTAGRK",
    }


def test_stockholm_errors_name_file_and_record(tmp_path):
    path = tmp_path / "bad.sto"
    path.write_text("# STOCKHOLM 1.0\n#=GF ID   Kin\nK1/1-20   MKV\nK2/1-20\n//\n")
    with pytest.raises(MalformedRecord, match=r"bad\.sto, line 4: sequence line 'K2/1-20' has no sequence"):
        list(pio.read_stockholm(path, pio.ResidueReader()))
    path.write_text("# STOCKHOLM 1.0\n#=GF ID   Kin\nK1/1-20   MKV\n")
    with pytest.raises(MalformedRecord, match=r"bad\.sto, alignment 'Kin' \(line 1\): not terminated by '//'"):
        list(pio.read_stockholm(path, pio.ResidueReader()))
    path.write_text("# STOCKHOLM 1.0\nK1/1-20   MK7V\n//\n")
    with pytest.raises(
        MalformedRecord, match=r"bad\.sto, sequence 'K1/1-20' of alignment 'bad': invalid character '7'"
    ):
        list(pio.read_stockholm(path, pio.ResidueReader()))


def test_fasta_record_without_sequence_names_file_and_record(tmp_path):
    src = tmp_path / "src"
    write_fasta_source(src, families(3, 2, 3))
    (src / "uniprot_a.fasta").write_text(
        ">sp|P00000|A_HUMAN\nMKVL\n>sp|P00001|B_HUMAN Empty protein\n\n>sp|P00002|C_HUMAN\nMKV\n"
    )
    with pytest.raises(
        MalformedRecord, match=r"uniprot_a\.fasta, record 'sp\|P00001\|B_HUMAN' \(line 3\): has no sequence"
    ):
        create_task("protein", source="fasta", data_dir=str(src)).load(tmp_path / "cache")
    (src / "uniprot_a.fasta").write_text("MKVL\n>sp|P00000|A_HUMAN\nMKVL\n")
    with pytest.raises(MalformedRecord, match=r"uniprot_a\.fasta, line 1: sequence data before the first '>' header"):
        create_task("protein", source="fasta", data_dir=str(src)).load(tmp_path / "cache")


def test_missing_real_source_says_what_to_provide(tmp_path):
    with pytest.raises(DataSourceError, match="task.source=fasta needs task.data_dir"):
        create_task("protein", source="fasta").load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match=r"Pfam-A\.seed"):
        create_task("protein", source="pfam", data_dir=str(tmp_path / "empty")).load(tmp_path)
    with pytest.raises(DataSourceError, match="apt-get install metastudent-data"):
        create_task("protein", data_dir=str(tmp_path / "empty")).load(tmp_path)


def test_blast_db_reader_round_trips_and_rejects_other_versions(tmp_path):
    seqs = ["MKVLAUO", "ACDEFGHIKLMNPQRSTVWYXBZ", "M"]
    write_blast_db(tmp_path / "db", [f"A{i}|GO:0000166" for i in range(3)], seqs)
    db = pio.read_blast_db(tmp_path / "db")
    assert [pio.decode(db.get(i)) for i in range(len(db))] == seqs and db.ids == ["A0", "A1", "A2"]
    pin = bytearray((tmp_path / "db.pin").read_bytes())
    pin[3] = 5
    (tmp_path / "db.pin").write_bytes(bytes(pin))
    with pytest.raises(MalformedRecord, match=r"db\.pin, header: expected a BLAST v4 protein database"):
        pio.read_blast_db(tmp_path / "db")


def test_real_files_of_debian_hmmer_examples():
    """Pfam alignments and a BLAST database as shipped: sequence counts match the files' own."""
    from harness.data.debian import debian_path

    examples = debian_path("hmmer-examples", "usr/share/doc/hmmer/examples")
    reader = pio.ResidueReader()
    for name, family, count in (("Pkinase.sto", "Pkinase", 38), ("fn3.sto", "fn3", 98), ("MADE1.sto", "MADE1", 100)):
        records = list(pio.read_stockholm(examples / "tutorial" / name, reader))
        assert len(records) == count and {f for f, _, _ in records} == {family}  # #=GF SQ of each file
    minifam = list(pio.read_stockholm(examples / "testsuite" / "minifam.gz", reader))  # five alignments, one file
    assert Counter(f for f, _, _ in minifam) == {
        "BCSC_C": 7,
        "Ependymin": 7,
        "Como_SCP": 10,
        "MHC2-interact": 6,
        "Caudal_act": 9,
    }
    db = pio.read_blast_db(examples / "testsuite" / "20aa-alitest", accessions=False)
    fasta = list(pio.read_fasta(examples / "testsuite" / "20aa-alitest.fa", reader))
    assert [pio.decode(db.get(i)) for i in range(len(db))] == [pio.decode(s) for _, s in fasta]


# ----------------------------------------------------------------------------- offline builder


def test_metastudent_builder_labels_balances_and_splits_without_duplicates(tmp_path):
    folder = write_metastudent(tmp_path / "dataset_201401", metastudent_sample())
    task = create_task(
        "protein",
        data_dir=str(folder),
        num_classes=3,
        max_per_class=45,
        min_class_size=20,
        max_len=64,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dsd, info = task.load(tmp_path / "cache")
    # Chosen: the three most annotated terms, none implying another; transferase (4th) left out.
    names = dsd["train"].features["label"].names
    assert names == ["GO:0000166", "GO:0016787", "GO:0046872"]
    counts = Counter(y for s in ("train", "validation", "test") for y in dsd[s]["label"])
    # metal ion binding: 60 distinct (6 exact copies dropped), sampled to 45; hydrolase: 50 + 6 near copies -> 45;
    # nucleotide binding: 40. The 5 proteins with two chosen terms and the 5 root-only ones are left out.
    assert counts == {2: 45, 1: 45, 0: 40}
    assert info.sizes["train"] + info.sizes["validation"] + info.sizes["test"] == 130
    assert info.majority_accuracy in {n / info.sizes["test"] for n in Counter(dsd["test"]["label"]).values()}
    assert info.length_max == 64
    seqs = split_sequences(dsd)
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not set(seqs[a]) & set(seqs[b]), (a, b)  # no sequence in two splits
    where = {s: split for split, members in seqs.items() for s in members}
    near = {acc: seq[:64] for acc, _, seq in metastudent_sample() if acc.startswith(("N", "Q1"))}
    pairs = [(near[f"Q1{i:04d}"], near[f"N{i:04d}"]) for i in range(6)]
    sampled = [(a, b) for a, b in pairs if a in where and b in where]
    assert sampled and all(where[a] == where[b] for a, b in sampled)  # near copies in the same split
    for split in ("validation", "test"):  # each class near its share: stratified
        per_class = Counter(dsd[split]["label"])
        assert all(abs(per_class[c] - 0.2 * counts[c]) <= 3 for c in counts), (split, per_class)
    again, _ = create_task(
        "protein",
        data_dir=str(folder),
        num_classes=3,
        max_per_class=45,
        min_class_size=20,
        max_len=64,
        val_fraction=0.2,
        test_fraction=0.2,
    ).load(tmp_path / "cache2")
    assert split_sequences(again) == seqs  # same seed, same data


def test_near_copies_never_straddle_splits():
    rng = random.Random(5)
    base = families(5, 1, 40, length=120, identity=0.5)["fam0"]
    near = [mutate(rng, s, 0.97) for s in base[:10]]  # 97% identical to a sequence of base
    seqs = pio.SequenceSet.from_arrays([np.asarray(pio.encode(s), dtype=np.uint8) for s in base + near], [])
    groups = pio.near_duplicate_groups(seqs)
    assert all(groups[i] == groups[40 + i] for i in range(10))
    assert len(set(groups[:40].tolist())) == 40  # distant relatives (50% identity) stay apart
    parts = pio.group_split(groups, None, (0.2, 0.2), seed=0)
    where = {i: p for p, part in enumerate(parts) for i in part}
    assert sorted(where) == list(range(50)) and all(where[i] == where[40 + i] for i in range(10))


def test_too_small_class_is_an_error_naming_it(tmp_path):
    folder = write_metastudent(tmp_path / "dataset_201401", metastudent_sample())
    task = create_task("protein", data_dir=str(folder), num_classes=4, min_class_size=30)
    with pytest.raises(DataSourceError, match=r"GO:0016740 \(25\)"):
        task.load(tmp_path / "cache")


@pytest.mark.slow
def test_metastudent_package_at_tiny_scale(tmp_path):
    """The real offline source (Debian metastudent-data, fetched if needed) at scale=tiny."""
    cfg = compose(["task=protein", "scale=tiny"]).task
    task = create_task("protein", **{k: v for k, v in cfg.items() if k != "name"})
    dsd, info = task.load(tmp_path)
    assert info.sizes == {"train": 384, "validation": 48, "test": 48} and info.majority_accuracy == 0.25
    assert Counter(dsd["train"]["label"]) == {c: 96 for c in range(4)}  # balanced: 120 per class
    assert dsd["train"].features["label"].names == ["GO:0000166", "GO:0016740", "GO:0016787", "GO:0046872"]
    seqs = split_sequences(dsd)
    assert not set(seqs["train"]) & set(seqs["test"]) and not set(seqs["train"]) & set(seqs["validation"])
    assert info.length_max == 128


# ----------------------------------------------------------------------------- one cell


def test_tiny_cell_end_to_end(tmp_path):
    write_fasta_source(tmp_path / "src", families(7, 4, 40))
    result = run_cell(
        compose(
            [
                "task=protein",
                "scale=tiny",
                "mechanism=softmax",
                "task.source=fasta",
                f"task.data_dir={tmp_path / 'src'}",
                "trainer.progress_bar=false",
                "train.max_steps=20",
                "train.eval_every=10",
                f"results_dir={tmp_path / 'results'}",
                f"cache_dir={tmp_path / 'cache'}",
            ]
        )
    )
    assert result["status"] == "ok", result["error"]
    assert result["data"]["source"] == "fasta" and result["data"]["num_classes"] == 4
    assert result["data"]["majority_accuracy"] == pytest.approx(0.25, abs=0.05)
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1 and result["metrics"]["val"]["accuracy"] >= 0
    assert (
        len(list((tmp_path / "results/runs/tiny/protein/softmax").rglob("seed0.json"))) == 1
    )  # (a variant folder: not the presets)
