"""The template-lookup shortcut for Spider: a learning-free baseline that shows how much of
a split can be solved by recalling training queries.

Each question becomes a template: the words that name a column of its database (string
match of the name's words, longest first) become ``<c>``, table names ``<t>``, numbers and
quoted values ``<num>``/``<str>``. For each test question: the training questions of the
same template (else the nearest template: cosine of word uni+bigram TF-IDF), the SQL
skeleton most frequent among them, one of its queries copied, and each column slot of the
copy filled with the column the test question names at the same mention (which mention
fills which slot is voted over the training questions of that template and skeleton);
tables follow the chosen columns and the foreign keys between them, join keys are the
foreign key between the chosen tables, values the test question's numbers and quoted
strings. Scored by Spider's exact set match (``tasks/_spider_eval.py``); no execution
(the report has no databases).

On a split whose test skeletons occur in training (a question split, or the database
split of template data) it recovers most test queries; on the query split (test
skeletons never seen in training) it cannot produce a single test skeleton."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def schema_of(tokens: list[str], links: list[list[int]], db_id: str) -> dict[str, Any]:
    """The ``tables.json`` entry of a row's database, rebuilt from its serialised input."""
    from tasks.spider import COLUMN, FK, KIND, KIND_COLUMN, KIND_TABLE, TABLE, TABLE_FK, name_positions

    tables: dict[int, str] = {}
    columns: dict[int, tuple[int, str]] = {}
    fks: list[list[int]] = []
    pks: list[int] = []
    for tok, link, is_name in zip(tokens, links, name_positions(links)):
        if not is_name:
            continue
        if link[KIND] == KIND_TABLE:
            tables[link[TABLE] - 1] = tok
        elif link[KIND] == KIND_COLUMN:
            columns[link[COLUMN] - 1] = (link[TABLE] - 1, tok)
            if link[FK] > 0:
                fks.append([link[COLUMN] - 1, link[FK] - 1])
            if link[TABLE_FK]:
                pks.append(link[COLUMN] - 1)
    names = [tables[i] for i in range(len(tables))]
    cols = [[-1, "*"]] + [list(columns.get(i, (-1, f"_missing{i}"))) for i in range(1, max(columns, default=0) + 1)]
    return {
        "db_id": db_id,
        "table_names_original": names,
        "column_names_original": cols,
        "foreign_keys": fks,
        "primary_keys": pks,
    }


def _words(name: str) -> list[str]:
    from tasks.spider import word_pieces

    return [p for p in word_pieces(name) if p != "id"]


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def _keys(entry: dict[str, Any]) -> set[int]:
    return (
        set(entry.get("primary_keys", []))
        | {a for a, _ in entry["foreign_keys"]}
        | {b for _, b in entry["foreign_keys"]}
    )


def template(question: str, entry: dict[str, Any]) -> tuple[str, list[list[int]], list[list[int]]]:
    """(template, column mentions, table mentions): each mention the candidate column (table)
    indices, best first (a column right after its table's name, then one whose table the
    question names)."""
    text = re.sub(r"""(['"])[^'"]*\1""", " <str> ", question.lower())
    toks = re.findall(r"<str>|[\w'-]+|[^\w\s]", text)
    stems = [_stem(t) for t in toks]
    keys = _keys(entry)
    tables = entry["table_names_original"]
    phrases: dict[tuple[str, ...], list[int]] = {}
    for ci, (ti, name) in enumerate(entry["column_names_original"]):
        words = tuple(_stem(w) for w in _words(name))
        if ti >= 0 and ci not in keys and words:
            phrases.setdefault(words, []).append(ci)
    table_words = {ti: {_stem(w) for w in _words(name)} for ti, name in enumerate(tables)}
    named_tables = {ti for ti, words in table_words.items() if words & set(stems)}
    out, cols, tabs, i = [], [], [], 0
    longest = max((len(p) for p in phrases), default=0)
    while i < len(toks):
        if any(name.lower() == toks[i] for name in tables):  # a table's own name: a table mention
            match = None
        else:
            match = next(
                (
                    stems[i : i + n]
                    for n in range(min(longest, len(toks) - i), 0, -1)
                    if tuple(stems[i : i + n]) in phrases
                ),
                None,
            )
        if match:
            before = stems[i - 1] if i else ""
            cands = phrases[tuple(match)]
            cols.append(
                sorted(
                    cands,
                    key=lambda ci: (
                        before not in table_words[entry["column_names_original"][ci][0]],
                        entry["column_names_original"][ci][0] not in named_tables,
                    ),
                )
            )
            out.append("<c>")
            i += len(match)
            continue
        exact = [ti for ti, name in enumerate(tables) if name.lower() == toks[i]]
        owners = exact or [ti for ti, words in table_words.items() if stems[i] in words]
        if owners:
            tabs.append(owners)
            out.append("<t>")
        elif _NUMBER.fullmatch(toks[i]):
            out.append("<num>")
        else:
            out.append(toks[i])
        i += 1
    return " ".join(out), cols, tabs


