"""Spider's evaluation: exact set match, hardness, execution accuracy, valid-SQL rate.

Exact match and hardness agree item by item with Spider's official ``evaluation.py`` and
``process_sql.py`` (Yu et al. 2018, arXiv:1809.08887; github.com/taoyds/spider, commit
b7b5b8c): 1,034/1,034 on Spider dev's example predictions. The SQL is read by ``sqlglot``
(SQLite dialect) and then held to the official parser's rules:

* A query becomes Spider's ``sql`` dict: ``select (distinct, [(agg, val_unit)])``,
  ``from {table_units, conds}``, ``where``/``having`` conditions ``[cond_unit, 'and'|'or',
  ...]`` with ``cond_unit = (not, op, val_unit, val1, val2)``, ``groupBy [col_unit]``,
  ``orderBy (asc|desc, [val_unit])``, ``limit``, ``intersect``/``union``/``except``
  (``A UNION B EXCEPT C`` nests to the right: A UNION (B EXCEPT C)).
* Qualified columns resolve through ``X AS Y`` aliases collected over the whole query (the
  last one written wins); unqualified ones through the first table of the current FROM
  list that has them. What the official parser cannot read is a parse failure (exact match
  0 for a prediction): an alias without AS, a select-list alias, an alias that is a table
  name, UNION ALL, LEFT/INNER/CROSS JOIN and comma-separated FROM lists, ``<>``, IN with a
  list of values, IS [NOT] NULL, EXISTS, parenthesised conditions, a nested query with its
  clauses out of order. In the outer query, a clause out of the order WHERE, GROUP BY,
  HAVING, ORDER BY, LIMIT ends the query (the rest is ignored), as there.
* Then Spider's rebuild: values (DISABLE_VALUE; a column compared with a column counts as a
  value) become None, except inside FROM subqueries; DISTINCT flags (DISABLE_DISTINCT) go
  and columns of the query's FROM tables are replaced by their foreign-key cluster's
  column (``build_foreign_key_map``) in the outer query and its INTERSECT/UNION/EXCEPT parts
  only: a nested query in a condition is compared as read (DISTINCT and all).
* Exact set match = every partial component (select, select without agg, where, where
  without op, group without having, group, order (+ limit presence), and/or, IUEN,
  keywords) matches as a multiset, plus the FROM tables (``Evaluator.eval_exact_match``);
  join conditions are not compared (``--check-join``: the first one is, a check that was in
  taoyds/spider only briefly).
* Hardness = Spider's ``eval_hardness`` from ``count_component1``, ``count_component2`` and
  ``count_others``, including Spider's quirks (its aggregate count also counts NOT
  conditions in WHERE and the and/or links of HAVING).

Execution accuracy compares whole rows as multisets (ordered lists when the gold query has
ORDER BY), allowing a permutation of the predicted columns, as taoyds/test-suite-sql-eval
does; ``distinct="strip"`` (its default) removes every DISTINCT before running, ``"keep"``
runs the queries as written. Floats are compared rounded to 6 decimals.

Safety: predictions are untrusted. Each database is opened read-only
(``file:...?mode=ro`` URI) with ``PRAGMA query_only=ON``, extension loading off, an
authorizer that allows only reading (no ATTACH, no writes, no PRAGMA, no
``load_extension``), a progress handler that stops a query past its time budget, SQLite's
length limit at 1 MB per value (``randomblob(1e9)`` fails before allocating) and caps on
the rows and bytes of a result.
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
_CMP = {
    exp.EQ: "=",
    exp.GT: ">",
    exp.LT: "<",
    exp.GTE: ">=",
    exp.LTE: "<=",
    exp.NEQ: "!=",
    exp.Like: "like",
    exp.Is: "is",
}
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
        # Spider's build_foreign_key_map: each link joins the first cluster that holds
        # either end (clusters are not merged further), every member maps to the cluster's
        # smallest column index
        clusters: list[set[int]] = []
        for a, b in entry.get("foreign_keys", []):
            cluster = next((c for c in clusters if a in c or b in c), None)
            if cluster is None:
                cluster = set()
                clusters.append(cluster)
            cluster.update((a, b))
        fk_map = {ids[i]: ids[min(c)] for c in clusters for i in c}
        return cls(entry["db_id"], tables, fk_map)


# ----------------------------------------------------------------------------- parsing

_CLAUSE_RANK = {"WHERE": 1, "GROUP_BY": 2, "HAVING": 3, "ORDER_BY": 4, "LIMIT": 5}
_QUERY_START = {"SELECT", "UNION", "INTERSECT", "EXCEPT"}
_SET_OPS = {exp.Union: "union", exp.Intersect: "intersect", exp.Except: "except"}


def parse_sql(sql: str, schema: Schema, *, values: bool = False, raw: bool = False) -> dict[str, Any]:
    """Spider's sql dict of ``sql`` as the official ``evaluation.py`` compares it: read as
    ``process_sql.get_sql`` reads it, then rebuilt (``rebuild_sql_val``: values None unless
    ``values``; ``rebuild_sql_col``: DISTINCT flags None and foreign-key columns merged, in
    the outer query and its INTERSECT/UNION/EXCEPT parts only). ``raw=True``: as read.
    A query the official parser cannot read raises ``SQLParseError`` naming the reason."""
    try:
        text, aliases, as_pairs = _scan(sql, schema)
        tree = sqlglot.parse_one(text, read="sqlite")
        if tree is None:
            raise SQLParseError("empty query")
        read = _Reader(schema, aliases, as_pairs).query(tree)
    except SQLParseError:
        raise
    except sqlglot.errors.SqlglotError as exc:
        raise SQLParseError(f"cannot parse: {(str(exc).splitlines() or [''])[0][:200]}") from None
    except RecursionError:
        raise SQLParseError("cannot parse: nested too deeply") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise SQLParseError(f"cannot parse: {type(exc).__name__}: {str(exc)[:200]}") from None
    if raw:
        return read
    if not values:
        _strip_values(read)
    return _rebuild_columns(read, schema, _valid_tables(read))


def _scan(sql: str, schema: Schema) -> tuple[str, dict[str, str], set[tuple[str, str]]]:
    """Token-level rules of Spider's hand-written parser, before sqlglot reads the query:
    * clauses are read in the order WHERE, GROUP BY, HAVING, ORDER BY, LIMIT; a clause
      out of that order ends the outer query there (the rest is ignored) and makes a
      nested query unreadable;
    * ``<>`` and comma-separated FROM lists are not read;
    * ``X AS Y`` maps alias Y to X for the whole query (``scan_alias``: the last one wins),
      and an alias may not be a table name.
    Returns the (possibly cut) text, the alias map and every (alias, table) written."""
    tokens = sqlglot.tokenize(sql, read="sqlite")
    ranks, in_from = [0], [False]
    aliases: dict[str, str] = {}
    pairs: set[tuple[str, str]] = set()
    cut = None
    for i, tok in enumerate(tokens):
        kind = tok.token_type.name
        if kind == "L_PAREN":
            ranks.append(0)
            in_from.append(False)
        elif kind == "R_PAREN" and len(ranks) > 1:
            ranks.pop()
            in_from.pop()
        elif kind in _QUERY_START:
            ranks[-1], in_from[-1] = 0, False
        elif kind == "FROM":
            in_from[-1] = True
        elif kind == "COMMA" and in_from[-1]:
            raise SQLParseError("comma-separated FROM list (the official parser reads JOIN only)")
        elif kind == "NEQ" and tok.text.strip() == "<>":
            raise SQLParseError("operator <> (the official parser reads !=)")
        elif kind == "ALIAS" and 0 < i < len(tokens) - 1:
            aliases[tokens[i + 1].text.lower()] = tokens[i - 1].text.lower()
            pairs.add((tokens[i + 1].text.lower(), tokens[i - 1].text.lower()))
        elif kind in _CLAUSE_RANK:
            in_from[-1] = False
            if _CLAUSE_RANK[kind] <= ranks[-1]:
                if len(ranks) > 1:
                    raise SQLParseError(f"{tok.text.upper()} out of clause order in a nested query")
                cut = tok.start
                break
            ranks[-1] = _CLAUSE_RANK[kind]
    for alias in aliases:
        if alias in schema.tables:
            raise SQLParseError(f"alias '{alias}' is also a table name")
    return (sql[:cut] if cut is not None else sql), aliases, pairs


def _set_operands(node: exp.Expression) -> list[Any]:
    """``A op1 B op2 C`` in written order: [A, op1, B, op2, C] (sqlglot nests to the left,
    Spider's parser to the right: A op1 (B op2 C))."""
    while isinstance(node, exp.Subquery):
        node = node.this
    if type(node) not in _SET_OPS:
        return [node]
    if not node.args.get("distinct", True):
        raise SQLParseError("UNION ALL (the official parser reads UNION only)")
    return [*_set_operands(node.this), _SET_OPS[type(node)], *_set_operands(node.expression)]


class _Reader:
    """``process_sql``'s reading: qualified columns through the query-wide alias map,
    unqualified ones through the first table of the current FROM list that has them."""

    def __init__(self, schema: Schema, aliases: dict[str, str], as_pairs: set[tuple[str, str]]):
        self.schema, self.aliases, self.as_pairs = schema, aliases, as_pairs
        self.default_tables: list[str] = []

    def query(self, node: exp.Expression) -> dict[str, Any]:
        saved = self.default_tables
        try:
            return self._query(node)
        finally:  # a nested query's tables do not leak into the enclosing query
            self.default_tables = saved

    def _query(self, node: exp.Expression) -> dict[str, Any]:
        while isinstance(node, exp.Subquery):
            node = node.this
        if type(node) not in _SET_OPS:
            if not isinstance(node, exp.Select):
                raise SQLParseError(f"not a SELECT query ({type(node).__name__})")
            return self.select(node)
        parts = _set_operands(node)
        selects = parts[::2]
        if node.args.get("order") is not None or node.args.get("limit") is not None:
            last = selects[-1].copy()  # ORDER BY/LIMIT after a set operation: the last query's
            for key in ("order", "limit"):
                if node.args.get(key) is not None:
                    last.set(key, node.args[key].copy())
            selects[-1] = last
        read = [self.query(s) for s in selects]
        for i in range(len(read) - 2, -1, -1):
            read[i][parts[2 * i + 1]] = read[i + 1]
        return read[0]

    def select(self, node: exp.Select) -> dict[str, Any]:
        table_units: list[tuple[str, Any]] = []
        tables: list[str] = []
        from_ = node.args.get("from_") or node.args.get("from")
        joins = node.args.get("joins") or []
        sources = ([from_.this] if from_ is not None else []) + [j.this for j in joins]
        for join in joins:
            if join.args.get("side") or join.args.get("kind"):
                raise SQLParseError(
                    f"{join.args.get('side') or join.args.get('kind')} JOIN (the official parser reads JOIN only)"
                )
        for n, src in enumerate(sources):
            if isinstance(src, exp.Table):
                name = src.name.lower()
                if name not in self.schema.tables:
                    raise SQLParseError(f"no table '{src.name}' in database '{self.schema.db_id}'")
                if src.alias and (src.alias.lower(), name) not in self.as_pairs:
                    raise SQLParseError(f"table alias '{src.alias}' without AS (the official parser needs AS)")
                tables.append(name)
                table_units.append(("table_unit", f"__{name}__"))
            elif isinstance(src, exp.Subquery) and n == 0 and not src.alias:
                table_units.append(("sql", self.query(src.this)))
            else:
                raise SQLParseError(f"unsupported FROM item {src.sql()[:80]}")
        self.default_tables = tables
        conds: list[Any] = []
        for join in joins:
            on = join.args.get("on")
            if on is not None and not isinstance(on, exp.Boolean):  # JOIN without ON
                if conds:
                    conds.append("and")
                conds.extend(self.condition(on))
        select_units = []
        for item in node.expressions:
            if isinstance(item, exp.Alias):
                raise SQLParseError(f"select-list alias '{item.alias}' (the official parser reads none)")
            agg = _AGG.get(type(item), 0)
            if agg:
                select_units.append((agg, self.val_unit(self._agg_arg(item)[0], distinct=self._agg_arg(item)[1])))
            else:
                unit = self.val_unit(item)
                if unit[0] and (unit[1][0] or unit[2][0]):
                    raise SQLParseError(f"arithmetic on aggregates in SELECT: {item.sql()[:80]}")
                select_units.append((0, unit))
        where, group, having = node.args.get("where"), node.args.get("group"), node.args.get("having")
        order, limit = node.args.get("order"), node.args.get("limit")
        return {
            "select": (bool(node.args.get("distinct")), select_units),
            "from": {"table_units": table_units, "conds": conds},
            "where": self.condition(where.this) if where is not None else [],
            "groupBy": [self.col_unit(e) for e in group.expressions] if group is not None else [],
            "having": self.condition(having.this) if having is not None else [],
            "orderBy": self.order(order) if order is not None else [],
            "limit": self.limit(limit) if limit is not None else None,
            "intersect": None,
            "union": None,
            "except": None,
        }

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
    def _agg_arg(node: exp.Expression) -> tuple[exp.Expression, bool]:
        arg = node.this
        if isinstance(arg, exp.Distinct):
            return arg.expressions[0], True
        return arg, False

    def column(self, node: exp.Expression) -> str:
        if isinstance(node, exp.Star):
            return "__all__"
        if not isinstance(node, exp.Column):
            raise SQLParseError(f"expected a column, got {node.sql()[:80]}")
        if getattr(node.this, "quoted", False):
            raise SQLParseError(f"quoted name {node.sql()[:80]} (read as a string by the official parser)")
        name = "*" if isinstance(node.this, exp.Star) else node.name.lower()
        qualifier = node.table.lower()
        if qualifier:
            table = self.aliases.get(qualifier, qualifier)
            if table not in self.schema.tables:
                raise SQLParseError(f"unknown table or alias '{node.table}'")
            if name not in self.schema.tables[table]:
                raise SQLParseError(f"no column '{name}' in table '{table}'")
        else:
            if name == "*":
                return "__all__"
            table = next((t for t in self.default_tables if name in self.schema.tables[t]), None)
            if table is None:
                raise SQLParseError(f"no column '{node.name}' in tables {self.default_tables}")
        return f"__{table}.{name}__"

    def col_unit(self, node: exp.Expression, distinct: bool = False) -> tuple[int, str, bool]:
        while isinstance(node, exp.Paren):
            node = node.this
        agg = _AGG.get(type(node), 0)
        if agg:
            arg, distinct = self._agg_arg(node)
            return (agg, self.column(arg), distinct)
        if isinstance(node, exp.Distinct):
            node, distinct = node.expressions[0], True
        return (0, self.column(node), distinct)

    def val_unit(self, node: exp.Expression, distinct: bool = False) -> tuple[int, Any, Any]:
        while isinstance(node, exp.Paren):
            node = node.this
        unit = _UNIT.get(type(node), 0)
        if unit:
            return (unit, self.col_unit(node.this, distinct), self.col_unit(node.expression))
        return (0, self.col_unit(node, distinct), None)

    def value(self, node: exp.Expression) -> Any:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, (exp.Subquery, exp.Select, *_SET_OPS)):
            return self.query(node)
        if isinstance(node, exp.Column) and getattr(node.this, "quoted", False):
            return node.name  # "double-quoted" text is a string value to Spider's tokenizer
        if isinstance(node, (exp.Column, exp.Star)) or type(node) in _AGG:
            return self.col_unit(node)  # a column compared with a column (None once values go)
        if type(node) in _UNIT:  # ``= T1.a + T1.b``: Spider's parse_value keeps the first column
            left = node
            while type(left) in _UNIT or isinstance(left, exp.Paren):
                left = left.this
            if isinstance(left, (exp.Column, exp.Star)) or type(left) in _AGG:
                return self.col_unit(left)
        if isinstance(node, exp.Literal):
            return node.this if node.is_string else float(node.this)
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            return -float(node.this.this)
        raise SQLParseError(f"unsupported value {node.sql()[:80]}")

    def condition(self, node: exp.Expression) -> list[Any]:
        if isinstance(node, exp.Paren):
            raise SQLParseError(f"parenthesised condition {node.sql()[:80]} (the official parser reads none)")
        if isinstance(node, (exp.And, exp.Or)):
            return [
                *self.condition(node.this),
                "and" if isinstance(node, exp.And) else "or",
                *self.condition(node.expression),
            ]
        negated = False
        if isinstance(node, exp.Not):
            negated, node = True, node.this
        if isinstance(node, exp.Between):
            return [
                (
                    negated,
                    WHERE_OPS.index("between"),
                    self.val_unit(node.this),
                    self.value(node.args["low"]),
                    self.value(node.args["high"]),
                )
            ]
        if isinstance(node, exp.In):
            query = node.args.get("query")
            if query is None:
                raise SQLParseError(
                    f"IN with a list of values {node.sql()[:80]} (the official parser reads IN (SELECT ...))"
                )
            return [(negated, WHERE_OPS.index("in"), self.val_unit(node.this), self.query(query), None)]
        if isinstance(node, exp.Like) and node.args.get("negate"):
            negated = not negated
        op = _CMP.get(type(node))
        if op is None or op == "is":
            raise SQLParseError(f"unsupported condition {node.sql()[:80]}")
        return [(negated, WHERE_OPS.index(op), self.val_unit(node.this), self.value(node.expression), None)]


