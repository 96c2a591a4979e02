"""Spider's evaluation: exact set match, hardness, execution accuracy, valid-SQL rate.

Faithful to Spider's official ``evaluation.py`` (Yu et al. 2018, arXiv:1809.08887;
github.com/taoyds/spider, ``evaluation.py`` and ``process_sql.py``), with the SQL read by
a real parser (``sqlglot``, SQLite dialect) instead of Spider's hand-written tokenizer:

* A query becomes Spider's ``sql`` dict: ``select (distinct, [(agg, val_unit)])``,
  ``from {table_units, conds}``, ``where``/``having`` conditions ``[cond_unit, 'and'|'or',
  ...]`` with ``cond_unit = (not, op, val_unit, val1, val2)``, ``groupBy [col_unit]``,
  ``orderBy (asc|desc, [val_unit])``, ``limit``, ``intersect``/``union``/``except``;
  ``val_unit = (unit_op, col_unit, col_unit)``, ``col_unit = (agg, column, distinct)``.
  Columns are resolved through table aliases to ``__table.column__`` and, as Spider's
  ``build_foreign_key_map`` does, columns linked by foreign keys share one id.
* Values are ignored (``DISABLE_VALUE``) and DISTINCT is ignored (``DISABLE_DISTINCT``),
  Spider's defaults; ``values=True`` compares values too.
* Exact set match = every partial component (select, select without agg, where, where
  without op, group without having, group, order (+ limit presence), and/or, IUEN,
  keywords) matches as a multiset, plus the FROM tables and the first join condition
  (``Evaluator.eval_exact_match``).
* Hardness = Spider's ``eval_hardness`` from ``count_component1`` (where, group, order,
  limit, joins, OR, LIKE), ``count_component2`` (nested queries, IUEN) and
  ``count_others``, including Spider's quirks (its aggregate count also counts NOT
  conditions in WHERE and the and/or links of HAVING), so levels agree with published ones.

Deviations from Spider's script, named:
* A join condition keeps its right-hand column when values are ignored (Spider sets it to
  None and then sorts ``[col_unit, None]``, which fails on Python 3).
* ``A UNION B ORDER BY x``: sqlglot attaches ORDER BY/LIMIT to the set operation; they are
  given to the right-hand query, where Spider's parser puts them.
* Execution accuracy compares whole rows as multisets (ordered lists when the gold query
  has ORDER BY), allowing a permutation of the predicted columns (as the test-suite
  evaluation of Zhong et al. 2020 does); floats are compared rounded to 6 decimals.
  Spider's original ``eval_exec_match`` compared per-column value sets.

Safety: predictions are untrusted. Each database is opened read-only
(``file:...?mode=ro`` URI) with ``PRAGMA query_only=ON``, extension loading off, an
authorizer that allows only reading (no ATTACH, no writes, no PRAGMA, no
``load_extension``), and a progress handler that stops a query past its time budget.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

HARDNESS = ("easy", "medium", "hard", "extra")
AGG_OPS = ("none", "max", "min", "count", "sum", "avg")
WHERE_OPS = ("not", "between", "=", ">", "<", ">=", "<=", "!=", "in", "like", "is", "exists")
UNIT_OPS = ("none", "-", "+", "*", "/")
_AGG = {exp.Max: 1, exp.Min: 2, exp.Count: 3, exp.Sum: 4, exp.Avg: 5}
_CMP = {exp.EQ: "=", exp.GT: ">", exp.LT: "<", exp.GTE: ">=", exp.LTE: "<=", exp.NEQ: "!=", exp.Like: "like",
        exp.Is: "is"}
_UNIT = {exp.Sub: 1, exp.Add: 2, exp.Mul: 3, exp.Div: 4}


class SQLParseError(ValueError):
    """A query that is not valid SQL for its schema (Spider's parser would fail too)."""


# ----------------------------------------------------------------------------- schema


@dataclass
class Schema:
    """One database of ``tables.json``: lower-cased table -> columns, and the foreign-key
    map (column id -> canonical id shared by every column of one foreign-key cluster)."""

    db_id: str
    tables: dict[str, list[str]]
    fk_map: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> Schema:
        names = [t.lower() for t in entry["table_names_original"]]
        tables: dict[str, list[str]] = {t: [] for t in names}
        ids: list[str] = []
        for table_index, column in entry["column_names_original"]:
            if table_index < 0:
                ids.append("__all__")
                continue
            tables[names[table_index]].append(column.lower())
            ids.append(f"__{names[table_index]}.{column.lower()}__")
        # Spider's build_foreign_key_map: union the linked columns, map each to the smallest.
        parent = list(range(len(ids)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b in entry.get("foreign_keys", []):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
        fk_map = {ids[i]: ids[find(i)] for i in range(len(ids)) if find(i) != i}
        return cls(entry["db_id"], tables, fk_map)


# ----------------------------------------------------------------------------- parsing


def parse_sql(sql: str, schema: Schema, *, values: bool = False) -> dict[str, Any]:
    """Spider's sql dict of ``sql`` (columns canonical, values None unless ``values``)."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
        if tree is None:
            raise SQLParseError("empty query")
        return _Reader(schema, values).query(tree)
    except SQLParseError:
        raise
    except sqlglot.errors.SqlglotError as exc:
        raise SQLParseError(f"cannot parse: {(str(exc).splitlines() or [''])[0][:200]}") from None
    except RecursionError:
        raise SQLParseError("cannot parse: nested too deeply") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise SQLParseError(f"cannot parse: {type(exc).__name__}: {str(exc)[:200]}") from None


class _Reader:
    def __init__(self, schema: Schema, values: bool):
        self.schema, self.values = schema, values

    def query(self, node: exp.Expression) -> dict[str, Any]:
        saved = (getattr(self, "scope", {}), getattr(self, "select_aliases", {}), getattr(self, "outer", {}))
        self.outer = {**saved[2], **saved[0]}  # aliases of enclosing queries (correlated references)
        try:
            return self._query(node)
        finally:  # a nested query's tables do not leak into the enclosing query
            self.scope, self.select_aliases, self.outer = saved

    def _query(self, node: exp.Expression) -> dict[str, Any]:
        while isinstance(node, exp.Subquery):
            node = node.this
        if isinstance(node, (exp.Union, exp.Intersect, exp.Except)):
            left = self.query(node.this)
            right_node = node.expression
            if node.args.get("order") is not None or node.args.get("limit") is not None:
                right_node = right_node.copy()
                for key in ("order", "limit"):
                    if node.args.get(key) is not None:
                        right_node.set(key, node.args[key].copy())
            key = {exp.Union: "union", exp.Intersect: "intersect", exp.Except: "except"}[type(node)]
            left[key] = self.query(right_node)
            return left
        if not isinstance(node, exp.Select):
            raise SQLParseError(f"not a SELECT query ({type(node).__name__})")
        return self.select(node)

    def select(self, node: exp.Select) -> dict[str, Any]:
        aliases: dict[str, str] = {}  # alias -> table (lower)
        table_units: list[tuple[str, Any]] = []
        from_ = node.args.get("from_") or node.args.get("from")
        sources = ([from_.this] if from_ is not None else []) + [j.this for j in node.args.get("joins") or []]
        for src in sources:
            if isinstance(src, exp.Table):
                name = src.name.lower()
                if name not in self.schema.tables:
                    raise SQLParseError(f"no table '{src.name}' in database '{self.schema.db_id}'")
                aliases[name] = name
                if src.alias:
                    aliases[src.alias.lower()] = name
                table_units.append(("table_unit", f"__{name}__"))
            elif isinstance(src, exp.Subquery):
                table_units.append(("sql", self.query(src.this)))
            else:
                raise SQLParseError(f"unsupported FROM item {type(src).__name__}")
        self.scope = aliases  # columns resolve against this query's tables
        self.select_aliases = {}
        select_units = []
        for item in node.expressions:
            target = item.this if isinstance(item, exp.Alias) else item
            if isinstance(item, exp.Alias):
                self.select_aliases[item.alias.lower()] = target
            agg = _AGG.get(type(target), 0)
            if agg:
                select_units.append((agg, self.val_unit(self._agg_arg(target))))
            else:
                select_units.append((0, self.val_unit(target)))
        conds: list[Any] = []
        for join in node.args.get("joins") or []:
            on = join.args.get("on")
            if on is not None and not isinstance(on, exp.Boolean):  # JOIN without ON
                if conds:
                    conds.append("and")
                conds.extend(self.condition(on))
        where = node.args.get("where")
        group = node.args.get("group")
        having = node.args.get("having")
        order = node.args.get("order")
        limit = node.args.get("limit")
        sql = {
            "select": (False, select_units),
            "from": {"table_units": table_units, "conds": conds},
            "where": self.condition(where.this) if where is not None else [],
            "groupBy": [self.col_unit(e) for e in group.expressions] if group is not None else [],
            "having": self.condition(having.this) if having is not None else [],
            "orderBy": self.order(order) if order is not None else [],
            "limit": self.limit(limit) if limit is not None else None,
            "intersect": None, "union": None, "except": None,
        }
        return sql

    # -- pieces -------------------------------------------------------------------------
    def limit(self, node: exp.Limit) -> int:
        value = node.expression if node.expression is not None else node.this
        try:
            return int(value.name)
        except (AttributeError, ValueError):
            raise SQLParseError(f"LIMIT must be an integer, got {value.sql() if value is not None else None}") from None

    def order(self, node: exp.Order) -> tuple[str, list]:
        # ``ORDER BY count(*) >= 5``: Spider's parser reads the key and drops the comparison
        units = [self.val_unit(o.this.this if type(o.this) in _CMP else o.this) for o in node.expressions]
        direction = "asc"  # Spider's parse_order_by keeps the last ASC/DESC written
        for o in node.expressions:
            if o.args.get("desc") is not None:
                direction = "desc" if o.args["desc"] else "asc"
        return (direction, units)

    @staticmethod
    def _agg_arg(node: exp.Expression) -> exp.Expression:
        arg = node.this
        if isinstance(arg, exp.Distinct):  # DISTINCT ignored (Spider's DISABLE_DISTINCT)
            arg = arg.expressions[0]
        return arg

    def column(self, node: exp.Expression) -> str:
        if isinstance(node, exp.Star):
            return "__all__"
        if not isinstance(node, exp.Column):
            raise SQLParseError(f"expected a column, got {node.sql()[:80]}")
        if isinstance(node.this, exp.Star):
            return "__all__"
        name, qualifier = node.name.lower(), node.table.lower()
        if qualifier:
            table = self.scope.get(qualifier) or getattr(self, "outer", {}).get(qualifier)
            if table is None:
                raise SQLParseError(f"unknown table or alias '{node.table}'")
            if name not in self.schema.tables[table]:
                raise SQLParseError(f"no column '{node.name}' in table '{table}'")
        else:
            owners = sorted({t for t in self.scope.values() if name in self.schema.tables[t]})
            if not owners:
                if name in self.select_aliases:  # ORDER BY an alias of the select list
                    raise _AliasRef(self.select_aliases[name])
                raise SQLParseError(f"no column '{node.name}' in tables {sorted(set(self.scope.values()))}")
            table = owners[0]
        column = f"__{table}.{name}__"
        return self.schema.fk_map.get(column, column)

    def col_unit(self, node: exp.Expression) -> tuple[int, str, bool]:
        while isinstance(node, exp.Paren):
            node = node.this
        agg = _AGG.get(type(node), 0)
        if agg:
            return (agg, self.column(self._agg_arg(node)), False)
        if isinstance(node, exp.Distinct):
            node = node.expressions[0]
        return (0, self.column(node), False)

    def val_unit(self, node: exp.Expression) -> tuple[int, Any, Any]:
        while isinstance(node, exp.Paren):
            node = node.this
        try:
            unit = _UNIT.get(type(node), 0)
            if unit:
                return (unit, self.col_unit(node.this), self.col_unit(node.expression))
            return (0, self.col_unit(node), None)
        except _AliasRef as ref:
            return self.val_unit(ref.target) if ref.target is not node else (0, None, None)

    def value(self, node: exp.Expression) -> Any:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, (exp.Subquery, exp.Select, exp.Union, exp.Intersect, exp.Except)):
            return self.query(node)
        if isinstance(node, exp.Column) and not node.table and self._is_bare_value(node):
            return node.name if self.values else None  # "double-quoted" strings
        if isinstance(node, (exp.Column, exp.Star)):
            return self.col_unit(node)  # a column compared with a column (joins)
        if not self.values:
            return None
        if isinstance(node, exp.Literal):
            return node.this if node.is_string else float(node.this)
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
            return -float(node.this.this)
        return node.sql()

    def _is_bare_value(self, node: exp.Column) -> bool:
        ident = node.this
        return bool(getattr(ident, "quoted", False)) and not any(
            node.name.lower() in self.schema.tables[t] for t in self.scope.values())

    def condition(self, node: exp.Expression) -> list[Any]:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, (exp.And, exp.Or)):
            return [*self.condition(node.this), "and" if isinstance(node, exp.And) else "or", *self.condition(node.expression)]
        negated = False
        if isinstance(node, exp.Not):
            negated, node = True, node.this
            while isinstance(node, exp.Paren):
                node = node.this
        if isinstance(node, exp.Between):
            return [(negated, WHERE_OPS.index("between"), self.val_unit(node.this), self.value(node.args["low"]),
                     self.value(node.args["high"]))]
        if isinstance(node, exp.In):
            query = node.args.get("query")
            if query is not None:
                val = self.query(query)
            else:
                val = [self.value(e) for e in node.expressions] if self.values else None
                val = tuple(val) if isinstance(val, list) else val
            return [(negated, WHERE_OPS.index("in"), self.val_unit(node.this), val, None)]
        if isinstance(node, exp.Exists):
            return [(negated, WHERE_OPS.index("exists"), (0, None, None), self.query(node.this), None)]
        if isinstance(node, exp.Like) and node.args.get("negate"):
            negated = not negated
        op = _CMP.get(type(node))
        if op is None:
            raise SQLParseError(f"unsupported condition {node.sql()[:80]}")
        return [(negated, WHERE_OPS.index(op), self.val_unit(node.this), self.value(node.expression), None)]


class _AliasRef(Exception):
    def __init__(self, target: exp.Expression):
        self.target = target


# ----------------------------------------------------------------------------- exact match (Spider)


def _scores(count: int, pred_total: int, label_total: int) -> int:
    return int(pred_total == label_total and count == pred_total)


def _match_units(pred: list, label: list, key=lambda u: u) -> tuple[int, int]:
    label, label_key = list(label), [key(u) for u in label]
    cnt = cnt_key = 0
    for unit in pred:
        if unit in label:
            cnt += 1
            label.remove(unit)
        if key(unit) in label_key:
            cnt_key += 1
            label_key.remove(key(unit))
    return cnt, cnt_key


def partial_match(pred: dict, label: dict) -> dict[str, int]:
    """Spider's ``eval_partial_match``: component -> 1 when it matches exactly, else 0."""
    res: dict[str, int] = {}
    ps, ls = pred["select"][1], label["select"][1]
    cnt, cnt_wo = _match_units(ps, ls, key=lambda u: u[1])
    res["select"], res["select(no AGG)"] = _scores(cnt, len(ps), len(ls)), _scores(cnt_wo, len(ps), len(ls))
    pw, lw = pred["where"][::2], label["where"][::2]
    cnt, cnt_wo = _match_units(pw, lw, key=lambda u: u[2])
    res["where"], res["where(no OP)"] = _scores(cnt, len(pw), len(lw)), _scores(cnt_wo, len(pw), len(lw))
    pg = [u[1].split(".")[-1] for u in pred["groupBy"]]
    lg = [u[1].split(".")[-1] for u in label["groupBy"]]
    cnt, _ = _match_units(pg, lg)
    res["group(no Having)"] = _scores(cnt, len(pg), len(lg))
    pt, lt = int(bool(pred["groupBy"])), int(bool(label["groupBy"]))
    same = pt == lt == 1 and [u[1] for u in pred["groupBy"]] == [u[1] for u in label["groupBy"]] and pred["having"] == label["having"]
    res["group"] = _scores(int(same), pt, lt)
    pt, lt = int(bool(pred["orderBy"])), int(bool(label["orderBy"]))
    same = lt == 1 and pred["orderBy"] == label["orderBy"] and (pred["limit"] is None) == (label["limit"] is None)
    res["order"] = _scores(int(same), pt, lt)
    pa, la = set(pred["where"][1::2]), set(label["where"][1::2])
    res["and/or"] = 1 if pa == la else 0
    lt = pt = cnt = 0
    for key in ("intersect", "except", "union"):
        p, g = pred[key], label[key]
        pt, lt = pt + (p is not None), lt + (g is not None)
        if p is not None and g is not None:
            cnt += int(exact_match(p, g))
    res["IUEN"] = _scores(cnt, pt, lt)
    pk, lk = keywords(pred), keywords(label)
    res["keywords"] = _scores(len(pk & lk), len(pk), len(lk))
    return res


def keywords(sql: dict) -> set[str]:
    res = set()
    if sql["where"]:
        res.add("where")
    if sql["groupBy"]:
        res.add("group")
    if sql["having"]:
        res.add("having")
    if sql["orderBy"]:
        res.update((sql["orderBy"][0], "order"))
    if sql["limit"] is not None:
        res.add("limit")
    res.update(k for k in ("except", "union", "intersect") if sql[k] is not None)
    links = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]
    if "or" in links:
        res.add("or")
    units = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    if any(u[0] for u in units):
        res.add("not")
    if any(u[1] == WHERE_OPS.index("in") for u in units):
        res.add("in")
    if any(u[1] == WHERE_OPS.index("like") for u in units):
        res.add("like")
    return res


def exact_match(pred: dict, label: dict, *, check_join: bool = False) -> bool:
    """Spider's ``eval_exact_match``: every component, then the FROM tables. The official
    script does not compare join conditions; ``check_join=True`` also compares the first
    one (a check that was in taoyds/spider only briefly, 26 May 2020, reverted the same day)."""
    if not all(partial_match(pred, label).values()):
        return False
    lt, pt = label["from"]["table_units"], pred["from"]["table_units"]
    if lt:
        if sorted(map(repr, lt)) != sorted(map(repr, pt)):
            return False
        if check_join and len(lt) > 1:
            lc = label["from"]["conds"]
            pc = pred["from"]["conds"]
            label_cond = sorted(map(repr, [lc[0][2][1], lc[0][3]])) if lc else []
            pred_cond = sorted(map(repr, [pc[0][2][1], pc[0][3]])) if pc else []
            return label_cond == pred_cond
    return True


# ----------------------------------------------------------------------------- hardness (Spider)


def _has_agg(unit: Any) -> bool:
    return unit[0] != 0  # Spider's has_agg: first field non-zero (quirks included)


def _nested(sql: dict) -> list[dict]:
    out = []
    for unit in sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]:
        out.extend(v for v in (unit[3], unit[4]) if isinstance(v, dict))
    out.extend(sql[k] for k in ("intersect", "except", "union") if sql[k] is not None)
    return out


def hardness(sql: dict) -> str:
    """Spider's ``eval_hardness``: easy, medium, hard or extra."""
    comp1 = sum(bool(sql[k]) for k in ("where", "groupBy", "orderBy")) + (sql["limit"] is not None)
    comp1 += max(0, len(sql["from"]["table_units"]) - 1)
    links = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]
    comp1 += links.count("or")
    units = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    comp1 += sum(u[1] == WHERE_OPS.index("like") for u in units)
    comp2 = len(_nested(sql))
    aggs = sum(map(_has_agg, sql["select"][1])) + sum(map(_has_agg, sql["where"][::2])) + sum(map(_has_agg, sql["groupBy"]))
    if sql["orderBy"]:
        aggs += sum(map(_has_agg, [u[1] for u in sql["orderBy"][1] if u[1]] + [u[2] for u in sql["orderBy"][1] if u[2]]))
    aggs += sum(map(_has_agg, sql["having"]))
    others = int(aggs > 1) + int(len(sql["select"][1]) > 1) + int(len(sql["where"]) > 1) + int(len(sql["groupBy"]) > 1)
    if comp1 <= 1 and others == 0 and comp2 == 0:
        return "easy"
    if (others <= 2 and comp1 <= 1 and comp2 == 0) or (comp1 <= 2 and others < 2 and comp2 == 0):
        return "medium"
    if ((others > 2 and comp1 <= 2 and comp2 == 0) or (2 < comp1 <= 3 and others <= 2 and comp2 == 0)
            or (comp1 <= 1 and others == 0 and comp2 <= 1)):
        return "hard"
    return "extra"


