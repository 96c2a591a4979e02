"""Retrieval: man-page pairs (split by document, balanced, real links, hidden links), the
AAN loader in LRA's layout, malformed records, the two-tower head, one tiny cell."""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from harness.core.registry import create_task
from harness.data.task import DataSourceError, MalformedRecord, collate
from harness.train.build import build_model
from harness.train.config import compose
from harness.train.model import ModelConfig
from harness.train.run import run_cell
from tasks import retrieval
from tasks._manpages import load_corpus

CFG = retrieval.RetrievalConfig(max_len=96)


def decode(ids: list[int]) -> bytes:
    return bytes(i - 1 for i in ids)


@pytest.fixture(scope="module")
def sample():
    """System calls and overviews (sections 2 and 7): ~400 pages, densely linked."""
    return {key: page for key, page in load_corpus().items() if page.section in ("2", "7")}


@pytest.fixture(scope="module")
def pairs(sample):
    return retrieval.manpage_pairs(sample, CFG)


def see_also_keys(page) -> set[str]:
    """``name(section)`` references after ``.SH SEE ALSO`` in the raw roff: an independent
    reading of the links (fonts stripped, ``.BR read (2),`` and ``\\fBread\\fP(2)`` alike)."""
    parts = re.split(r'^\.SH\s+"?SEE ALSO"?\s*$', page.roff, flags=re.M)
    if len(parts) < 2:
        return set()
    raw = re.split(r"^\.SH", parts[1], flags=re.M)[0]
    raw = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", raw).replace("\\-", "-").replace("\\&", "")
    return {f"{name}({section})" for name, section in re.findall(r"([\w.:+@-]+)\s*\((\d\w*)\)", raw)}


def linked(a, b) -> bool:
    return bool(({a.key} | a.aliases) & see_also_keys(b)) or bool(({b.key} | b.aliases) & see_also_keys(a))


def test_manpage_pairs_split_by_document_balanced(pairs):
    docs = {split: {key for a, b, _ in rows for key in (a, b)} for split, rows in pairs.items()}
    assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"]
    assert not docs["validation"] & docs["test"]
    for split, rows in pairs.items():
        labels = Counter(y for _, _, y in rows)
        assert labels[1] == labels[0] > 30, (split, labels)  # balanced, not empty
        unordered = [frozenset((a, b)) for a, b, _ in rows]
        assert len(set(unordered)) == len(rows) and all(len(p) == 2 for p in unordered)  # no repeats, no self pairs
        in_pos = Counter(k for a, b, y in rows if y == 1 for k in (a, b))
        in_neg = Counter(k for a, b, y in rows if y == 0 for k in (a, b))
        assert in_pos == in_neg  # no single document predicts the label
        first = sum(a < b for a, b, _ in rows) / len(rows)
        assert 0.35 < first < 0.65  # pair order randomised


def test_positives_are_see_also_links_and_negatives_are_not(sample, pairs):
    for rows in pairs.values():
        for a, b, y in rows:
            assert linked(sample[a], sample[b]) == bool(y), (a, b, y)


def test_region_split_keeps_links_inside_splits(sample, pairs):
    graph = retrieval.link_graph(sample)
    links = sum(len(n) for n in graph.values()) // 2
    positives = {split: sum(y for _, _, y in rows) for split, rows in pairs.items()}
    assert sum(positives.values()) > 0.5 * links
    for split in ("validation", "test"):  # a random 15% of the pages would hold 0.15² of the links
        assert positives[split] > 2 * 0.15**2 * links, positives
    again = retrieval.manpage_pairs(sample, CFG)
    other = retrieval.manpage_pairs(sample, retrieval.RetrievalConfig(max_len=96, data_seed=1))
    assert again == pairs and other["test"] != pairs["test"]


def test_bad_split_settings_fail_at_construction():
    with pytest.raises(ValueError, match="must be > 0 and sum to less than 1"):
        create_task("retrieval", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="region_size=0"):
        create_task("retrieval", region_size=0)
    with pytest.raises(ValueError, match="valid sources: manpages, aan"):
        create_task("retrieval", source="imdb")


