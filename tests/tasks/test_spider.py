"""Spider: loader on a fixture in Spider's layout, the offline builder, exact match,
hardness, execution accuracy, safety against hostile predictions, relations, the head."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from harness.data.task import DataSourceError, MalformedRecord
from tasks import _spider_build as build
from tasks._spider_eval import Schema, evaluate, exact_match, hardness, parse_sql, results_equal
from tasks.spider import (
    REL,
    Spider,
    SpiderConfig,
    detokenize_sql,
    read_tables,
    schema_relations,
    serialise,
    tokenize_question,
    tokenize_sql,
)

# ----------------------------------------------------------------------------- fixture


def make_layout(root: Path) -> Path:
    """Two small databases in Spider's layout, with questions for both."""
    shop = [
        build.Table(
            "singer",
            ["id", "name", "country", "age"],
            [(1, "Joe", "France", 30), (2, "Ann", "Spain", 25), (3, "Bo", "France", 41), (4, "Cy", "Italy", 25)],
        ),
        build.Table(
            "song",
            ["id", "title", "singer_id", "sales"],
            [(1, "Rain", 1, 10.5), (2, "Sun", 1, 3.0), (3, "Sky", 3, 7.25)],
            "id",
            {"singer_id": ("singer", "id")},
        ),
    ]
    zoo = [build.Table("animal", ["id", "kind", "legs"], [(1, "cat", 4), (2, "bird", 2), (3, "dog", 4)])]
    entries = []
    for db_id, tables in (("shop", shop), ("zoo", zoo)):
        build.write_sqlite(root / "database" / db_id / f"{db_id}.sqlite", tables)
        entries.append(build.tables_entry(db_id, tables))
    (root / "tables.json").write_text(json.dumps(entries))
    train = [
        {"db_id": "shop", "question": "how many singers are there ?", "query": "SELECT count(*) FROM singer"},
        {
            "db_id": "shop",
            "question": "names of singers from France",
            "query": "SELECT name FROM singer WHERE country = 'France'",
        },
        {"db_id": "zoo", "question": "how many animal are there ?", "query": "SELECT count(*) FROM animal"},
        {"db_id": "zoo", "question": "kind of animal with 4 legs", "query": "SELECT kind FROM animal WHERE legs = 4"},
    ]
    (root / "train_spider.json").write_text(json.dumps(train))
    (root / "dev.json").write_text(
        json.dumps([{"db_id": "zoo", "question": "list the kind of all animal", "query": "SELECT kind FROM animal"}])
    )
    return root


@pytest.fixture()
def layout(tmp_path):
    return make_layout(tmp_path / "spider")


@pytest.fixture()
def shop(layout):
    return Schema.from_entry(read_tables(layout / "tables.json")["shop"])


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.sqlite"))}


# ----------------------------------------------------------------------------- loader


def test_loader_reads_spider_layout(layout):
    task = Spider(SpiderConfig(source="spider", data_dir=str(layout), val_fraction=0.5, min_freq=1))
    tables, splits = task.read_splits()
    assert set(tables) == {"shop", "zoo"}
    assert {it["db_id"] for it in splits["train"]}.isdisjoint({it["db_id"] for it in splits["validation"]})
    assert [it["query"] for it in splits["test"]] == ["SELECT kind FROM animal"]
    dsd = task.build()
    assert dsd["test"][0]["hardness"] == "easy"
    assert dsd["test"][0]["source_tokens"][:6] == ["list", "the", "kind", "of", "all", "animal"]


def test_malformed_files_name_file_and_entry(layout):
    data = json.loads((layout / "dev.json").read_text())
    data.append({"db_id": "nowhere", "question": "q", "query": "SELECT 1"})
    (layout / "dev.json").write_text(json.dumps(data))
    task = Spider(SpiderConfig(source="spider", data_dir=str(layout)))
    with pytest.raises(MalformedRecord, match=r"dev.json, entry 1: db_id 'nowhere' is not in tables.json"):
        task.read_splits()
    entries = json.loads((layout / "tables.json").read_text())
    entries[1]["column_names_original"].append([7, "ghost"])
    (layout / "tables.json").write_text(json.dumps(entries))
    with pytest.raises(MalformedRecord, match=r"tables.json, entry 1 \(db_id 'zoo'\): column \[7, 'ghost'\]"):
        read_tables(layout / "tables.json")
    with pytest.raises(DataSourceError, match="task.data_dir"):
        Spider(SpiderConfig(source="spider")).read_splits()


