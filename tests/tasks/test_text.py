"""Text: the man-page builder (labels, balance, split by page), the IMDB loaders in their
published layouts, malformed records, and one tiny cell through harness.train.run."""

import re
from collections import Counter

import pytest

from harness.core.registry import create_task
from harness.data.task import DataSourceError, MalformedRecord
from harness.train.config import compose
from harness.train.run import run_cell
from tasks import text
from tasks._manpages import load_corpus


def decode(ids: list[int]) -> bytes:
    return bytes(i - 1 for i in ids)


# ----------------------------------------------------------------------------- manpages


@pytest.fixture(scope="module")
def page_splits():
    return text.split_documents(text.TextConfig(max_len=256))


def test_manpages_split_by_page_stratified_labels_from_the_folder(page_splits):
    keys = {split: [key for key, _, _ in docs] for split, docs in page_splits.items()}
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])
    for split in keys:
        assert len(keys[split]) == len(set(keys[split]))  # a page once per split
    total = sum(len(k) for k in keys.values())
    assert 0.75 < len(keys["train"]) / total < 0.85 and 0.07 < len(keys["test"]) / total < 0.13
    pages = load_corpus()
    for docs in page_splits.values():
        for key, _, label in docs:
            assert pages[key].path.parent.name == ("man2", "man3")[label]  # section 2 -> 0, 3 -> 1
        share = Counter(y for _, _, y in docs)[0] / len(docs)
        assert 0.2 < share < 0.4  # stratified: ~276 of 895 pages are section 2


def test_manpages_text_does_not_state_its_section(page_splits):
    pages = load_corpus()
    for docs in page_splits.values():
        for key, body, _ in docs:
            page = pages[key]
            assert not body.startswith(".TH")  # converted from roff, the title line (which names the section) gone
            if key not in ("man(7)", "man-pages(7)"):  # (these two document roff itself)
                assert not re.search(r"\\f[BIRP]|^\.(SH|TP|PP|BR) ", body, re.M), key
            assert "NAME\n" in body[:40]  # (one page has a stray line of its .TH before it, as man shows it)
            for name in page.names:
                assert not re.search(rf"(?<![\w.]){re.escape(name)}\({page.section}\w*\)", body), (key, name)


def test_manpages_examples_balanced_bytes_and_windows():
    cfg = text.TextConfig(max_len=512, windows_per_doc=2)
    splits = text.build_manpages(cfg)
    documents = text.split_documents(cfg)
    for split, (ids, labels, pages) in splits.items():
        bodies = [body.encode() for _, body, _ in documents[split]]
        assert all(decode(x) in (bodies[p][:512], bodies[p][512:1024]) for x, p in zip(ids, pages))  # its own page
        assert len(set(pages)) < len(pages)  # two windows of a page share its cluster
        counts = Counter(labels)
        assert set(counts) == {0, 1} and counts[0] == counts[1]  # balanced by subsampling
        assert all(1 <= len(x) <= 512 for x in ids)
        assert all(1 <= t <= 256 for x in ids for t in x)  # bytes shifted by one: 0 stays padding
        assert len(ids) <= 2 * len(documents[split])
        starts = {body.encode()[:512] for _, body, _ in documents[split]}
        windows = {body.encode()[512:1024] for _, body, _ in documents[split]}
        assert all(decode(x) in starts or decode(x) in windows for x in ids)  # windows of this split's pages


def test_sections_are_validated():
    with pytest.raises(ValueError, match="two or more distinct manual sections"):
        create_task("text", sections="3")
    task = create_task("text", sections="2,3,7")
    assert task.num_classes == 3


# ----------------------------------------------------------------------------- IMDB

REVIEWS = {
    ("train", "pos"): [
        (i, 7 + i % 4, f"A fine film number {i}.<br /><br />Loved it, caf\u00e9 scene included.") for i in range(10)
    ],
    ("train", "neg"): [(i, 1 + i % 4, f"Dull film {i}. I walked out after an hour.") for i in range(10, 20)],
    ("test", "pos"): [(i, 10, f"Brilliant {i}!") for i in range(3)],
    ("test", "neg"): [(i, 2, f"Awful {i}.") for i in range(3, 6)],
}