def _strip_values(sql: dict | None) -> None:
    """Spider's ``rebuild_sql_val``: every value of a condition that is not a nested query
    becomes None, recursively, except inside FROM subqueries (which Spider leaves alone)."""
    if sql is None:
        return
    for key in ("where", "having"):
        sql[key] = _strip_condition(sql[key])
    sql["from"]["conds"] = _strip_condition(sql["from"]["conds"])
    for key in ("intersect", "except", "union"):
        _strip_values(sql[key])


def _strip_condition(cond: list) -> list:
    out = []
    for i, unit in enumerate(cond):
        if i % 2:
            out.append(unit)
            continue
        vals = []
        for v in unit[3:5]:
            if isinstance(v, dict):
                _strip_values(v)
                vals.append(v)
            else:
                vals.append(None)
        out.append((*unit[:3], *vals))
    return out


def _valid_tables(sql: dict) -> set[str]:
    return {unit[1][2:-2] for unit in sql["from"]["table_units"] if unit[0] == "table_unit"}


def _rebuild_columns(sql: dict | None, schema: Schema, valid: set[str]) -> dict | None:
    """Spider's ``rebuild_sql_col``: in select, join conditions, where, group, order and
    having of this query and its INTERSECT/UNION/EXCEPT parts (with this query's FROM
    tables), a column of a FROM table becomes its foreign-key cluster's column and DISTINCT
    flags become None. Nested queries in conditions and FROM subqueries are left as read."""
    if sql is None:
        return None

    def col(unit):
        if unit is None:
            return None
        agg, column, _ = unit
        if column in schema.fk_map and column[2:].split(".")[0] in valid:
            column = schema.fk_map[column]
        return (agg, column, None)

    def val(unit):
        return None if unit is None else (unit[0], col(unit[1]), col(unit[2]))

    def cond(units):
        return [u if i % 2 else (u[0], u[1], val(u[2]), u[3], u[4]) for i, u in enumerate(units)]

    sql["select"] = (None, [(agg, val(u)) for agg, u in sql["select"][1]])
    sql["from"]["conds"] = cond(sql["from"]["conds"])
    sql["where"], sql["having"] = cond(sql["where"]), cond(sql["having"])
    sql["groupBy"] = [col(u) for u in sql["groupBy"]]
    if sql["orderBy"]:
        sql["orderBy"] = (sql["orderBy"][0], [val(u) for u in sql["orderBy"][1]])
    for key in ("intersect", "except", "union"):
        sql[key] = _rebuild_columns(sql[key], schema, valid)
    return sql


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
    same = (
        pt == lt == 1
        and [u[1] for u in pred["groupBy"]] == [u[1] for u in label["groupBy"]]
        and pred["having"] == label["having"]
    )
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


