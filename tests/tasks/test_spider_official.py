"""The Spider evaluator against Spider's official ``evaluation.py`` (taoyds/spider, commit
b7b5b8c): rule by rule on a small schema (verdicts obtained by running the official
scripts on these pairs), and item by item on real Spider dev (../shared/spider_dev, see its
README; those tests are skipped where that folder is absent)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks._spider_eval import ReadOnlyDatabase, Schema, SQLParseError, evaluate, exact_match, hardness, parse_sql

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "spider_dev"
FIXTURES = Path(__file__).resolve().parent / "spider_fixtures"
needs_data = pytest.mark.skipif(not (DATA / "tables.json").is_file(), reason=f"no real Spider at {DATA}")

# ----------------------------------------------------------------------------- rules (no data needed)

# song.singer_id -> singer.id, concert.song_id -> song.id, song.id -> singer.id: the third link
# joins the first cluster only (Spider's keyset_in_list), so concert.song_id maps to song.id
ENTRY = {
    "db_id": "shop",
    "table_names_original": ["singer", "song", "concert"],
    "column_names_original": [
        [-1, "*"],
        [0, "id"],
        [0, "name"],
        [0, "country"],
        [0, "age"],
        [1, "id"],
        [1, "title"],
        [1, "singer_id"],
        [1, "sales"],
        [2, "id"],
        [2, "singer_id"],
        [2, "song_id"],
        [2, "year"],
    ],
    "foreign_keys": [[7, 1], [11, 5], [5, 1]],
}
FAIL = "fail"  # the official parser cannot read the prediction: exact match 0

# (pred, gold, official exact verdict, official hardness of gold): each verdict was produced
# by running taoyds/spider's evaluation.py (b7b5b8c) on the pair
RULES = [
    (
        "SELECT name FROM singer WHERE age = 30",
        "SELECT name FROM singer WHERE age = id",
        True,
        "easy",
    ),  # column vs column: value
    (
        "SELECT id FROM song AS T1 JOIN concert AS T2 ON T1.id = T2.song_id",
        "SELECT T1.id FROM song AS T1 JOIN concert AS T2 ON T1.id = T2.song_id",
        True,
        "easy",
    ),  # unqualified: first FROM table
    ("SELECT T1.name FROM singer T1", "SELECT T1.name FROM singer AS T1", FAIL, "easy"),  # alias without AS
    ("SELECT count(*) AS n FROM singer", "SELECT count(*) FROM singer", FAIL, "easy"),  # select-list alias
    (
        "SELECT name FROM singer UNION ALL SELECT title FROM song",
        "SELECT name FROM singer UNION SELECT title FROM song",
        FAIL,
        "hard",
    ),
    (
        "SELECT name FROM singer WHERE age > (SELECT avg(age) FROM singer WHERE country = 'x')",
        "SELECT name FROM singer WHERE age > (SELECT avg(age) FROM singer WHERE country = 'y')",
        True,
        "hard",
    ),  # nested values go
    (
        "SELECT name FROM singer WHERE id IN (SELECT DISTINCT singer_id FROM song)",
        "SELECT name FROM singer WHERE id IN (SELECT singer_id FROM song)",
        False,
        "hard",
    ),  # nested DISTINCT stays
    (
        "SELECT name FROM singer WHERE id IN (SELECT T2.id FROM song AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id)",
        "SELECT name FROM singer WHERE id IN "
        "(SELECT T1.singer_id FROM song AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id)",
        False,
        "hard",
    ),  # no foreign-key merging inside a nested query
    (
        "SELECT T2.id FROM song AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id",
        "SELECT T1.singer_id FROM song AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id",
        True,
        "easy",
    ),  # ... but outside
    (
        "SELECT name FROM singer GROUP BY name WHERE age > 3",
        "SELECT name FROM singer GROUP BY name",
        True,
        "easy",
    ),  # clause order
    (
        "SELECT T2.song_id FROM song AS T1 JOIN concert AS T2 ON T1.id = T2.song_id",
        "SELECT T1.singer_id FROM song AS T1 JOIN concert AS T2 ON T1.id = T2.song_id",
        False,
        "easy",
    ),  # fk clusters
    ("SELECT name FROM singer, song", "SELECT name FROM singer JOIN song", FAIL, "easy"),
    (
        "SELECT name FROM singer WHERE (age > 3 OR age < 1)",
        "SELECT name FROM singer WHERE age > 3 OR age < 1",
        FAIL,
        "medium",
    ),
    (
        "SELECT name FROM singer WHERE country IN ('a', 'b')",
        "SELECT name FROM singer WHERE country IN (SELECT country FROM singer)",
        FAIL,
        "hard",
    ),
    ("SELECT name FROM singer WHERE age <> 3", "SELECT name FROM singer WHERE age != 3", FAIL, "easy"),
    (
        "SELECT T1.name FROM singer AS T1 LEFT JOIN song AS T2 ON T1.id = T2.singer_id",
        "SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id",
        FAIL,
        "easy",
    ),
    ("SELECT name FROM singer WHERE country IS NULL", "SELECT name FROM singer WHERE country = 'x'", FAIL, "easy"),
    (
        "SELECT T1.name FROM singer AS T1 WHERE T1.id IN (SELECT T1.singer_id FROM song AS T1)",
        "SELECT T1.name FROM singer AS T1 WHERE T1.id IN (SELECT T2.singer_id FROM song AS T2)",
        FAIL,
        "hard",
    ),  # T1: last AS wins
    (
        "SELECT name FROM singer UNION SELECT name FROM singer EXCEPT SELECT title FROM song",
        "SELECT name FROM singer UNION SELECT name FROM singer EXCEPT SELECT title FROM song",
        True,
        "hard",
    ),  # A UNION (B EXCEPT C)
]


@pytest.mark.parametrize("pred, gold, verdict, level", RULES)
def test_rules_agree_with_official(pred, gold, verdict, level):
    schema = Schema.from_entry(ENTRY)
    g = parse_sql(gold, schema)
    assert hardness(g) == level
    if verdict == FAIL:
        with pytest.raises(SQLParseError, match="."):  # any reason: the official evaluator fails to parse it too
            parse_sql(pred, schema)
    else:
        assert exact_match(parse_sql(pred, schema), g) is verdict


# ----------------------------------------------------------------------------- real Spider dev


@pytest.fixture(scope="module")
def schemas():
    return {e["db_id"]: Schema.from_entry(e) for e in json.loads((DATA / "tables.json").read_text())}


def golds(name: str) -> list[tuple[str, str]]:
    out = []
    for line in (DATA / name).read_text().splitlines():
        if line.strip():
            sql, _, db = line.rpartition("\t")
            out.append((sql.strip(), db.strip()))
    return out


def verdict_golds() -> list[tuple[str, str]]:
    """The golds the official verdicts were computed from: dev_gold.tsv with the 44 lines
    where Spider's evaluation_examples/gold_example.txt differs (spider_fixtures/README.md)."""
    out = golds("dev_gold.tsv")
    for line in (FIXTURES / "gold_example_diff.tsv").read_text().splitlines():
        index, sql, db = line.split("\t")
        out[int(index)] = (sql, db)
    return out