def test_sql_tokens_round_trip():
    sql = "SELECT T1.name FROM singer AS T1 WHERE T1.country = 'New Zealand' AND age >= 30"
    tokens = tokenize_sql(sql)
    assert tokens[:4] == ["select", "T1", ".", "name"] and ["'", "New", "Zealand", "'"] == tokens[13:17]
    assert detokenize_sql(tokens) == "select T1.name from singer as T1 where T1.country = 'New Zealand' and age >= 30"


# ----------------------------------------------------------------------------- offline builder


@pytest.mark.slow
def test_offline_builder_gold_queries_execute_with_hardness_spread(tmp_path):
    dbs = build.vega_and_sklearn_databases()
    assert len(dbs) >= 6
    levels, seen_dbs = set(), set()
    for db_id in ("barley", "linnerud", "iris"):
        path = tmp_path / db_id / f"{db_id}.sqlite"
        build.write_sqlite(path, dbs[db_id])
        schema = Schema.from_entry(build.tables_entry(db_id, dbs[db_id]))
        items = build.generate_questions(db_id, dbs[db_id], path, 40, seed=0)
        assert len(items) >= 30
        conn = sqlite3.connect(path)
        for it in items:
            assert conn.execute(it["query"]).fetchall(), it["query"]
            levels.add(hardness(parse_sql(it["query"], schema)))
            seen_dbs.add(it["db_id"])
        conn.close()
    assert levels == {"easy", "medium", "hard", "extra"}
    assert seen_dbs == {"barley", "linnerud", "iris"}


@pytest.mark.slow
def test_full_offline_source_splits_by_database(tmp_path):
    task = Spider(SpiderConfig(questions_per_db=20, split="database"), scale="tiny")
    dsd, _ = task.load(tmp_path)
    dbs = {s: set(dsd[s]["db_id"]) for s in ("train", "validation", "test")}
    assert (
        not (dbs["train"] & dbs["validation"])
        and not (dbs["train"] & dbs["test"])
        and not (dbs["validation"] & dbs["test"])
    )
    assert len(set().union(*dbs.values())) >= 6 and "chinook" in set().union(*dbs.values())


@pytest.mark.slow
def test_full_offline_source_query_split_holds_out_skeletons(tmp_path):
    task = Spider(SpiderConfig(questions_per_db=60), scale="tiny")  # split=query is the default
    dsd, _ = task.load(tmp_path)
    stats = task.stats(dsd)
    skeletons = {s: {build.sql_skeleton(q) for q in dsd[s]["query"]} for s in ("train", "validation", "test")}
    assert not (skeletons["train"] & skeletons["test"]) and not (skeletons["train"] & skeletons["validation"])
    assert stats["test"]["skeletons_seen_in_train"] == 0 and stats["test"]["skeletons"] == len(skeletons["test"]) >= 20
    assert all(stats["test"]["hardness"][level] > 0 for level in ("easy", "medium", "hard", "extra"))
    assert (
        0.12 < stats["test"]["questions"] / sum(stats[s]["questions"] for s in ("train", "validation", "test")) < 0.25
    )
    assert "chinook" in set(dsd["test"]["db_id"])  # every database in every split


# ----------------------------------------------------------------------------- widened grammar + query split


def test_sql_skeleton_blanks_names_and_values():
    a = "SELECT T2.name FROM cars AS T1 JOIN origins AS T2 ON T1.origins_id = T2.id WHERE T1.date > '2001' LIMIT 3"
    b = "SELECT T2.title FROM songs AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id WHERE T1.year > 7 LIMIT 1"
    assert build.sql_skeleton(a) == build.sql_skeleton(b)
    assert build.sql_skeleton("SELECT a FROM t WHERE b LIKE '%x%'") != build.sql_skeleton(
        "SELECT a FROM t WHERE b NOT LIKE '%x%'"
    )