def exact_match(pred: dict, label: dict) -> bool:
    """Spider's ``eval_exact_match``: every component, then the FROM tables. Join
    conditions are not compared (see ``first_join`` for the non-official check)."""
    if not all(partial_match(pred, label).values()):
        return False
    lt, pt = label["from"]["table_units"], pred["from"]["table_units"]
    if lt:
        return sorted(map(repr, lt)) == sorted(map(repr, pt))
    return True


def first_join(sql: str, schema: Schema) -> list[str]:
    """The two columns of the first join condition of ``sql`` (sorted; [] without one).
    ``--check-join`` also requires these to agree: a check that was in taoyds/spider only
    briefly (26 May 2020, reverted the same day); the official script has none."""
    conds = parse_sql(sql, schema, values=True)["from"]["conds"]
    if not conds:
        return []
    right = conds[0][3]
    return sorted([conds[0][2][1][1], right[1] if isinstance(right, tuple) else repr(right)])


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
    aggs = (
        sum(map(_has_agg, sql["select"][1]))
        + sum(map(_has_agg, sql["where"][::2]))
        + sum(map(_has_agg, sql["groupBy"]))
    )
    if sql["orderBy"]:
        aggs += sum(
            map(_has_agg, [u[1] for u in sql["orderBy"][1] if u[1]] + [u[2] for u in sql["orderBy"][1] if u[2]])
        )
    aggs += sum(map(_has_agg, sql["having"]))
    others = int(aggs > 1) + int(len(sql["select"][1]) > 1) + int(len(sql["where"]) > 1) + int(len(sql["groupBy"]) > 1)
    if comp1 <= 1 and others == 0 and comp2 == 0:
        return "easy"
    if (others <= 2 and comp1 <= 1 and comp2 == 0) or (comp1 <= 2 and others < 2 and comp2 == 0):
        return "medium"
    if (
        (others > 2 and comp1 <= 2 and comp2 == 0)
        or (2 < comp1 <= 3 and others <= 2 and comp2 == 0)
        or (comp1 <= 1 and others == 0 and comp2 <= 1)
    ):
        return "hard"
    return "extra"


