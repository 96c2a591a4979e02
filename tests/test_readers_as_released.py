"""Every real-source reader on files written as their publishers' own tooling writes them
(CRLF, byte order marks, Python 2 pickles), and on hostile files: binary garbage is
``MalformedRecord(file, line)``, an empty or header-only file a ``DataSourceError`` naming it.
A test split of a single class is a warning in the log and in ``DataInfo.warnings``."""

import csv
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from harness.core.registry import create_task
from harness.data.task import DataSourceError, MalformedRecord
from tasks import _protein_io as pio
from tasks import image, listops, pathfinder, retrieval

BOM = b"\xef\xbb\xbf"
GARBAGE = b"\x89\x00\x13\xfe binary \x00\x01\x02"
EXPRESSIONS = [
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),
    ("( ( ( ( [SM 5 ) 7 ) ( ( ( [MIN 3 ) 4 ) ] ) ) ] )", np.int64(5)),
    ("( ( ( [MED 1 ) 2 ) ] )", 1),
]


def crlf(blob: bytes) -> bytes:
    return blob.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# ----------------------------------------------------------------------------- ListOps


def write_listops_as_lra(folder: Path, rows=EXPRESSIONS) -> Path:
    """As lra_benchmarks/data/listops.py ``write_to_file``: ``csv.writer(f, delimiter='\\t')``
    on a file opened without newline translation (tf.io.gfile.GFile), so lines end in CRLF;
    values are Python or NumPy ints (``np.sum(...) % 10``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in listops.SPLIT_FILES.values():
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["Source", "Target"])
            writer.writerows([list(r) for r in rows])
    return folder


def test_listops_reads_lra_generator_output_with_crlf(tmp_path):
    folder = write_listops_as_lra(tmp_path / "listops-1000")
    assert (folder / "basic_train.tsv").read_bytes().startswith(b"Source\tTarget\r\n")
    dsd, info = create_task("listops", source="lra", data_dir=str(folder), max_len=64).load(tmp_path / "cache")
    assert info.sizes == {"train": 3, "validation": 3, "test": 3}
    assert list(dsd["train"]["label"]) == [9, 5, 1]
    assert [listops.TOKENS[i] for i in dsd["train"][0]["input_ids"]] == ["[MAX", "2", "9", "]"]  # no stray \r token


def test_listops_lf_bom_and_crlf_read_the_same(tmp_path):
    folder = write_listops_as_lra(tmp_path / "crlf")
    blob = (folder / "basic_val.tsv").read_bytes()
    fingerprints = set()
    for variant, data in (("lf", blob.replace(b"\r\n", b"\n")), ("bom", BOM + blob), ("crlf", blob)):
        other = write_listops_as_lra(tmp_path / variant)
        for name in listops.SPLIT_FILES.values():
            (other / name).write_bytes(data)
        fingerprints.add(
            create_task("listops", source="lra", data_dir=str(other), max_len=64).load(tmp_path / "c")[1].fingerprint
        )
    assert len(fingerprints) == 1
    assert listops.read_tsv(folder / "basic_val.tsv")[1][1] == 5


def test_listops_hostile_files(tmp_path):
    folder = write_listops_as_lra(tmp_path / "lra")
    path = folder / "basic_test.tsv"
    path.write_bytes(path.read_bytes() + GARBAGE + b"\r\n")
    with pytest.raises(MalformedRecord, match=r"basic_test\.tsv, line 5: byte 0x00 at column 2: binary data"):
        listops.read_tsv(path)
    path.write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"basic_test\.tsv is empty"):
        listops.read_tsv(path)
    path.write_bytes(b"Source\tTarget\r\n")
    with pytest.raises(DataSourceError, match=r"basic_test\.tsv holds only its header"):
        listops.read_tsv(path)
    path.write_bytes(b"Source\tTarget\r\n( ( [MAX 2 ) ] )\t\xe9\r\n")
    with pytest.raises(MalformedRecord, match=r"basic_test\.tsv, line 2: not utf-8 text"):
        listops.read_tsv(path)


def test_listops_writer_writes_what_lra_writes(tmp_path):
    listops.write_tsv(tmp_path / "ours.tsv", [(s, int(y)) for s, y in EXPRESSIONS])
    write_listops_as_lra(tmp_path / "lra")
    assert (tmp_path / "ours.tsv").read_bytes() == (tmp_path / "lra" / "basic_train.tsv").read_bytes()


def test_single_class_test_split_is_a_warning_in_the_log_and_the_info(tmp_path, caplog):
    folder = write_listops_as_lra(tmp_path / "lra")
    write_listops_as_lra(tmp_path / "one", [EXPRESSIONS[0]] * 2)
    (folder / "basic_test.tsv").write_bytes((tmp_path / "one" / "basic_test.tsv").read_bytes())
    task = create_task("listops", source="lra", data_dir=str(folder), max_len=64)
    with caplog.at_level(logging.WARNING):
        _, info = task.load(tmp_path / "cache")
    assert info.warnings == [
        "the test split holds a single class (label 9, all 2 examples): its accuracy only says "
        "how often the model predicts that class"
    ]
    assert "single class" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, again = task.load(tmp_path / "cache")  # from the cache: still warned
    assert again.warnings == info.warnings and "single class" in caplog.text
    assert "warnings" in info.as_dict()
    two_classes = write_listops_as_lra(tmp_path / "lra2")
    assert (
        create_task("listops", source="lra", data_dir=str(two_classes), max_len=64).load(tmp_path / "c")[1].warnings
        == []
    )


# ----------------------------------------------------------------------------- AAN (retrieval)

AAN = [
    ("1", "P04-1005", "W03-0401", 'Parsing the <b>WSJ</b> "corpus"', "Shallow parsing"),
    ("0", "A00-1001", "A00-1002", "First paper", "Second paper caf\u00e9"),
]


def write_aan(folder: Path, line_end: bytes = b"\n", prefix: bytes = b"") -> Path:
    """LRA's tsv_data/new_aan_pairs.{train,eval,test}.tsv: no header, no quoting."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in retrieval.AAN_FILES.values():
        blob = line_end.join("\t".join(row).encode() for row in AAN) + line_end
        (folder / name).write_bytes(prefix + blob)
    return folder