def test_skeleton_split_holds_out_whole_skeletons():
    items = [
        {
            "query": f"SELECT c{i % 7} FROM t WHERE x{i} = {i}"
            if i % 3
            else f"SELECT count(*) FROM t{i} GROUP BY a{i % 5}",
            "level": "easy" if i % 3 else "medium",
        }
        for i in range(300)
    ]
    items += [{"query": f"SELECT a FROM t ORDER BY b{i} LIMIT {i}", "level": "easy"} for i in range(40)]
    kept, held = build.skeleton_split(items, 0.2, 0, lambda it: it["level"])
    assert len(kept) + len(held) == len(items)
    assert not {build.sql_skeleton(it["query"]) for it in kept} & {build.sql_skeleton(it["query"]) for it in held}
    for level in ("easy", "medium"):
        share = sum(it["level"] == level for it in held) / sum(it["level"] == level for it in items)
        assert share <= 0.2


@pytest.fixture(scope="module")
def generated():
    import tempfile

    dbs = build.vega_and_sklearn_databases()
    items, schemas = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for db_id in ("barley", "la_riots", "linnerud"):
            path = Path(tmp) / db_id / f"{db_id}.sqlite"
            build.write_sqlite(path, dbs[db_id])
            schemas[db_id] = Schema.from_entry(build.tables_entry(db_id, dbs[db_id]))
            items += build.generate_questions(db_id, dbs[db_id], path, 150, seed=0)
    return items, schemas, dbs


def test_generator_covers_spider_constructs(generated):
    items, schemas, _ = generated
    sqls = [it["query"] for it in items]
    for construct in (
        " INTERSECT ",
        " UNION ",
        " EXCEPT ",
        " LIKE '%",
        " NOT LIKE '%",
        "SELECT DISTINCT ",
        " BETWEEN ",
        " IN (SELECT ",
        " NOT IN (SELECT ",
        " HAVING count(*) ",
        " > (SELECT avg(",
        " OR ",
        " LIMIT ",
    ):
        assert any(construct in q for q in sqls), construct
    assert any(q.count(" JOIN ") >= 2 for q in sqls)  # joins over 3 tables
    joined_keys = {q.split(" ON ")[1].split()[0].split(".")[1] for q in sqls if " JOIN " in q}
    assert len(joined_keys) >= 5  # joins over many foreign keys, not one per database
    levels = {
        lv: sum(hardness(parse_sql(it["query"], schemas[it["db_id"]])) == lv for it in items) / len(items)
        for lv in ("easy", "medium", "hard", "extra")
    }
    assert levels["medium"] > levels["easy"] and all(0.08 < share < 0.55 for share in levels.values()), levels


def test_questions_paraphrase_names_and_constructs(generated):
    items, _, dbs = generated
    skeleton_frames: dict[str, set[str]] = {}
    counts = Counter(build.sql_skeleton(it["query"]) for it in items)
    verbatim = mentions = 0
    for it in items:
        columns = {c for t in dbs[it["db_id"]] for c in t.columns if "_" in c or len(c) > 4} - {"name"}
        used = [c for c in columns if re.search(rf"\b{c}\b", it["query"])]
        mentions += len(used)
        verbatim += sum(c.replace("_", " ") in it["question"].lower() for c in used)
        frame = re.sub(r"[A-Z0-9'\"].*?(?=\s|$)", "", it["question"].lower())
        skeleton_frames.setdefault(build.sql_skeleton(it["query"]), set()).add(" ".join(frame.split()[:3]))
    assert verbatim / mentions < 0.75  # a share of the columns is named by a synonym, not by its name
    frequent = [frames for sk, frames in skeleton_frames.items() if counts[sk] >= 8]
    assert frequent and sum(len(f) >= 2 for f in frequent) / len(frequent) > 0.8  # several phrasings per skeleton
    assert any(it["question"][0].isupper() for it in items) and any(it["question"][0].islower() for it in items)