# ----------------------------------------------------------------------------- execution (safe)

_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


def _authorizer(action: int, arg1, arg2, db_name, trigger) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2 or arg1 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class ReadOnlyDatabase:
    """A read-only connection to one SQLite file that runs untrusted SELECTs within a
    time budget and a memory budget: no single value longer than ``max_value_bytes``
    (SQLite's length limit: ``randomblob(1e9)`` fails before allocating), at most
    ``max_rows`` rows and ``max_result_bytes`` of result. ``run(sql)`` -> (rows, None) or
    (None, error message)."""

    def __init__(
        self,
        path: str | Path,
        *,
        timeout_s: float = 1.0,
        max_rows: int = 100_000,
        max_value_bytes: int = 1_000_000,
        max_result_bytes: int = 64_000_000,
    ):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"database file {path} not found")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.max_rows, self.max_result_bytes = timeout_s, max_rows, max_result_bytes
        self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self.conn.execute("PRAGMA query_only = ON")
        if hasattr(self.conn, "enable_load_extension"):
            self.conn.enable_load_extension(False)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
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
            size = 0
            for row in cursor:  # row by row: the byte budget holds before a chunk piles up
                rows.append(row)
                size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
                if len(rows) > self.max_rows:
                    return None, f"more than {self.max_rows} rows"
                if size > self.max_result_bytes:
                    return None, f"result larger than {self.max_result_bytes} bytes"
                if time.perf_counter() > self._deadline:
                    return None, f"stopped after the time budget of {self.timeout_s:g}s"
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