def _slots(sql: str, entry: dict[str, Any]):
    """The tokens of ``sql`` with, per token, ('table', t) / ('column', ci) / None."""
    import sqlglot

    tables = [t.lower() for t in entry["table_names_original"]]
    cols = entry["column_names_original"]
    tokens = list(sqlglot.tokenize(sql, read="sqlite"))
    alias, order = {}, []
    for i, tok in enumerate(tokens):
        if (
            tok.token_type.name == "VAR"
            and tok.text.lower() in tables
            and i > 0
            and tokens[i - 1].token_type.name in ("FROM", "JOIN")
        ):
            order.append(tables.index(tok.text.lower()))
            if i + 2 < len(tokens) and tokens[i + 1].token_type.name == "ALIAS":
                alias[tokens[i + 2].text.lower()] = order[-1]
    names = set(tables) | {c.lower() for _, c in cols}
    roles = []
    for i, tok in enumerate(tokens):
        name = tok.text.lower()
        role = None
        # a name is a VAR token, or a keyword token spelling a schema name (a column ``date``)
        word = tok.token_type.name == "VAR" or (
            name in names
            and name.isidentifier()
            and tok.token_type.name not in ("STRING", "NUMBER")
            and not (i + 1 < len(tokens) and tokens[i + 1].text == "(")
        )
        if word:
            if i > 0 and tokens[i - 1].token_type.name in ("FROM", "JOIN") and name in tables:
                role = ("table", tables.index(name))
            elif i > 1 and tokens[i - 1].text == "." and tokens[i - 2].text.lower() in alias:
                t = alias[tokens[i - 2].text.lower()]
                role = next((("column", ci) for ci, (ti, c) in enumerate(cols) if ti == t and c.lower() == name), None)
            elif not (i + 1 < len(tokens) and tokens[i + 1].text == ".") and not (
                i > 0 and tokens[i - 1].token_type.name == "ALIAS"
            ):
                role = next(
                    (("column", ci) for t in order for ci, (ti, c) in enumerate(cols) if ti == t and c.lower() == name),
                    None,
                )
        roles.append(role)
    return tokens, roles


def slot_mentions(sql: str, question: str, entry: dict[str, Any]) -> list[int | None]:
    """Per table slot, then per non-key column slot of ``sql`` (in order): the index of the
    question's table (column) mention that names it when exactly one does, else None."""
    _, cols, tabs = template(question, entry)
    _, roles = _slots(sql, entry)
    keys = _keys(entry)
    out = []
    for role in roles:
        if role and role[0] == "table":
            naming = [k for k, cands in enumerate(tabs) if role[1] in cands]
            out.append(naming[0] if len(naming) == 1 else None)
    for role in roles:
        if role and role[0] == "column" and role[1] not in keys:
            naming = [k for k, cands in enumerate(cols) if role[1] in cands]
            out.append(naming[0] if len(naming) == 1 else None)
    return out