# ----------------------------------------------------------------------------- exact match + hardness


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        (
            "SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id",
            "select a.name from song as b join singer as a on b.singer_id = a.id",
            True,
        ),  # aliases, join order
        (
            "SELECT name FROM singer WHERE age > 20 AND country = 'Spain'",
            "SELECT name FROM singer WHERE country = 'France' AND age > 30",
            True,
        ),  # condition order; values ignored
        ("SELECT age, name FROM singer", "SELECT name, age FROM singer", True),  # column order in SELECT
        ("SELECT name FROM singer WHERE age > 20", "SELECT name FROM singer WHERE age < 20", False),  # operator
        (
            "SELECT name FROM singer WHERE age > 20 OR country = 'x'",
            "SELECT name FROM singer WHERE age > 20 AND country = 'x'",
            False,
        ),
        ("SELECT max(age) FROM singer", "SELECT min(age) FROM singer", False),
        ("SELECT name FROM singer ORDER BY age DESC", "SELECT name FROM singer ORDER BY age DESC LIMIT 1", False),
        ("SELECT name FROM singer", "SELECT name FROM singer INTERSECT SELECT name FROM singer WHERE age > 3", False),
    ],
)
def test_exact_match_pairs(shop, pred, gold, same):
    assert exact_match(parse_sql(pred, shop), parse_sql(gold, shop)) is same


def test_values_compared_when_asked(shop):
    a = "SELECT name FROM singer WHERE country = 'France'"
    b = "SELECT name FROM singer WHERE country = 'Spain'"
    assert exact_match(parse_sql(a, shop), parse_sql(b, shop))
    assert not exact_match(parse_sql(a, shop, values=True), parse_sql(b, shop, values=True))


@pytest.mark.parametrize(
    "sql, level",
    [
        ("SELECT count(*) FROM singer", "easy"),
        ("SELECT name FROM singer ORDER BY age DESC LIMIT 1", "medium"),
        ("SELECT name FROM singer WHERE age > (SELECT avg(age) FROM singer)", "hard"),
        (
            "SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id "
            "GROUP BY T2.singer_id ORDER BY count(*) DESC LIMIT 1",
            "extra",
        ),
    ],
)
def test_hardness_levels(shop, sql, level):
    assert hardness(parse_sql(sql, shop)) == level


# ----------------------------------------------------------------------------- execution + safety


def test_execution_accuracy_multisets_and_order(layout, shop):
    schemas = {"shop": shop}
    items = [
        ("SELECT name FROM singer ORDER BY age", "SELECT name FROM singer ORDER BY age DESC", "shop"),
        ("SELECT name FROM singer", "SELECT name FROM singer ORDER BY age DESC", "shop"),
        ("SELECT name, age FROM singer WHERE age > 26", "SELECT age, name FROM singer WHERE age >= 30", "shop"),
        ("SELECT count(*) FROM singer", "SELECT count(*) FROM song", "shop"),
    ]
    scores = evaluate(items, schemas, layout / "database")
    assert [it["execution"] for it in scores["items"]] == [False, True, True, False]
    assert results_equal([(1,), (1,), (2,)], [(2,), (1,), (1,)], ordered=False)
    assert not results_equal([(1,), (1,), (2,)], [(1,), (2,), (2,)], ordered=False)
    assert not results_equal([(1,), (2,)], [(2,), (1,)], ordered=True)


def test_hostile_predictions_leave_files_identical_and_score_wrong(layout, shop):
    before = digest(layout)
    hostile = [
        "DROP TABLE singer",
        "UPDATE singer SET age = 0",
        "ATTACH DATABASE '/tmp/x.sqlite' AS x",
        "SELECT load_extension('/tmp/evil')",
        "PRAGMA query_only = OFF",
        "SELECT 1; DROP TABLE singer",
        "INSERT INTO singer VALUES (9, 'x', 'y', 1)",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c",
    ]
    start = time.perf_counter()
    scores = evaluate(
        [("SELECT count(*) FROM singer", h, "shop") for h in hostile],
        {"shop": shop},
        layout / "database",
        timeout_s=0.3,
    )
    elapsed = time.perf_counter() - start
    assert all(not it["execution"] and not it["exact"] and it["error"] for it in scores["items"]), scores["items"]
    assert "time budget" in scores["items"][-1]["error"]
    assert scores["valid_sql"] == 0.0
    assert elapsed < 0.3 * len(hostile) + 5  # the recursive query was stopped, not run to the end
    assert digest(layout) == before
    assert not Path("/tmp/x.sqlite").exists() or Path("/tmp/x.sqlite").stat().st_size == 0