def test_aan_lf_crlf_and_bom_read_the_same(tmp_path):
    infos = []
    for variant, args in (("lf", {}), ("crlf", {"line_end": b"\r\n"}), ("bom", {"prefix": BOM, "line_end": b"\r\n"})):
        folder = write_aan(tmp_path / variant, **args)
        dsd, info = create_task("retrieval", source="aan", data_dir=str(folder), max_len=64).load(tmp_path / "cache")
        assert bytes(i - 1 for i in dsd["train"][1]["input_ids_2"]) == "Second paper caf\u00e9".encode()  # no \r kept
        assert list(dsd["train"]["label"]) == [1, 0]
        infos.append(info.fingerprint)
    assert len(set(infos)) == 1


def test_aan_hostile_files(tmp_path):
    folder = write_aan(tmp_path / "aan", line_end=b"\r\n")
    path = folder / "new_aan_pairs.eval.tsv"
    path.write_bytes(path.read_bytes() + GARBAGE + b"\r\n")
    with pytest.raises(MalformedRecord, match=r"new_aan_pairs\.eval\.tsv, line 3: expected 5 tab-separated fields"):
        create_task("retrieval", source="aan", data_dir=str(folder)).load(tmp_path / "cache")
    path.write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"new_aan_pairs\.eval\.tsv is empty"):
        create_task("retrieval", source="aan", data_dir=str(folder)).load(tmp_path / "cache")


# ----------------------------------------------------------------------------- IMDB (text)


def write_aclimdb(root: Path, reviews: dict[tuple[str, str], list[bytes]]) -> Path:
    """aclImdb_v1: <split>/<pos|neg>/<id>_<rating>.txt, one review per file, HTML line
    breaks ``<br />`` inside, no trailing newline."""
    for (split, polarity), texts in reviews.items():
        folder = root / "aclImdb" / split / polarity
        folder.mkdir(parents=True, exist_ok=True)
        for i, blob in enumerate(texts):
            (folder / f"{i}_{8 if polarity == 'pos' else 2}.txt").write_bytes(blob)
    return root


def imdb_reviews(pos: bytes = b"Great film.<br /><br />Caf\xc3\xa9 scene!") -> dict:
    return {
        (s, p): [pos if p == "pos" else b"Dull.<br />Boring", b"Review " + p.encode() + bytes([48 + i])]
        for s in ("train", "test")
        for p in ("pos", "neg")
        for i in range(1)
    }


def test_aclimdb_reviews_keep_their_html_breaks_and_drop_a_bom(tmp_path):
    write_aclimdb(tmp_path / "plain", imdb_reviews())
    write_aclimdb(tmp_path / "bom", imdb_reviews(BOM + b"Great film.<br /><br />Caf\xc3\xa9 scene!"))
    task = create_task("text", source="imdb", data_dir=str(tmp_path / "plain"), max_len=64, val_fraction=0.5)
    dsd, info = task.load(tmp_path / "cache")
    every = [bytes(i - 1 for i in ids) for s in ("train", "validation", "test") for ids in dsd[s]["input_ids"]]
    assert b"Great film.<br /><br />Caf\xc3\xa9 scene!" in every  # as released: LRA's bytes keep the tags
    bom = create_task("text", source="imdb", data_dir=str(tmp_path / "bom"), max_len=64, val_fraction=0.5)
    assert bom.load(tmp_path / "cache")[1].fingerprint == info.fingerprint