def write_aclimdb(root):
    """The aclImdb_v1 release: {train,test}/{pos,neg}/<id>_<rating>.txt, plus what the loader must ignore."""
    base = root / "aclImdb"
    for (split, polarity), rows in REVIEWS.items():
        folder = base / split / polarity
        folder.mkdir(parents=True, exist_ok=True)
        for review_id, rating, review in rows:
            (folder / f"{review_id}_{rating}.txt").write_text(review, encoding="utf-8")
        (base / split / "labeledBow.feat").write_text("0:9 1:1\n")
        (base / split / f"urls_{polarity}.txt").write_text("http://www.imdb.com/title/tt0000001/usercomments\n")
    (base / "train" / "unsup").mkdir()
    (base / "train" / "unsup" / "0_0.txt").write_text("unlabelled review")
    (base / "imdb.vocab").write_text("the\nand\n")
    return root


def imdb_rows(split):
    return [
        (review, 1 if polarity == "pos" else 0)
        for (s, polarity), rows in REVIEWS.items()
        if s == split
        for _, _, review in rows
    ]


def test_aclimdb_layout_with_validation_carved_from_train(tmp_path):
    data_dir = write_aclimdb(tmp_path / "imdb")
    task = create_task("text", source="imdb", data_dir=str(data_dir), max_len=40, val_fraction=0.2)
    dsd, info = task.load(tmp_path / "cache")
    assert info.source == "imdb" and info.sizes == {"train": 16, "validation": 4, "test": 6}
    assert info.majority_accuracy == 0.5 and task.num_classes == 2
    train_rows = {(review.encode()[:40], y) for review, y in imdb_rows("train")}
    seen = [
        (decode(x), y)
        for split in ("train", "validation")
        for x, y in zip(dsd[split]["input_ids"], dsd[split]["label"])
    ]
    assert sorted(seen) == sorted(train_rows)  # train + validation = IMDB's train, disjoint
    assert Counter(dsd["validation"]["label"]) == {0: 2, 1: 2}  # stratified
    test = sorted((decode(x), y) for x, y in zip(dsd["test"]["input_ids"], dsd["test"]["label"]))
    assert test == sorted((review.encode()[:40], y) for review, y in imdb_rows("test"))  # IMDB's own test set
    cafe = next(
        x for x in [*dsd["train"]["input_ids"], *dsd["validation"]["input_ids"]] if decode(x).startswith(b"A fine")
    )
    assert cafe == [b + 1 for b in b"A fine film number"] + cafe[18:]
    other = create_task("text", source="imdb", data_dir=str(data_dir), max_len=40, val_fraction=0.2, data_seed=3)
    again = create_task("text", source="imdb", data_dir=str(data_dir), max_len=40, val_fraction=0.2)
    assert again.load(tmp_path / "cache")[1].fingerprint == info.fingerprint
    assert other.load(tmp_path / "cache")[1].fingerprint != info.fingerprint  # the seed picks the validation reviews


def test_aclimdb_bytes_are_utf8_shifted_by_one(tmp_path):
    data_dir = write_aclimdb(tmp_path / "imdb")
    dsd, _ = create_task("text", source="imdb", data_dir=str(data_dir), max_len=1000).load(tmp_path / "cache")
    ids = next(
        x for x in [*dsd["train"]["input_ids"], *dsd["validation"]["input_ids"]] if decode(x).startswith(b"A fine")
    )
    assert decode(ids).decode("utf-8").endswith("caf\u00e9 scene included.")
    at = decode(ids).index("\u00e9".encode())
    assert ids[at : at + 2] == [0xC3 + 1, 0xA9 + 1]  # é is two bytes, each + 1