def dev_items():
    preds = (DATA / "example_pred.txt").read_text().split("\n")
    verdicts = [json.loads(v) for v in (DATA / "example_verdicts.jsonl").read_text().splitlines()]
    return [(g, p.strip(), db) for (g, db), p in zip(verdict_golds(), preds)], verdicts


def unparsed(items, schemas):
    bad = []
    for sql, db in items:
        try:
            parse_sql(sql, schemas[db])
        except Exception as exc:  # noqa: BLE001 - any failure is a finding
            bad.append(f"{exc}: {sql}")
    return bad


@needs_data
def test_every_dev_gold_parses(schemas):
    assert unparsed(golds("dev_gold.tsv"), schemas) == []
    assert unparsed(verdict_golds(), schemas) == []


@needs_data
def test_train_golds_parse(schemas):
    bad = unparsed(golds("train_gold.tsv"), schemas)
    # one train gold names a table that tables.json lacks (Ref_Company_Types in assets_maintenance)
    assert len(bad) <= 1 and all("Ref_Company_Types" in b for b in bad), bad[:5]


@needs_data
def test_exact_and_hardness_agree_with_official(schemas):
    items, verdicts = dev_items()
    hard = exact = 0
    for (gold, pred, db), v in zip(items, verdicts):
        g = parse_sql(gold, schemas[db])
        hard += hardness(g) == v["hardness"]
        try:
            same = exact_match(parse_sql(pred, schemas[db]), g)
        except SQLParseError:
            same = False
        exact += int(same) == v["exact"]
    # measured 1.000 / 1.000 (1,034 items)
    assert hard / len(items) >= 0.99 and exact / len(items) >= 0.99, (hard / len(items), exact / len(items))


@needs_data
@pytest.mark.parametrize("distinct", ["keep", "strip"])
def test_execution_agrees_with_test_suite(schemas, distinct):
    items, verdicts = dev_items()
    scores = evaluate(items, schemas, DATA / "database", distinct=distinct)
    agree = sum(int(it["execution"]) == v[f"exec_{distinct}_distinct"] for it, v in zip(scores["items"], verdicts))
    assert scores["gold_errors"] == 0
    assert agree / len(items) >= 0.99, agree / len(items)  # measured 1.000 for both settings