def test_aclimdb_hostile_files(tmp_path):
    root = write_aclimdb(tmp_path / "imdb", imdb_reviews())
    bad = root / "aclImdb" / "train" / "neg" / "7_1.txt"
    bad.write_bytes(b"A review\nwith a second line and \x00\x00 binary")
    with pytest.raises(MalformedRecord, match=r"train/neg/7_1\.txt, line 2: byte 0x00 at column 24: binary data"):
        create_task("text", source="imdb", data_dir=str(root)).load(tmp_path / "cache")
    bad.write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"train/neg/7_1\.txt is empty"):
        create_task("text", source="imdb", data_dir=str(root)).load(tmp_path / "cache")


# ----------------------------------------------------------------------------- CIFAR-10 (image)


def py2_pickle(obj) -> bytes:
    """Protocol 2 as Python 2's cPickle writes a CIFAR-10 batch (memo opcodes left out):
    ``str`` (here ``bytes``) as SHORT_BINSTRING/BINSTRING, a NumPy array reduced through
    ``numpy.core.multiarray._reconstruct`` with its dtype's state as NumPy 1.x had it."""

    def dump(x) -> bytes:
        if isinstance(x, bytes):
            return (b"U" + bytes([len(x)]) if len(x) < 256 else b"T" + struct.pack("<i", len(x))) + x
        if x is None:
            return b"N"
        if isinstance(x, bool):
            return b"\x88" if x else b"\x89"
        if isinstance(x, int):
            return b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x)
        if isinstance(x, tuple):
            return b"(" + b"".join(dump(v) for v in x) + b"t"
        if isinstance(x, list):
            return b"](" + b"".join(dump(v) for v in x) + b"e"
        if isinstance(x, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in x.items()) + b"u"
        if isinstance(x, np.ndarray):
            assert x.dtype == np.uint8
            dtype = (
                b"cnumpy\ndtype\n" + dump((b"u1", 0, 1)) + b"R" + dump((3, b"|", None, None, None, -1, -1, 0)) + b"b"
            )
            state = b"(" + dump(1) + dump(tuple(x.shape)) + dtype + dump(False) + dump(x.tobytes()) + b"t"
            return (
                b"cnumpy.core.multiarray\n_reconstruct\n"
                + b"cnumpy\nndarray\n"
                + dump((0,))
                + dump(b"b")
                + b"\x87R"
                + state
                + b"b"
            )
        raise TypeError(type(x))

    return b"\x80\x02" + dump(obj) + b"."


def test_cifar_python2_batches_as_released(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for k, name in enumerate([*image.CIFAR_TRAIN_BATCHES, image.CIFAR_TEST_BATCH]):
        data = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(20) % 10)]
        batch = {
            b"batch_label": f"training batch {k + 1} of 5".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(20)],
        }
        (folder / name).write_bytes(py2_pickle(batch))
        written[name] = (data, labels)
    got, labels = image.read_cifar_batch(folder / "test_batch")
    assert np.array_equal(got, written["test_batch"][0]) and labels.tolist() == written["test_batch"][1]
    dsd, info = create_task("image", source="cifar10", data_dir=str(tmp_path)).load(tmp_path / "cache")
    assert info.sizes == {"train": 90, "validation": 10, "test": 20}
    (folder / "data_batch_3").write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"data_batch_3 is empty"):
        create_task("image", source="cifar10", data_dir=str(tmp_path)).load(tmp_path / "cache")
    (folder / "data_batch_3").write_bytes(GARBAGE)
    with pytest.raises(MalformedRecord, match=r"data_batch_3, file: not a CIFAR-10 python batch"):
        create_task("image", source="cifar10", data_dir=str(tmp_path)).load(tmp_path / "cache")


# ----------------------------------------------------------------------------- Pathfinder metadata


def write_release(root: Path, count: int = 10, *, line_end: bytes = b"\n", prefix: bytes = b"") -> Path:
    """lra_release/pathfinder32/curv_baseline: metadata/0.npy text rows (LRA's builder
    reads them with ``.split('\\n')[:-1]`` and ``.split(' ')``), grayscale PNGs in imgs/0."""
    from PIL import Image

    base = root / "pathfinder32" / "curv_baseline"
    (base / "metadata").mkdir(parents=True)
    (base / "imgs" / "0").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(
            base / "imgs" / "0" / f"sample_{k}.png"
        )
        rows.append(f"imgs/0 sample_{k}.png {k} {k % 2} 1.0 6 2 2 0.5 1 1".encode())
    (base / "metadata" / "0.npy").write_bytes(prefix + line_end.join(rows) + line_end)
    return base