def test_documents_hide_their_links(sample, pairs):
    splits = retrieval.build_manpages(CFG, sample)
    full = retrieval.build_manpages(retrieval.RetrievalConfig(max_len=100_000), sample)
    bodies = {}
    for split, rows in pairs.items():
        ids1, ids2, labels, clusters = splits[split]
        assert labels == [y for _, _, y in rows]
        docs_of: dict[int, set] = {}
        for (a, b, _), c in zip(rows, clusters):
            docs_of.setdefault(c, set()).update((a, b))
        clusters_of_doc = [
            [c for c, docs in docs_of.items() if key in docs] for key in {k for r in rows for k in r[:2]}
        ]
        assert all(len(c) == 1 for c in clusters_of_doc)  # pairs sharing a document share a cluster
        for (a, b, _), x1, x2, f1, f2 in zip(rows, ids1, ids2, full[split][0], full[split][1]):
            assert 1 <= len(x1) <= 96 and 1 <= len(x2) <= 96 and all(1 <= t <= 256 for t in x1 + x2)
            assert x1 == f1[:96] and x2 == f2[:96]  # the start of the document
            for key, ids in ((a, f1), (b, f2)):
                if key not in bodies:
                    bodies[key] = decode(ids).decode()
    for key, body in bodies.items():
        page = sample[key]
        assert body.startswith("NAME\n") and (len(body) < len(page.text()) or not see_also_keys(page))
        assert not re.search(r"\nSEE ALSO\n[^\n]*\w\(\d", body), key  # the section (heading + references) is gone
        for name in page.names:
            assert not re.search(rf"(?<![\w.]){re.escape(name)}\({page.section}\w*\)", body), (
                key,
                name,
            )  # no self-mention


# ----------------------------------------------------------------------------- AAN

AAN_ROWS = {
    "new_aan_pairs.train.tsv": [
        ("1", "P05-1057", "W08-1003", 'Statistical parsing with "quoted" text', "Parsing caf\u00e9 corpora"),
        (
            "0",
            "P05-1057",
            "J93-2004",
            "Statistical parsing with a longer abstract here",
            "Building a large annotated corpus",
        ),
        ("1", "N03-1033", "J93-2004", "Shallow parsing of treebank data", "Building a large annotated corpus"),
    ],
    "new_aan_pairs.eval.tsv": [("0", "A00-1001", "A00-1002", "One paper", "Another paper")],
    "new_aan_pairs.test.tsv": [
        ("1", "A00-1003", "A00-1004", "Third paper", "Cites the third"),
        ("0", "A00-1005", "A00-1006", "Fifth paper", "Sixth paper"),
    ],
}