# ----------------------------------------------------------------------------- execution (safe)

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


def _authorizer(action: int, arg1, arg2, db_name, trigger) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2 or arg1 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class ReadOnlyDatabase:
    """A read-only connection to one SQLite file that runs untrusted SELECTs within a
    time budget. ``run(sql)`` -> (rows, None) or (None, error message)."""

    def __init__(self, path: str | Path, *, timeout_s: float = 1.0, max_rows: int = 100_000):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"database file {path} not found")
        self.timeout_s, self.max_rows = timeout_s, max_rows
        self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self.conn.execute("PRAGMA query_only = ON")
        if hasattr(self.conn, "enable_load_extension"):
            self.conn.enable_load_extension(False)
        self.conn.set_authorizer(_authorizer)
        self.conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
        self._deadline = math.inf
        self.conn.set_progress_handler(self._progress, 1000)

    def _progress(self) -> int:
        return int(time.perf_counter() > self._deadline)

    def run(self, sql: str) -> tuple[list[tuple] | None, str | None]:
        self._deadline = time.perf_counter() + self.timeout_s
        try:
            cursor = self.conn.execute(sql)
            rows: list[tuple] = []
            while True:
                chunk = cursor.fetchmany(1000)
                if not chunk:
                    break
                rows.extend(chunk)
                if len(rows) > self.max_rows:
                    return None, f"more than {self.max_rows} rows"
            return rows, None
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                return None, f"stopped after the time budget of {self.timeout_s:g}s"
            return None, f"{type(exc).__name__}: {exc}"
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            self._deadline = math.inf
            if self.conn.in_transaction:
                self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