def evaluate(
    items: list[tuple[str, str, str]],
    schemas: dict[str, Schema],
    db_dir: str | Path,
    *,
    timeout_s: float = 1.0,
    values: bool = False,
    distinct: str = "strip",
    check_join: bool = False,
) -> dict[str, Any]:
    """Score (gold SQL, predicted SQL, db_id) triples. Returns the CLI's JSON shape:
    ``{"exact": {level|"all": acc}, "execution": {...}, "valid_sql": rate, "items": [...]}``.
    A gold or predicted query that does not parse or execute is that item's error (counted
    in ``gold_errors``), never the end of the run. ``distinct``: ``"strip"`` (the default of
    test-suite-sql-eval: every DISTINCT removed before execution) or ``"keep"``."""
    if distinct not in ("keep", "strip"):
        raise ValueError(f"distinct must be 'keep' or 'strip', got {distinct!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    dbs: dict[str, ReadOnlyDatabase] = {}
    out_items = []
    try:
        for index, (gold, pred, db_id) in enumerate(items):
            if db_id not in schemas:
                raise KeyError(
                    f"item {index}: db_id '{db_id}' is not in tables.json (known: {', '.join(sorted(schemas)[:20])})"
                )
            schema = schemas[db_id]
            try:
                gold_sql = parse_sql(gold, schema, values=values)
            except SQLParseError as exc:  # the item's error, counted; the run goes on
                out_items.append(
                    {
                        "hardness": None,
                        "exact": False,
                        "execution": False,
                        "valid": False,
                        "error": f"gold query does not parse: {exc}",
                        "gold_error": True,
                    }
                )
                continue
            if db_id not in dbs:
                dbs[db_id] = ReadOnlyDatabase(Path(db_dir) / db_id / f"{db_id}.sqlite", timeout_s=timeout_s)
            db = dbs[db_id]
            error = None
            try:
                exact = exact_match(parse_sql(pred, schema, values=values), gold_sql)
                if exact and check_join and len(gold_sql["from"]["table_units"]) > 1:
                    exact = first_join(pred, schema) == first_join(gold, schema)
            except SQLParseError as exc:
                exact, error = False, str(exc)
            gold_rows, gold_error = db.run(strip_distinct(gold) if distinct == "strip" else gold)
            if gold_error:
                out_items.append(
                    {
                        "hardness": hardness(gold_sql),
                        "exact": bool(exact),
                        "execution": False,
                        "valid": False,
                        "error": f"gold query fails: {gold_error}",
                        "gold_error": True,
                    }
                )
                continue
            pred_rows, pred_error = db.run(strip_distinct(pred) if distinct == "strip" else pred)
            error = pred_error or error
            execution = pred_rows is not None and results_equal(gold_rows, pred_rows, ordered=bool(gold_sql["orderBy"]))
            out_items.append(
                {
                    "hardness": hardness(gold_sql),
                    "exact": bool(exact),
                    "execution": bool(execution),
                    "valid": pred_rows is not None,
                    "error": error,
                    "gold_error": False,
                }
            )
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
    lines = [
        "".join(f"{h:>10}" for h in ["", *levels]),
        f"{'count':>10}" + "".join(f"{scores['counts'][lvl]:>10d}" for lvl in levels),
    ]
    for key in ("execution", "exact"):
        lines.append(f"{key:>10}" + "".join(f"{fmt(scores[key][lvl]):>10}" for lvl in levels))
    lines.append(
        f"valid SQL rate: {scores['valid_sql']:.3f}" if scores["valid_sql"] is not None else "valid SQL rate: -"
    )
    return "\n".join(lines)