def fill(sql: str, entry_from: dict[str, Any], mapping: list[int | None], question: str, entry: dict[str, Any]) -> str:
    """``sql`` (over ``entry_from``) with its names and values replaced for ``question`` over
    ``entry``: table slot i takes the table of the question's table mention ``mapping[i]``,
    the column slots (after the table slots) the column of their column mention."""
    tokens, roles = _slots(sql, entry_from)
    n_cols, t_cols = entry_from["column_names_original"], entry["column_names_original"]
    n_keys, t_keys = _keys(entry_from), _keys(entry)
    _, mentions, table_mentions = template(question, entry)
    slot_col: dict[int, int] = {}  # token index -> test column
    table_map: dict[int, int] = {}
    slot = 0
    for role in roles:
        if role and role[0] == "table":
            k = mapping[slot] if slot < len(mapping) else None
            slot += 1
            if k is not None and k < len(table_mentions) and role[1] not in table_map:
                table_map[role[1]] = table_mentions[k][0]
    taken: set[int] = set()
    for i, role in enumerate(roles):
        if role and role[0] == "column" and role[1] not in n_keys:
            k = mapping[slot] if slot < len(mapping) else None
            slot += 1
            if k is None:
                k = next((m for m in range(len(mentions)) if m not in taken), None)
            if k is not None and k < len(mentions):
                taken.add(k)
                cands = mentions[k]
                owner = table_map.get(n_cols[role[1]][0])
                ci = next((c for c in cands if t_cols[c][0] == owner), cands[0])
                slot_col[i] = ci
                table_map.setdefault(n_cols[role[1]][0], t_cols[ci][0])
    n_tables = list(dict.fromkeys([r[1] for r in roles if r and r[0] == "table"]))
    n_links = {(n_cols[a][0], n_cols[b][0]) for a, b in entry_from["foreign_keys"]}
    t_links = {(t_cols[a][0], t_cols[b][0]) for a, b in entry["foreign_keys"]}
    named = [ts[0] for ts in table_mentions]
    for _ in range(len(n_tables)):  # a table linked to a mapped one: a linked test table, named ones first
        for t in n_tables:
            if t in table_map:
                continue
            options = []
            for u, tu in list(table_map.items()):
                if (t, u) in n_links:
                    options += [a for a, b in t_links if b == tu]
                if (u, t) in n_links:
                    options += [b for a, b in t_links if a == tu]
            options = [o for o in options if o not in table_map.values()] or options
            options.sort(key=lambda o: o not in named)
            if options:
                table_map[t] = options[0]
    for t in n_tables:
        if t not in table_map:
            free = [o for o in named if o not in table_map.values()] or named or [0]
            table_map[t] = free[0]
    for i, role in enumerate(roles):
        if not role or role[0] != "column" or i in slot_col:
            continue
        ci = role[1]
        t = table_map.get(n_cols[ci][0], 0)
        own = [c for c, (ti, _) in enumerate(t_cols) if ti == t]
        if ci in n_keys:
            target = {b for a, b in entry_from["foreign_keys"] if a == ci}
            if target:  # a foreign key: the test foreign key from this table to the mapped target's
                other = table_map.get(n_cols[min(target)][0])
                pick = [a for a, b in entry["foreign_keys"] if t_cols[a][0] == t and t_cols[b][0] == other]
                pick = pick or [a for a, _ in entry["foreign_keys"] if t_cols[a][0] == t]
            else:  # a primary key
                pick = [c for c in own if c in entry.get("primary_keys", [])] or [c for c in own if c in t_keys]
        else:
            pick = [c for c in own if c not in t_keys]
        if pick or own:
            slot_col[i] = (pick or own)[0]
    numbers = re.findall(r"-?\d+(?:\.\d+)?", question)
    strings = re.findall(r"""['"]([^'"]+)['"]""", question)
    out = []
    for i, (tok, role) in enumerate(zip(tokens, roles)):
        kind = tok.token_type.name
        if i in slot_col:
            out.append(t_cols[slot_col[i]][1])
        elif role and role[0] == "table" and role[1] in table_map:
            out.append(entry["table_names_original"][table_map[role[1]]])
        elif kind == "NUMBER":
            out.append(numbers.pop(0) if numbers else tok.text)
        elif kind == "STRING":
            value = strings.pop(0) if strings else tok.text.strip("%")
            wrap = "%" if tok.text.startswith("%") else ""
            out.append("'" + wrap + value.replace("'", "''") + wrap + "'")
        else:
            out.append(tok.text)
    return re.sub(r"\s*\.\s*", ".", " ".join(out)).replace("( ", "(").replace(" )", ")")