def test_cli_json_shape(layout, tmp_path, capsys):
    gold = tmp_path / "gold.sql"
    pred = tmp_path / "pred.sql"
    gold.write_text("SELECT name FROM singer WHERE age > 26\tshop\nSELECT kind FROM animal\tzoo\n")
    pred.write_text("SELECT name FROM singer WHERE age > 29\nSELECT legs FROM animal\n")
    from harness.cli import main

    assert (
        main(
            [
                "tool",
                "spider-evaluate",
                f"gold={gold}",
                f"pred={pred}",
                f"tables={layout / 'tables.json'}",
                f"db_dir={layout / 'database'}",
                "json=true",
            ]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"exact", "execution", "valid_sql", "items"}
    assert scores["exact"]["all"] == 0.5 and scores["execution"]["all"] == 0.5 and scores["valid_sql"] == 1.0
    assert scores["items"][0] == {"hardness": "easy", "exact": True, "execution": True, "error": None}
    assert set(scores["exact"]) == {"easy", "medium", "hard", "extra", "all"}


# ----------------------------------------------------------------------------- relations


def test_relation_ids_on_known_example(layout):
    entry = read_tables(layout / "tables.json")["shop"]
    question = ["name", "of", "singer", "country", "France"]
    tokens, links = serialise(question, entry)
    rel = schema_relations(torch.tensor([links]))[0]
    assert rel.shape == (len(tokens), len(tokens))
    at = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first occurrence
    col = lambda table, name: next(i for i, t in enumerate(tokens) if t == name and links[i][1] == table)  # noqa: E731
    singer_t, song_t = tokens.index("singer", 6), tokens.index("song")
    assert rel[at["singer"], singer_t] == REL["q-t exact"] and rel[singer_t, at["singer"]] == REL["t-q exact"]
    assert rel[at["country"], col(1, "country")] == REL["q-c exact"]
    assert rel[at["of"], col(1, "age")] == REL["q-schema"]
    assert rel[0, 1] == REL["qq+1"] and rel[3, 0] == REL["qq-2"]
    assert rel[col(2, "singer_id"), col(1, "id")] == REL["c-c foreign key"]
    assert rel[col(1, "id"), col(2, "singer_id")] == REL["c-c foreign key reverse"]
    assert rel[col(1, "id"), singer_t] == REL["c-t primary key"] and rel[col(1, "age"), singer_t] == REL["c-t belongs"]
    assert rel[col(1, "age"), col(1, "name")] == REL["c-c same table"] and rel[col(1, "age"), song_t] == REL["c-t"]
    assert rel[song_t, singer_t] == REL["t-t foreign key"] and rel[singer_t, song_t] == REL["t-t foreign key reverse"]
    assert rel[at["<sep>"], 0] == REL["other"]
    padded = schema_relations(torch.tensor([links + [[0] * 8]]))[0]
    assert (padded[-1] == REL["pad"]).all() and (padded[:, -1] == REL["pad"]).all() and max(REL.values()) < 32


# ----------------------------------------------------------------------------- head + decoding


@pytest.mark.slow
def test_seq2seq_head_trains_decodes_and_evaluates(layout):
    from harness.data.task import collate
    from harness.train.build import build_model
    from harness.train.model import ModelConfig

    for mechanism, scope in (("relation_aware", "encoder"), ("softmax", "all")):
        task = Spider(
            SpiderConfig(
                source="spider",
                data_dir=str(layout),
                val_fraction=0.5,
                min_freq=1,
                max_target_len=24,
                mechanism_scope=scope,
            )
        )
        dsd = task.build()
        task._vocab = {
            k: [t for t, kk in zip(dsd["vocabulary"]["token"], dsd["vocabulary"]["kind"]) if kk == k]
            for k in ("source", "target")
        }
        torch.manual_seed(0)
        model = build_model(task, ModelConfig(dim=32, depth=1, heads=2, mlp_dim=32, dropout=0.0), mechanism)
        assert model.uses_relations is (mechanism == "relation_aware")
        assert len(model.encoder.mechanisms) == (1 if scope == "encoder" else 3)
        assert task.requires == ({"key_padding"} if scope == "encoder" else {"key_padding", "causal", "cross"})
        ds = dsd["train"]
        batch = collate([{c: ds[i][c] for c in ds.column_names} for i in range(len(ds))])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            loss, stats = model.loss(model(batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert stats["correct"] == len(ds)  # memorised under teacher forcing
        metrics = task.evaluate_predictions(model, ds, device="cpu", batch_size=2)
        assert metrics["exact"] == 1.0 and metrics["execution"] == 1.0 and metrics["valid_sql"] == 1.0, metrics


def test_copying_produces_unseen_tokens(layout):
    """A target token outside the output vocabulary gets probability only by copying."""
    from harness.train.seq2seq import copy_generate_log_probs

    b, t, s, v, d = 1, 1, 3, 4, 8
    h = torch.zeros(b, t, d)
    log_p = copy_generate_log_probs(
        h,
        torch.randn(b, s, d),
        torch.tensor([[False, False, True]]),
        torch.zeros(b, t, v),
        torch.zeros(b, t, d),
        torch.zeros(b, t, 1),
    )
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(1, 1))
    assert log_p[0, 0, v + 2] == float("-inf")  # padded source position
    assert torch.allclose(log_p[0, 0, v : v + 2].exp(), torch.full((2,), 0.25))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_cell_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "run",
            "task=spider",
            "mechanism=softmax",
            "scale=tiny",
            f"results_dir={tmp_path}",
            f"cache_dir={tmp_path / 'cache'}",
            "trainer.progress_bar=false",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(Path(out.stdout.strip().splitlines()[-1]).read_text())
    assert record["status"] == "ok" and record["task"] == "spider"


# ------------------------------------------------------------------------ word pieces, placeholders, copy-only names


def test_word_pieces_split_names_into_question_words():
    from tasks.spider import word_pieces

    assert word_pieces("total_phenols") == ["total", "phenols"]
    assert word_pieces("FirstName") == ["first", "name"]
    assert word_pieces("Singer_ID") == ["singer", "id"]
    assert word_pieces("T1") == ["t1"] and word_pieces("<sep>") == ["<sep>"] and word_pieces("_") == ["_"]


def test_placeholders_link_equal_unknown_words_and_hide_known_ones():
    from tasks.spider import piece_ids

    vocab = {"<pad>": 0, "<unk>": 1, "<w0>": 2, "<w1>": 3, "list": 4, "of": 5, "name": 6}
    pieces = [["list"], ["horsepower"], ["of"], ["cars"], ["name"], ["horsepower"], ["max", "name"], ["zzz"]]
    ids = piece_ids(pieces, vocab, placeholders=2, hidden=set())
    assert ids[1] == ids[5] == [2, 0]  # the same unknown word in question and schema: one placeholder
    assert ids[3] == [3, 0] and ids[1] != ids[3]  # another unknown word: another placeholder
    assert ids[6] == [1, 6] and ids[7] == [1, 0]  # placeholders run out: <unk>
    hidden = piece_ids(pieces, {**vocab, "<w2>": 7}, placeholders=3, hidden={"name"})
    assert hidden[4] == [7, 0] and hidden[6] == [1, 7]  # a hidden known word is a placeholder wherever it occurs
    assert hidden[0] == [4, 0]


def test_schema_names_are_copy_only_and_pieces_reach_the_input(layout):
    task = Spider(SpiderConfig(source="spider", data_dir=str(layout), val_fraction=0.5, min_freq=1, anonymise=0.0))
    dsd = task.build()
    vocab = dsd["vocabulary"]
    target = {t for t, k in zip(vocab["token"], vocab["kind"]) if k == "target"}
    assert {"select", "from", "count", "*", "where", "="} <= target
    assert not target & {"singer", "name", "country", "France", "animal", "kind", "legs"}  # copy-only
    shop = next(row for split in ("train", "validation") for row in dsd[split] if row["db_id"] == "shop")
    tokens, pieces = shop["source_tokens"], shop["source_piece_ids"]
    name_id, plain_id = pieces[tokens.index("singer_id")], pieces[tokens.index("id")]
    assert name_id[1] == plain_id[0] != 0 and name_id[0] not in (0, name_id[1])  # singer_id = (singer, id): 'id' shared
    with_names = Spider(
        SpiderConfig(source="spider", data_dir=str(layout), val_fraction=0.5, min_freq=1, copy_only_schema=False)
    ).build()["vocabulary"]
    assert {t for t, k in zip(with_names["token"], with_names["kind"]) if k == "target"} & {"singer", "animal"}


def test_piece_embedding_is_the_mean_of_pieces_and_matches_plain_ids():
    from harness.train.model import ModelConfig
    from harness.train.seq2seq import Seq2SeqEncoder

    torch.manual_seed(0)
    for positions in ("sinusoidal", "none"):
        cfg = ModelConfig(dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0, pooling="mean", positions=positions)
        enc = Seq2SeqEncoder(cfg, vocab_size=10, max_len=8, mechanism="softmax").eval()
        ids = torch.tensor([[4, 5, 6, 0]])
        mask = ids == 0
        plain, _ = enc(ids, mask)
        one_piece, _ = enc(ids, mask, pieces=torch.stack([ids, torch.zeros_like(ids)], -1))
        assert torch.allclose(
            plain[:, :3], one_piece[:, :3], atol=1e-6
        )  # one piece per token = the backbone path (pads aside)
    captured = []
    hook = enc.drop.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    enc(ids, mask, pieces=torch.tensor([[[4, 0], [5, 6], [6, 0], [0, 0]]]))
    hook.remove()
    emb = enc.embed.weight
    assert torch.allclose(captured[0][0, :3], torch.stack([emb[4], (emb[5] + emb[6]) / 2, emb[6]]))


def test_copy_constraint_by_decoding_state():
    from harness.train.seq2seq import copy_blocked, copy_generate_log_probs

    quote, frm, word = 7, 8, 9
    roles = torch.tensor([[1, 5, 2, 3, 4, 0]])  # column, table, question word, question number, other, padding
    target_in = torch.tensor([[2, frm, word, quote, word, quote]])  # <bos> from x ' v '
    allowed = ~copy_blocked(target_in, roles, quote, (frm,))[0]  # (T, Ls)
    assert allowed[0].tolist() == [True, True, False, True, False, False]  # outside a literal: names, numbers
    assert allowed[1].tolist() == [False, True, False, False, False, False]  # after FROM: a table name only
    assert allowed[3].tolist() == allowed[4].tolist() == [False, False, True, True, False, False]  # inside '...'
    assert allowed[5].tolist() == allowed[0].tolist()  # the literal closed
    blocked = torch.ones(1, 2, 3, dtype=torch.bool)
    blocked[0, 0, 1] = False
    log_p = copy_generate_log_probs(
        torch.zeros(1, 2, 4),
        torch.randn(1, 3, 4),
        blocked,
        torch.randn(1, 2, 5),
        torch.randn(1, 2, 4),
        torch.zeros(1, 2, 1),
    )
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(1, 2)) and not log_p.isnan().any()
    assert (
        torch.isclose(log_p[0, 0, 5 + 1].exp(), torch.tensor(0.5)) and torch.isinf(log_p[0, 0, [5, 7]]).all()
    )  # gate 1/2
    assert torch.isinf(log_p[0, 1, 5:]).all()  # nothing to copy from: all mass on the vocabulary


def test_source_roles_on_known_example(layout):
    from tasks.spider import source_roles

    entry = read_tables(layout / "tables.json")["shop"]
    tokens, links = serialise(["singers", "older", "than", "30"], entry)
    roles = dict(zip(range(len(tokens)), source_roles(tokens, links)))
    assert [roles[i] for i in range(4)] == [2, 2, 2, 3] and roles[4] == 4  # question words, number, <sep>
    at = tokens.index("singer")
    assert roles[at] == 5 and roles[at + 1] == 4  # table name, then ':'
    assert roles[at + 2] == 1 and roles[at + 3] == 4  # column 'id', its type


def test_beam_search_scores_at_least_greedy_and_never_emits_specials(layout):
    from harness.data.task import collate
    from harness.train.build import build_model
    from harness.train.model import ModelConfig
    from harness.train.seq2seq import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    task = Spider(SpiderConfig(source="spider", data_dir=str(layout), val_fraction=0.5, min_freq=1, max_target_len=12))
    dsd = task.build()
    task._vocab = {
        k: [t for t, kk in zip(dsd["vocabulary"]["token"], dsd["vocabulary"]["kind"]) if kk == k]
        for k in ("source", "target")
    }
    torch.manual_seed(0)
    model = build_model(task, ModelConfig(dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0), "softmax").eval()
    ds = dsd["train"]
    batch = collate(
        [
            {
                c: ds[i][c]
                for c in ds.column_names
                if c not in ("source_tokens", "query", "db_id", "question", "hardness")
            }
            for i in range(len(ds))
        ]
    )
    greedy, greedy_score = model.generate(batch, beam_size=1, return_scores=True)
    beam, beam_score = model.generate(batch, beam_size=4, return_scores=True)
    assert (beam_score >= greedy_score - 1e-5).all()  # not a theorem of beam search, but holds on this seeded example
    assert torch.equal(greedy, model.generate(batch))  # beam_size=1 is the default, greedy
    for out in (greedy, beam):
        assert not torch.isin(out, torch.tensor([PAD_ID, UNK_ID, BOS_ID])).any()
        ended = torch.cumsum((out == EOS_ID).long(), 1) > 0
        assert (out[ended] == EOS_ID).all()


# ----------------------------------------------------------------------------- template-lookup baseline


def lookup_dsd(layout: Path, train: list[tuple[str, str, str]], test: list[tuple[str, str, str]]):
    import datasets

    tables = read_tables(layout / "tables.json")

    def split(rows):
        cols = {"question": [], "query": [], "db_id": [], "source_tokens": [], "schema_links": [], "target_ids": []}
        for question, query, db in rows:
            tokens, links = serialise(tokenize_question(question), tables[db])
            for key, value in zip(cols, (question, query, db, tokens, links, [0])):
                cols[key].append(value)
        return datasets.Dataset.from_dict(cols)

    return datasets.DatasetDict({"train": split(train), "validation": split(train[:1]), "test": split(test)})


def test_template_lookup_fills_seen_skeletons_and_misses_unseen_ones(layout):
    from harness.report.baselines import compute_baselines
    from tasks._spider_lookup import lookup_predictions

    train = [
        ("list the kind of animal whose legs is 4 .", "SELECT kind FROM animal WHERE legs = 4", "zoo"),
        ("which animal have legs above 3 ? give their kind", "SELECT kind FROM animal WHERE legs > 3", "zoo"),
        ("how many animal are there ?", "SELECT count(*) FROM animal", "zoo"),
        ("how many animal are there ?", "SELECT count(*) FROM animal", "zoo"),
    ]
    test = [
        ("list the country of singer whose age is 30 .", "SELECT country FROM singer WHERE age = 30", "shop"),
        ("which singer have age above 20 ? give their name", "SELECT name FROM singer WHERE age > 20", "shop"),
        ("how many song are there ?", "SELECT count(*) FROM song", "shop"),
        ("what is the maximum age of singer ?", "SELECT max(age) FROM singer", "shop"),
    ]  # skeleton unseen in train
    dsd = lookup_dsd(layout, train, test)
    preds = lookup_predictions(dsd)
    assert preds[:3] == [
        "SELECT country FROM singer WHERE age = 30",
        "SELECT name FROM singer WHERE age > 20",
        "SELECT count (*) FROM song",
    ], preds
    rows = {b["name"]: b for b in compute_baselines(dsd, "spider")}
    assert rows["template lookup"]["value"] == 0.75 and rows["template lookup"]["metric"] == "accuracy"
    assert rows["template lookup"]["items"]["correct"] == [1, 1, 1, 0]  # per question, for paired tests
    assert rows["majority"]["items"]["correct"] == [0, 0, 0, 0]
    # the most frequent training query, copied as it is: its table is not in the test database
    assert rows["majority"]["value"] == 0.0 and rows["majority"]["choice"] == "SELECT count(*) FROM animal"