def write_hf_parquet(root):
    """The hub layout of stanfordnlp/imdb: plain_text/{train,test,unsupervised}-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "plain_text"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        rows = imdb_rows(split)
        pq.write_table(
            pa.table({"text": [r for r, _ in rows], "label": [y for _, y in rows]}),
            folder / f"{split}-00000-of-00001.parquet",
        )
    pq.write_table(pa.table({"text": ["no label"], "label": [-1]}), folder / "unsupervised-00000-of-00001.parquet")
    return root


def test_hf_parquet_and_save_to_disk_layouts(tmp_path):
    import datasets

    parquet_dir = write_hf_parquet(tmp_path / "parquet")
    dsd, info = create_task("text", source="imdb", data_dir=str(parquet_dir), max_len=64).load(tmp_path / "cache")
    assert info.sizes == {"train": 18, "validation": 2, "test": 6}  # val_fraction 0.1 of 20
    assert sorted(dsd["test"]["label"]) == [0, 0, 0, 1, 1, 1]

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"text": [r for r, _ in imdb_rows(split)], "label": [y for _, y in imdb_rows(split)]}
            )
            for split in ("train", "test")
        }
        | {"unsupervised": datasets.Dataset.from_dict({"text": ["x"], "label": [-1]})}
    ).save_to_disk(str(saved))
    dsd2, info2 = create_task("text", source="imdb", data_dir=str(saved), max_len=64).load(tmp_path / "cache")
    assert info2.fingerprint == info.fingerprint  # same reviews, same split, whatever the layout
    assert list(dsd2["train"]["input_ids"]) == list(dsd["train"]["input_ids"])


def test_malformed_imdb_records_name_file_and_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = write_aclimdb(tmp_path / "bad_name")
    (data_dir / "aclImdb/train/pos/review.txt").write_text("no id, no rating")
    with pytest.raises(MalformedRecord, match=r"train/pos/review\.txt, file name: expected <id>_<rating>\.txt"):
        create_task("text", source="imdb", data_dir=str(data_dir)).load(tmp_path / "cache")

    data_dir = write_aclimdb(tmp_path / "bad_rating")
    (data_dir / "aclImdb/test/pos/99_3.txt").write_text("a 3/10 review in pos/")
    with pytest.raises(MalformedRecord, match=r"test/pos/99_3\.txt, file name: rating 3 does not belong in pos/"):
        create_task("text", source="imdb", data_dir=str(data_dir)).load(tmp_path / "cache")

    data_dir = write_aclimdb(tmp_path / "bad_bytes")
    (data_dir / "aclImdb/train/neg/99_1.txt").write_bytes(b"caf\xe9 in latin-1")
    with pytest.raises(MalformedRecord, match=r"train/neg/99_1\.txt, line 1: not utf-8 text"):
        create_task("text", source="imdb", data_dir=str(data_dir)).load(tmp_path / "cache")

    data_dir = write_hf_parquet(tmp_path / "bad_label")
    pq.write_table(
        pa.table({"text": ["good", "bad label"], "label": [1, 5]}), data_dir / "plain_text/train-00000-of-00001.parquet"
    )
    with pytest.raises(MalformedRecord, match=r"train-00000-of-00001\.parquet, record 1: 'label' 5 is not 0"):
        create_task("text", source="imdb", data_dir=str(data_dir)).load(tmp_path / "cache")


def test_missing_imdb_says_what_to_download(tmp_path):
    (tmp_path / "empty").mkdir()
    for data_dir in ("", str(tmp_path / "empty"), str(tmp_path / "nowhere")):
        with pytest.raises(DataSourceError, match="aclImdb_v1.tar.gz"):
            create_task("text", source="imdb", data_dir=data_dir).load(tmp_path / "cache")


# ----------------------------------------------------------------------------- one cell


@pytest.mark.slow
def test_tiny_text_cell_end_to_end(tmp_path):
    cfg = compose(
        [
            "task=text",
            "mechanism=softmax",
            "scale=tiny",
            "trainer.progress_bar=false",
            "train.max_steps=12",
            "train.eval_every=6",
            f"results_dir={tmp_path / 'results'}",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert cfg.task.max_len == 256  # the task's tiny preset
    result = run_cell(cfg)
    assert result["status"] == "ok", result["error"]
    assert result["data"]["source"] == "manpages" and result["data"]["majority_accuracy"] == 0.5
    assert result["data"]["length_max"] == 256 and result["data"]["num_classes"] == 2
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1 and result["tokens_per_s"] > 0
    assert (
        len(list((tmp_path / "results/runs/tiny/text/softmax").rglob("seed0.json"))) == 1
    )  # (a variant folder: not the presets)