def test_pathfinder_metadata_lf_crlf_and_bom_read_the_same(tmp_path):
    infos = set()
    for variant, args in (("lf", {}), ("crlf", {"line_end": b"\r\n"}), ("bom", {"prefix": BOM})):
        write_release(tmp_path / variant, **args)
        task = create_task("pathfinder", source="lra", difficulty="easy", data_dir=str(tmp_path / variant))
        infos.add(task.load(tmp_path / f"cache-{variant}")[1].fingerprint)
    assert len(infos) == 1


def test_pathfinder_metadata_hostile_files(tmp_path):
    base = write_release(tmp_path / "lra")
    meta = base / "metadata" / "0.npy"
    meta.write_bytes(meta.read_bytes() + GARBAGE + b"\n")
    with pytest.raises(MalformedRecord, match=r"metadata/0\.npy, line 11: byte 0x00 at column 2: binary data"):
        pathfinder.read_metadata(meta)
    meta.write_bytes(b"\n")
    with pytest.raises(DataSourceError, match=r"metadata/0\.npy is empty"):
        pathfinder.read_metadata(meta)


# ----------------------------------------------------------------------------- FASTA, labels.tsv, Stockholm


def test_fasta_crlf_lowercase_and_bom_with_labels_tsv_from_a_spreadsheet(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    seqs = {f"P{i:05d}": "mkvlaagiwrstyhcdefnpq"[i % 5 :] * 3 for i in range(40)}
    fasta = b"".join(f">sp|{acc}|X_HUMAN Protein\r\n{seq[:30]}\r\n{seq[30:]}\r\n".encode() for acc, seq in seqs.items())
    (src / "uniprot.fasta").write_bytes(BOM + fasta)
    # Excel's "Unicode text" / "CSV UTF-8": a BOM before the header, CRLF line ends
    (src / "labels.tsv").write_bytes(
        BOM + b"id\tlabel\r\n" + b"".join(f"{acc}\tfam{i % 2}\r\n".encode() for i, acc in enumerate(seqs))
    )
    labels = pio.read_labels(src / "labels.tsv")
    assert len(labels) == 40 and "id" not in labels and "\ufeffid" not in labels  # the header is a header
    records = list(pio.read_fasta(src / "uniprot.fasta", pio.ResidueReader()))
    assert [name for name, _ in records] == [f"sp|{acc}|X_HUMAN" for acc in seqs]
    assert pio.decode(records[0][1]) == seqs["P00000"].upper()  # lowercase residues, no \r, no BOM
    seq_set = pio.read_fasta_folder(str(src), pio.ResidueReader(), with_labels=True)
    assert len(seq_set) == 40 and set(seq_set.labels) == {"fam0", "fam1"}


def test_stockholm_with_crlf(tmp_path):
    sto = (
        b"# STOCKHOLM 1.0\r\n#=GF ID   Fam_A\r\n#=GS s1/1-8 AC P1\r\n\r\n"
        b"s1/1-8   MK-LA.GIw\r\ns2/3-9   MKVLA-GI-\r\n#=GC SS_cons ....\r\n//\r\n"
    )
    (tmp_path / "fam.sto").write_bytes(BOM + sto)
    rows = list(pio.read_stockholm(tmp_path / "fam.sto", pio.ResidueReader()))
    assert [(f, n, pio.decode(ids)) for f, n, ids in rows] == [
        ("Fam_A", "s1/1-8", "MKLAGIW"),
        ("Fam_A", "s2/3-9", "MKVLAGI"),
    ]


def test_protein_hostile_files(tmp_path):
    reader = pio.ResidueReader()
    (tmp_path / "a.fasta").write_bytes(b">x1\r\nMKV\r\n" + GARBAGE + b"\r\n")
    with pytest.raises(MalformedRecord, match=r"a\.fasta, line 3: byte 0x00 at column 2: binary data"):
        list(pio.read_fasta(tmp_path / "a.fasta", reader))
    (tmp_path / "b.fasta").write_bytes(b"\r\n")
    with pytest.raises(DataSourceError, match=r"b\.fasta is empty"):
        list(pio.read_fasta(tmp_path / "b.fasta", reader))
    (tmp_path / "c.sto").write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"c\.sto is empty"):
        list(pio.read_stockholm(tmp_path / "c.sto", reader))
    (tmp_path / "labels.tsv").write_bytes(BOM + b"id\tlabel\r\n")
    with pytest.raises(DataSourceError, match=r"labels\.tsv holds only its header"):
        pio.read_labels(tmp_path / "labels.tsv")
    (tmp_path / "labels.tsv").write_bytes(b"id\tlabel\nP1\tfam\xff\n")
    with pytest.raises(MalformedRecord, match=r"labels\.tsv, line 2: not utf-8 text"):
        pio.read_labels(tmp_path / "labels.tsv")