@needs_data
def test_pathological_predictions_are_item_errors(schemas):
    ((gold, _, db),) = dev_items()[0][:1]
    preds = ["(" * 50 + "SELECT 1" + ")" * 50, "SELECT 'unclosed", "\x00\x01\xff binary", "SELECT a FROM", ""]
    scores = evaluate([(gold, p, db) for p in preds], schemas, DATA / "database")
    assert all(not it["exact"] for it in scores["items"])
    assert all(it["error"] for it in scores["items"][1:]), scores["items"]


# ----------------------------------------------------------------------------- CLI and budgets


def test_huge_values_stop_within_time_and_memory(tmp_path):
    import sqlite3

    path = tmp_path / "t.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    conn.commit()
    conn.close()
    db = ReadOnlyDatabase(path, timeout_s=0.5)
    for sql in [
        "SELECT randomblob(400000000)",
        "SELECT zeroblob(300000000) || zeroblob(300000000)",
        "SELECT randomblob(900000) FROM t AS a JOIN t AS b",
    ]:
        start = time.perf_counter()
        rows, error = db.run(sql)
        assert rows is None and error, sql
        assert time.perf_counter() - start < 1.0, sql
    assert db.run("SELECT count(*) FROM t")[0] == [(50,)]
    with pytest.raises(ValueError, match="timeout_s"):
        ReadOnlyDatabase(path, timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        evaluate([], {}, tmp_path, timeout_s=0)


def run_cli(tmp_path, pred_bytes: bytes, *extra: str) -> subprocess.CompletedProcess:
    import sqlite3

    (tmp_path / "db" / "zoo").mkdir(parents=True)
    conn = sqlite3.connect(tmp_path / "db" / "zoo" / "zoo.sqlite")
    conn.execute("CREATE TABLE animal (id, kind)")
    conn.execute("INSERT INTO animal VALUES (1, 'cat')")
    conn.commit()
    conn.close()
    entry = {
        "db_id": "zoo",
        "table_names_original": ["animal"],
        "column_names_original": [[-1, "*"], [0, "id"], [0, "kind"]],
        "column_names": [[-1, "*"], [0, "id"], [0, "kind"]],
        "table_names": ["animal"],
        "column_types": ["text"] * 3,
        "primary_keys": [],
        "foreign_keys": [],
    }
    (tmp_path / "tables.json").write_text(json.dumps([entry]))
    (tmp_path / "gold.tsv").write_text("SELECT kind FROM animal\tzoo\nSELECT count(*) FROM animal\tzoo\n")
    (tmp_path / "pred.txt").write_bytes(pred_bytes)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "tool",
            "spider-evaluate",
            f"gold={tmp_path / 'gold.tsv'}",
            f"pred={tmp_path / 'pred.txt'}",
            f"tables={tmp_path / 'tables.json'}",
            f"db_dir={tmp_path / 'db'}",
            "json=true",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_reads_binary_predictions_line_by_line(tmp_path):
    # \x0b, \x1c and \x85 are line breaks to str.splitlines, not to Spider's script
    out = run_cli(tmp_path, b"SELECT kind \x0bFROM\x1c animal\x85\nSELECT count(*) FROM animal\n")
    assert out.returncode == 0, out.stderr
    assert [it["execution"] for it in json.loads(out.stdout)["items"]] == [False, True]


def test_cli_rejects_zero_timeout(tmp_path):
    out = run_cli(tmp_path, b"SELECT kind FROM animal\nSELECT count(*) FROM animal\n", "timeout=0")
    assert out.returncode == 2 and "timeout must be a positive number of seconds" in out.stderr


def test_check_join_is_an_option_off_by_default(tmp_path):
    import sqlite3

    (tmp_path / "shop").mkdir()
    conn = sqlite3.connect(tmp_path / "shop" / "shop.sqlite")
    tables: dict[str, list[str]] = {}
    for ti, col in ENTRY["column_names_original"][1:]:
        tables.setdefault(ENTRY["table_names_original"][ti], []).append(col)
    for table, cols in tables.items():
        conn.execute(f"CREATE TABLE {table} ({', '.join(cols)})")
    conn.commit()
    conn.close()
    gold = "SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id"
    pred = "SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.age = T2.sales"  # same tables, other join columns
    items = [(gold, pred, "shop")]
    schemas = {"shop": Schema.from_entry(ENTRY)}
    assert evaluate(items, schemas, tmp_path)["items"][0]["exact"]  # the official script does not compare joins
    assert not evaluate(items, schemas, tmp_path, check_join=True)["items"][0]["exact"]
