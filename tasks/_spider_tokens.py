"""Spider's tokens: questions split at whitespace and trailing punctuation, SQL split into
keywords, identifiers and literal words (so a literal's words can be copied), and back.
Shared by the task (``tasks.spider``) and the offline builder (``tasks._spider_build``)."""

from __future__ import annotations

import re

SQL_KEYWORDS = {
    "select",
    "from",
    "where",
    "group",
    "by",
    "order",
    "limit",
    "having",
    "join",
    "on",
    "as",
    "and",
    "or",
    "not",
    "in",
    "like",
    "between",
    "is",
    "null",
    "distinct",
    "count",
    "max",
    "min",
    "sum",
    "avg",
    "asc",
    "desc",
    "union",
    "intersect",
    "except",
    "exists",
    "all",
    "inner",
    "left",
    "outer",
    "cast",
    "case",
    "when",
    "then",
    "else",
    "end",
}
_SQL_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|\d+\.\d+|\w+|!=|>=|<=|<>|\S")


def tokenize_question(text: str) -> list[str]:
    """Whitespace tokens, trailing punctuation split off; case kept (values are copied)."""
    out = []
    for word in text.split():
        trail = []
        while len(word) > 1 and word[-1] in "?.,!;:":
            trail.insert(0, word[-1])
            word = word[:-1]
        out.extend([word, *trail])
    return out


def tokenize_sql(sql: str) -> list[str]:
    """SQL tokens: keywords lower-cased, identifiers as written, a string literal as
    ``'`` + its whitespace-separated words + ``'`` (so its words can be copied)."""
    out = []
    for tok in _SQL_TOKEN.findall(sql.strip().rstrip(";")):
        if tok[0] in "'\"" and len(tok) >= 2 and tok[-1] == tok[0]:
            out.extend(["'", *tok[1:-1].replace("''", "'").split(), "'"])
        else:
            out.append(tok.lower() if tok.lower() in SQL_KEYWORDS else tok)
    return out


def detokenize_sql(tokens: list[str]) -> str:
    """Inverse of tokenize_sql (up to whitespace inside literals)."""
    out, literal, words = [], False, []
    for tok in tokens:
        if tok == "'":
            if literal:
                out.append("'" + " ".join(words).replace("'", "''") + "'")
                words = []
            literal = not literal
        elif literal:
            words.append(tok)
        else:
            out.append(tok)
    if literal:
        out.append("'" + " ".join(words) + "'")
    return re.sub(r"\s*\.\s*(?=[A-Za-z_])", ".", " ".join(out)).replace("( ", "(").replace(" )", ")")