def _norm(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) + 0.0
    return value


def results_equal(gold: list[tuple], pred: list[tuple], *, ordered: bool) -> bool:
    """Rows as multisets (lists when ``ordered``), up to a permutation of pred's columns."""
    if len(gold) != len(pred):
        return False
    if not gold:
        return True
    gold = [tuple(map(_norm, r)) for r in gold]
    pred = [tuple(map(_norm, r)) for r in pred]
    width = len(gold[0])
    if any(len(r) != width for r in pred):
        return False
    gold_cols = [Counter(r[i] for r in gold) for i in range(width)]
    pred_cols = [Counter(r[i] for r in pred) for i in range(width)]
    candidates = [[j for j in range(width) if pred_cols[j] == gold_cols[i]] for i in range(width)]
    if any(not c for c in candidates):
        return False
    for perm in itertools.islice(itertools.product(*candidates), 1000):
        if len(set(perm)) != width:
            continue
        permuted = [tuple(r[j] for j in perm) for r in pred]
        if (permuted == gold) if ordered else (Counter(permuted) == Counter(gold)):
            return True
    return False


# ----------------------------------------------------------------------------- scoring


def evaluate(items: list[tuple[str, str, str]], schemas: dict[str, Schema], db_dir: str | Path, *,
             timeout_s: float = 1.0, values: bool = False, distinct: str = "strip",
             check_join: bool = False) -> dict[str, Any]:
    """Score (gold SQL, predicted SQL, db_id) triples. Returns the CLI's JSON shape:
    ``{"exact": {level|"all": acc}, "execution": {...}, "valid_sql": rate, "items": [...]}``.
    A gold or predicted query that does not parse or execute is that item's error (counted
    in ``gold_errors``), never the end of the run. ``distinct``: ``"strip"`` (the default of
    test-suite-sql-eval: every DISTINCT removed before execution) or ``"keep"``."""
    if distinct not in ("keep", "strip"):
        raise ValueError(f"distinct must be 'keep' or 'strip', got {distinct!r}")
    dbs: dict[str, ReadOnlyDatabase] = {}
    out_items = []
    try:
        for index, (gold, pred, db_id) in enumerate(items):
            if db_id not in schemas:
                raise KeyError(f"item {index}: db_id '{db_id}' is not in tables.json (known: {', '.join(sorted(schemas)[:20])})")
            schema = schemas[db_id]
            try:
                gold_sql = parse_sql(gold, schema, values=values)
            except SQLParseError as exc:  # the item's error, counted; the run goes on
                out_items.append({"hardness": None, "exact": False, "execution": False, "valid": False,
                                  "error": f"gold query does not parse: {exc}", "gold_error": True})
                continue
            if db_id not in dbs:
                dbs[db_id] = ReadOnlyDatabase(Path(db_dir) / db_id / f"{db_id}.sqlite", timeout_s=timeout_s)
            db = dbs[db_id]
            error = None
            try:
                exact = exact_match(parse_sql(pred, schema, values=values), gold_sql, check_join=check_join)
            except SQLParseError as exc:
                exact, error = False, str(exc)
            gold_rows, gold_error = db.run(strip_distinct(gold) if distinct == "strip" else gold)
            if gold_error:
                out_items.append({"hardness": hardness(gold_sql), "exact": bool(exact), "execution": False,
                                  "valid": False, "error": f"gold query fails: {gold_error}", "gold_error": True})
                continue
            pred_rows, pred_error = db.run(strip_distinct(pred) if distinct == "strip" else pred)
            error = pred_error or error
            execution = pred_rows is not None and results_equal(gold_rows, pred_rows, ordered=bool(gold_sql["orderBy"]))
            out_items.append({"hardness": hardness(gold_sql), "exact": bool(exact), "execution": bool(execution),
                              "valid": pred_rows is not None, "error": error, "gold_error": False})
    finally:
        for db in dbs.values():
            db.close()
    return summarise(out_items)