def lookup_predictions(dsd) -> list[str]:
    """The template lookup's SQL for every test question."""
    from collections import Counter, defaultdict

    from sklearn.feature_extraction.text import TfidfVectorizer

    from tasks._spider_build import sql_skeleton

    train, test = dsd["train"], dsd["test"]
    entries: dict[str, dict[str, Any]] = {}
    for ds in (train, test):
        for i, db in enumerate(ds["db_id"]):
            if db not in entries:
                row = ds[i]
                entries[db] = schema_of(row["source_tokens"], row["schema_links"], db)
    t_q, t_sql, t_db = train["question"], train["query"], train["db_id"]
    templates = [template(q, entries[db])[0] for q, db in zip(t_q, t_db)]
    skeletons = [sql_skeleton(q) for q in t_sql]
    by_template: dict[str, list[int]] = defaultdict(list)
    for j, tpl in enumerate(templates):
        by_template[tpl].append(j)
    votes: dict[tuple[str, str], list[Counter]] = {}
    for j, (tpl, sk) in enumerate(zip(templates, skeletons)):
        mapping = slot_mentions(t_sql[j], t_q[j], entries[t_db[j]])
        counters = votes.setdefault((tpl, sk), [Counter() for _ in mapping])
        for counter, k in zip(counters, mapping):
            if k is not None:
                counter[k] += 1
    distinct = sorted(by_template)
    # min_df=2: words of one template only (values written without quotes) do not count
    vectoriser = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"<\w+>|[\w'-]+", sublinear_tf=True, min_df=2)
    x_train = vectoriser.fit_transform(distinct)
    preds = []
    for question, db in zip(test["question"], test["db_id"]):
        tpl = template(question, entries[db])[0]
        if tpl not in by_template:
            tpl = distinct[int(np.asarray((vectoriser.transform([tpl]) @ x_train.T).todense()).argmax())]
        sk = Counter(skeletons[j] for j in by_template[tpl]).most_common(1)[0][0]
        j = next(j for j in by_template[tpl] if skeletons[j] == sk)
        mapping = [c.most_common(1)[0][0] if c else None for c in votes[(tpl, sk)]]
        try:
            preds.append(fill(t_sql[j], entries[t_db[j]], mapping, question, entries[db]))
        except (IndexError, KeyError, ValueError):
            preds.append("")
    return preds


def exact_hits(predictions: list[str], test) -> list[int]:
    """Per test question, 1 where ``predictions[i]`` is an exact set match of its gold query
    (official rules, ``tasks/_spider_eval.py``), else 0 (an unparsable prediction or gold is 0)."""
    from tasks._spider_eval import Schema, SQLParseError, exact_match, parse_sql

    schemas: dict[str, Schema] = {}
    hits = []
    for i, (pred, gold, db) in enumerate(zip(predictions, test["query"], test["db_id"])):
        if db not in schemas:
            schemas[db] = Schema.from_entry(schema_of(test[i]["source_tokens"], test[i]["schema_links"], db))
        try:
            hits.append(int(exact_match(parse_sql(pred, schemas[db]), parse_sql(gold, schemas[db]))))
        except SQLParseError:
            hits.append(0)
    return hits


def lookup_exact(dsd) -> list[int]:
    """The template lookup's exact set match on every test question (``exact_hits``)."""
    return exact_hits(lookup_predictions(dsd), dsd["test"])