def write_aan(folder, rows_by_file=AAN_ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_file.items():
        (folder / name).write_bytes("".join("\t".join(row) + "\n" for row in rows).encode("utf-8"))
    return folder


def test_aan_loader_reads_lra_layout(tmp_path):
    data_dir = write_aan(tmp_path / "tsv_data")
    task = create_task("retrieval", source="aan", data_dir=str(data_dir), max_len=24)
    dsd, info = task.load(tmp_path / "cache")
    assert info.source == "aan" and info.sizes == {"train": 3, "validation": 1, "test": 2}
    assert info.num_classes == 2 and info.majority_accuracy == 0.5
    assert set(dsd["train"].column_names) == {"input_ids_1", "input_ids_2", "label"}
    assert list(dsd["train"]["label"]) == [1, 0, 1] and list(dsd["test"]["label"]) == [1, 0]
    first = dsd["train"][0]
    assert decode(first["input_ids_1"]) == b"Statistical parsing with"  # 24 bytes, quotes not special
    assert decode(first["input_ids_2"]) == "Parsing caf\u00e9 corpora".encode()  # é: two bytes, each + 1
    assert first["input_ids_2"][11:13] == [0xC3 + 1, 0xA9 + 1]


def test_aan_malformed_lines_name_file_and_line(tmp_path):
    rows = {name: list(r) for name, r in AAN_ROWS.items()}
    rows["new_aan_pairs.eval.tsv"].append(("1", "A00-1001", "A00-1002", "text without a partner"))
    data_dir = write_aan(tmp_path / "fields", rows)
    with pytest.raises(MalformedRecord, match=r"new_aan_pairs\.eval\.tsv, line 2: expected 5 tab-separated fields"):
        create_task("retrieval", source="aan", data_dir=str(data_dir)).load(tmp_path / "cache")

    rows = {name: list(r) for name, r in AAN_ROWS.items()}
    rows["new_aan_pairs.test.tsv"][1] = ("maybe", "A00-1005", "A00-1006", "Fifth paper", "Sixth paper")
    data_dir = write_aan(tmp_path / "label", rows)
    with pytest.raises(MalformedRecord, match=r"new_aan_pairs\.test\.tsv, line 2: label 'maybe' is not 0 or 1"):
        create_task("retrieval", source="aan", data_dir=str(data_dir)).load(tmp_path / "cache")

    rows = {name: list(r) for name, r in AAN_ROWS.items()}
    rows["new_aan_pairs.train.tsv"][2] = ("1", "N03-1033", "J93-2004", "Shallow parsing", " ")
    data_dir = write_aan(tmp_path / "empty", rows)
    with pytest.raises(MalformedRecord, match=r"new_aan_pairs\.train\.tsv, line 3: text2 is empty"):
        create_task("retrieval", source="aan", data_dir=str(data_dir)).load(tmp_path / "cache")


def test_missing_aan_says_what_to_download(tmp_path):
    for data_dir in ("", str(tmp_path / "nowhere")):
        with pytest.raises(DataSourceError, match="lra_release"):
            create_task("retrieval", source="aan", data_dir=data_dir).load(tmp_path / "cache")


# ----------------------------------------------------------------------------- the two-tower head


def matcher_batch(ids1, ids2, labels):
    return collate([{"input_ids_1": a, "input_ids_2": b, "label": y} for a, b, y in zip(ids1, ids2, labels)])


def test_two_tower_head_is_symmetric_when_trained_so_and_uses_both_documents(sample):
    """Trained on pairs in both orders, the matcher gives a pair the same answer in either
    order, and replacing document 2 alone changes its answers (no tower is ignored)."""
    ids1, ids2, labels, _ = retrieval.build_manpages(retrieval.RetrievalConfig(max_len=48), sample)["train"]
    task = create_task("retrieval", max_len=48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~2 s of CPU, and no fight for the cores
    try:
        torch.manual_seed(0)
        model = build_model(task, ModelConfig(dim=32, depth=1, heads=2, mlp_dim=64, dropout=0.0), "softmax")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        for _ in range(150):
            idx = rng.choice(len(labels), 16, replace=False)
            one, two, y = [ids1[i] for i in idx], [ids2[i] for i in idx], [labels[i] for i in idx]
            batch = matcher_batch(one + two, two + one, y + y)
            loss, _ = model.loss(model(batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            batch = matcher_batch(ids1, ids2, labels)
            logits = model(batch)
            swapped = model(matcher_batch(ids2, ids1, labels))
            shift = [*range(1, len(labels)), 0]  # document 2 of the next pair instead
            other = model(matcher_batch(ids1, [ids2[i] for i in shift], labels))
    finally:
        torch.set_num_threads(threads)
    predicted = logits.argmax(-1)
    assert (predicted == batch["label"]).float().mean() > 0.6  # it learned something: not a constant answer
    positive = batch["label"] == 1
    assert (swapped.argmax(-1) == predicted)[positive].float().mean() > 0.9
    assert (other.argmax(-1) != predicted).float().mean() > 0.1 and (other - logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- one cell


@pytest.mark.slow
def test_tiny_retrieval_cell_end_to_end(tmp_path):
    cfg = compose(
        [
            "task=retrieval",
            "mechanism=softmax",
            "scale=tiny",
            "trainer.progress_bar=false",
            "train.max_steps=12",
            "train.eval_every=6",
            f"results_dir={tmp_path / 'results'}",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert cfg.task.max_len == 64  # the task's tiny preset
    result = run_cell(cfg)
    assert result["status"] == "ok", result["error"]
    assert result["data"]["source"] == "manpages" and result["data"]["majority_accuracy"] == 0.5
    assert result["data"]["length_max"] == 64 and result["data"]["num_classes"] == 2
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1 and result["tokens_per_s"] > 0
    assert (
        len(list((tmp_path / "results/runs/tiny/retrieval/softmax").rglob("seed0.json"))) == 1
    )  # (a variant folder: not the presets)