def strip_distinct(sql: str) -> str:
    """``sql`` with every DISTINCT keyword removed, as test-suite-sql-eval does by default
    (tokens outside quotes only)."""
    import re

    parts = re.split(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""", sql)
    return "".join(p if i % 2 else re.sub(r"(?i)\bdistinct\b", " ", p) for i, p in enumerate(parts))


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(key: str, level: str | None) -> float | None:
        chosen = [it[key] for it in items if level is None or it["hardness"] == level]
        return sum(chosen) / len(chosen) if chosen else None

    out: dict[str, Any] = {}
    for key in ("exact", "execution"):
        out[key] = {level: rate(key, level) for level in HARDNESS}
        out[key]["all"] = rate(key, None)
    out["valid_sql"] = rate("valid", None)
    out["counts"] = {level: sum(it["hardness"] == level for it in items) for level in HARDNESS} | {"all": len(items)}
    out["gold_errors"] = sum(bool(it.get("gold_error")) for it in items)
    out["items"] = [{k: it[k] for k in ("hardness", "exact", "execution", "error")} for it in items]
    return out


def format_table(scores: dict[str, Any]) -> str:
    """The scores by hardness as Spider's script prints them."""
    levels = [*HARDNESS, "all"]
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    lines = ["".join(f"{h:>10}" for h in ["", *levels]),
             f"{'count':>10}" + "".join(f"{scores['counts'][lvl]:>10d}" for lvl in levels)]
    for key in ("execution", "exact"):
        lines.append(f"{key:>10}" + "".join(f"{fmt(scores[key][lvl]):>10}" for lvl in levels))
    lines.append(f"valid SQL rate: {scores['valid_sql']:.3f}" if scores["valid_sql"] is not None else "valid SQL rate: -")
    return "\n".join(lines)
