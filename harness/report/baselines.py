"""Cheap non-attention baselines, computed by the report from a cell's own prepared splits.

A baseline shows what a task measures: if a bag of tokens or the distance between two dots
solves a task as well as attention does, the task does not test long-range attention.
Each baseline is fitted on train, has its one knob chosen on validation (never on test)
and is scored on test, the same test split as the cells:

* ``majority``: the most frequent train label, on test (every labelled task).
* ``bag-of-n-grams LR`` (classification over one sequence: ListOps, text, protein, image):
  unigram + bigram token counts, sublinear TF-IDF, L2-normalised rows, scikit-learn's
  multinomial ``LogisticRegression``; C in {0.1, 1, 10} chosen on validation. At most
  ``MAX_TRAIN`` training examples (a seeded subsample above that) to keep the report fast.
* ``pixel LR`` (image): logistic regression on the raw pixel intensities, C on validation.
* ``3-mer LR`` (protein): hashed 3-mer TF-IDF counts, logistic regression, C on validation.
* per-query ``majority`` and ``bag-of-n-grams LR`` (per-position tasks: MQAR, selective copying),
  which must sit near chance (a bag of tokens does not say which value followed which key, nor
  which data token came k-th).
* ``byte-trigram cosine`` (two-document matching: retrieval): cosine similarity of the two
  documents' token-trigram count vectors; the threshold (and which side means "match") is
  the one with the best validation accuracy.
* ``dot distance`` (Pathfinder): the two dots are the brightest pixels of the image
  (``tasks/pathfinder.py`` draws them at intensity 255, token 256, paddles at 191); the
  distance between the centroids of the two largest 8-connected bright components,
  thresholded as above. Both dots merged into one blob counts as distance 0.
* ``unigram`` / ``bigram`` bits per token (language modelling: protein_lm): add-α smoothed
  counts of train (α in {0.01, 0.1, 0.5, 1} chosen on validation) over the target tokens
  seen in any split; targets are every token after the first (the start token), as the
  model predicts them. The 95% interval is ±1.96 standard errors of the ratio estimator
  over test *sequences* (tokens of one sequence are not independent).

Results are cached per data fingerprint (``<store>/<task>-<fingerprint>-v<VERSION>.json``),
so the report computes each once; bump ``VERSION`` when a baseline changes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VERSION = 4  # 2: per-query baselines (mqar), image pixel LR, protein k-mer LR; 3: per-test-item outcomes;
# 4: Spider's baselines with their per-question outcomes
MAX_TRAIN = 20000  # training examples for the logistic regression (seeded subsample above)
LR_C = (0.1, 1.0, 10.0)
LM_ALPHAS = (0.01, 0.1, 0.5, 1.0)
Z95 = 1.959963984540054


def baseline(
    name: str,
    metric: str,
    value: float,
    n_test: int,
    *,
    half_width: float | None = None,
    note: str = "",
    choice: Any = None,
    correct=None,
    count=None,
) -> dict[str, Any]:
    """One baseline result: ``value`` of ``metric`` on ``n_test`` test examples (sequences for
    bits/token), its 95% half-width where it is not a binomial proportion, the knob chosen on
    validation, and (accuracy baselines) its outcome on every test item in test-split order,
    ``items = {"correct": [...], "count": [...]}`` as cells record them, for paired tests."""
    out = {
        "name": name,
        "metric": metric,
        "value": float(value),
        "n_test": int(n_test),
        "half_width": None if half_width is None else float(half_width),
        "note": note,
        "choice": choice,
    }
    if correct is not None:
        correct = np.asarray(correct).astype(int)
        count = np.ones_like(correct) if count is None else np.asarray(count).astype(int)
        out["items"] = {"correct": correct.tolist(), "count": count.tolist()}
    return out


# ----------------------------------------------------------------------------- features


def _arrays(ds, column: str) -> list[np.ndarray]:
    """The token lists of one column as int64 arrays."""
    import pyarrow.compute as pc

    col = ds.data.column(column)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def ngram_counts(seqs: list[np.ndarray], vocab: int, n_max: int = 2):
    """Sparse (len(seqs), vocab + vocab**2) counts of unigrams and (n_max=2) bigrams."""
    from scipy import sparse

    rows, cols = [], []
    for i, a in enumerate(seqs):
        grams = [a]
        if n_max >= 2 and len(a) > 1:
            grams.append(vocab + a[:-1] * vocab + a[1:])
        ids = np.concatenate(grams) if grams else np.zeros(0, np.int64)
        rows.append(np.full(len(ids), i, np.int64))
        cols.append(ids)
    rows_, cols_ = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, np.int64),) * 2
    width = vocab + (vocab * vocab if n_max >= 2 else 0)
    return sparse.csr_matrix((np.ones(len(rows_), np.float64), (rows_, cols_)), shape=(len(seqs), width))


def trigram_ids(seqs: list[np.ndarray], vocab: int):
    """(row, trigram id) per token trigram of each sequence; ids a·V² + b·V + c."""
    rows, cols = [], []
    for i, a in enumerate(seqs):
        ids = a[:-2] * vocab * vocab + a[1:-1] * vocab + a[2:] if len(a) > 2 else np.zeros(0, np.int64)
        rows.append(np.full(len(ids), i, np.int64))
        cols.append(ids)
    return np.concatenate(rows), np.concatenate(cols)


# ----------------------------------------------------------------------------- thresholds


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, bool]:
    """(threshold, greater) maximising the accuracy of ``label == (score >= t)`` (greater) or
    ``label == (score <= t)``; candidates are midpoints between sorted distinct scores."""
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1.0]])
    best = (-1.0, 0.0, True)
    for greater in (True, False):
        predicted = scores[None, :] >= candidates[:, None] if greater else scores[None, :] <= candidates[:, None]
        accuracy = (predicted == (labels[None, :] == 1)).mean(axis=1)
        i = int(np.argmax(accuracy))
        if accuracy[i] > best[0]:
            best = (float(accuracy[i]), float(candidates[i]), greater)
    return best[1], best[2]


def threshold_correct(scores: np.ndarray, labels: np.ndarray, threshold: float, greater: bool) -> np.ndarray:
    """Per item: is ``label == (score >= t)`` (greater) or ``label == (score <= t)``?"""
    predicted = scores >= threshold if greater else scores <= threshold
    return predicted == (labels == 1)


def threshold_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float, greater: bool) -> float:
    return float(threshold_correct(scores, labels, threshold, greater).mean())


# ----------------------------------------------------------------------------- the baselines


def majority_baseline(dsd) -> dict[str, Any]:
    train = np.asarray(dsd["train"]["label"])
    test = np.asarray(dsd["test"]["label"])
    values, counts = np.unique(train, return_counts=True)
    label = values[int(np.argmax(counts))]
    return baseline(
        "majority",
        "accuracy",
        float((test == label).mean()) if len(test) else math.nan,
        len(test),
        choice=int(label),
        correct=test == label,
    )


def bag_of_ngrams_baseline(dsd, *, seed: int = 0) -> dict[str, Any]:
    """Unigram+bigram TF-IDF logistic regression; C chosen on validation."""
    from sklearn.feature_extraction.text import TfidfTransformer

    seqs, labels = _subsampled(dsd, seed)
    vocab = 1 + max(int(a.max()) for split in seqs.values() for a in split if len(a))
    tfidf = TfidfTransformer(sublinear_tf=True)
    x = {"train": tfidf.fit_transform(ngram_counts(seqs["train"], vocab))}
    for split in ("validation", "test"):
        x[split] = tfidf.transform(ngram_counts(seqs[split], vocab))
    if len(np.unique(labels["train"])) < 2:
        return majority_baseline(dsd) | {"name": "bag-of-n-grams LR", "note": "one class in train"}
    return _fit_lr(x, labels, "bag-of-n-grams LR", "unigram+bigram TF-IDF logistic regression, C on validation")


def _cosines(first: list[np.ndarray], second: list[np.ndarray], vocab: int) -> np.ndarray:
    from scipy import sparse

    r1, c1 = trigram_ids(first, vocab)
    r2, c2 = trigram_ids(second, vocab)
    columns, inverse = np.unique(np.concatenate([c1, c2]), return_inverse=True)
    shape = (len(first), len(columns))
    x1 = sparse.csr_matrix((np.ones(len(r1)), (r1, inverse[: len(c1)])), shape=shape)
    x2 = sparse.csr_matrix((np.ones(len(r2)), (r2, inverse[len(c1) :])), shape=shape)
    dot = np.asarray(x1.multiply(x2).sum(axis=1)).ravel()
    norms = np.sqrt(np.asarray(x1.multiply(x1).sum(axis=1)).ravel() * np.asarray(x2.multiply(x2).sum(axis=1)).ravel())
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


def trigram_cosine_baseline(dsd) -> dict[str, Any]:
    """Byte-trigram cosine of the two documents, thresholded on validation."""
    scores, labels = {}, {}
    for split in ("validation", "test"):
        first, second = _arrays(dsd[split], "input_ids_1"), _arrays(dsd[split], "input_ids_2")
        vocab = 1 + max([int(a.max()) for a in first + second if len(a)] or [0])
        scores[split] = _cosines(first, second, max(vocab, 257))
        labels[split] = np.asarray(dsd[split]["label"])
    threshold, greater = best_threshold(scores["validation"], labels["validation"])
    correct = threshold_correct(scores["test"], labels["test"], threshold, greater)
    return baseline(
        "byte-trigram cosine",
        "accuracy",
        correct.mean(),
        len(labels["test"]),
        choice=round(threshold, 4),
        correct=correct,
        note=f"match iff cosine {'≥' if greater else '≤'} {threshold:.3f} (threshold on validation)",
    )


def dot_distances(images: np.ndarray) -> np.ndarray:
    """(N,) distance between the centroids of the two largest components of each image's
    brightest pixels; 0 where they form one component, NaN where there are none."""
    from scipy import ndimage

    out = np.full(len(images), np.nan)
    structure = np.ones((3, 3), dtype=bool)  # 8-connected
    for i, image in enumerate(images):  # per image, not per sequence position
        bright = image == image.max()
        components, count = ndimage.label(bright, structure=structure)
        if count == 0:
            continue
        if count == 1:
            out[i] = 0.0
            continue
        sizes = ndimage.sum(bright, components, index=np.arange(1, count + 1))
        two = np.argsort(sizes)[-2:] + 1
        (y0, x0), (y1, x1) = ndimage.center_of_mass(bright, components, index=list(two))
        out[i] = math.hypot(y1 - y0, x1 - x0)
    return out


def dot_distance_baseline(dsd) -> dict[str, Any]:
    """Distance between Pathfinder's two dots, thresholded on validation."""
    scores, labels = {}, {}
    for split in ("validation", "test"):
        tokens = np.stack(_arrays(dsd[split], "input_ids")) if len(dsd[split]) else np.zeros((0, 1), np.int64)
        side = int(round(math.sqrt(tokens.shape[1])))
        if side * side != tokens.shape[1]:
            raise ValueError(f"pathfinder sequences of {tokens.shape[1]} tokens are not square images")
        distance = dot_distances(tokens.reshape(len(tokens), side, side))
        fill = np.nanmedian(distance) if np.isfinite(distance).any() else 0.0
        scores[split] = np.where(np.isfinite(distance), distance, fill)
        labels[split] = np.asarray(dsd[split]["label"])
    threshold, greater = best_threshold(scores["validation"], labels["validation"])
    correct = threshold_correct(scores["test"], labels["test"], threshold, greater)
    return baseline(
        "dot distance",
        "accuracy",
        correct.mean(),
        len(labels["test"]),
        choice=round(threshold, 3),
        correct=correct,
        note=f"connected iff distance {'≥' if greater else '≤'} {threshold:.1f} px (threshold on validation)",
    )


def _lm_bits(log2p: np.ndarray, lengths: np.ndarray) -> tuple[float, float]:
    """(bits/token, 95% half-width) from per-token log2-probabilities and sequence lengths:
    the ratio estimator over sequences and its linearised standard error."""
    bits = -np.add.reduceat(log2p, np.concatenate([[0], np.cumsum(lengths)[:-1]])) if len(lengths) else np.zeros(0)
    bits = np.where(lengths > 0, bits, 0.0)
    mean = bits.sum() / lengths.sum()
    m = len(lengths)
    if m < 2:
        return float(mean), math.nan
    residual = (bits - mean * lengths) / lengths.mean()
    se = math.sqrt((residual**2).sum() / (m * (m - 1)))
    return float(mean), Z95 * se


def ngram_lm_baselines(dsd) -> list[dict[str, Any]]:
    """Unigram and bigram bits per target token; α chosen on validation."""
    seqs = {s: [a for a in _arrays(dsd[s], "input_ids") if len(a) > 1] for s in ("train", "validation", "test")}
    targets = np.unique(np.concatenate([a[1:] for split in seqs.values() for a in split]))
    size = int(max(int(a.max()) for split in seqs.values() for a in split)) + 1
    k = len(targets)
    prev = np.concatenate([a[:-1] for a in seqs["train"]])
    nxt = np.concatenate([a[1:] for a in seqs["train"]])
    unigram = np.bincount(nxt, minlength=size).astype(np.float64)
    bigram = np.zeros((size, size))
    np.add.at(bigram, (prev, nxt), 1.0)

    def log2p(split: str, order: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        p_ = np.concatenate([a[:-1] for a in seqs[split]])
        n_ = np.concatenate([a[1:] for a in seqs[split]])
        if order == 1:
            p = (unigram[n_] + alpha) / (unigram.sum() + alpha * k)
        else:
            p = (bigram[p_, n_] + alpha) / (bigram[p_].sum(axis=1) + alpha * k)
        return np.log2(p), np.asarray([len(a) - 1 for a in seqs[split]])

    out = []
    for order, name in ((1, "unigram"), (2, "bigram")):
        alpha = min(LM_ALPHAS, key=lambda a: _lm_bits(*log2p("validation", order, a))[0])
        value, half = _lm_bits(*log2p("test", order, alpha))
        out.append(
            baseline(
                name,
                "bits_per_token",
                value,
                len(seqs["test"]),
                half_width=half,
                choice=alpha,
                note=f"add-{alpha} smoothed {name} of train over {k} target tokens",
            )
        )
    return out


# ----------------------------------------------------------------------------- dispatch and cache


def _fit_lr(x: dict, labels: dict, name: str, note: str, items: np.ndarray | None = None) -> dict[str, Any]:
    """Logistic regression on train features, C chosen on validation, scored on test. ``items``
    maps each test row to its test item (per-position tasks: a query to its sequence)."""
    from sklearn.linear_model import LogisticRegression

    best: tuple[float, float, Any] | None = None
    for c in LR_C:
        model = LogisticRegression(C=c, max_iter=300).fit(x["train"], labels["train"])
        val = float((model.predict(x["validation"]) == labels["validation"]).mean())
        if best is None or val > best[0]:
            best = (val, c, model)
    if best is None:
        raise ValueError("no regularisation strength to try: LR_C is empty")
    _, c, model = best
    hit = model.predict(x["test"]) == labels["test"]
    correct, count = per_item(hit, items)
    return baseline(
        name, "accuracy", float(hit.mean()), len(labels["test"]), choice=c, note=note, correct=correct, count=count
    )


def per_item(hit: np.ndarray, items: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Row outcomes summed per test item (rows -> their item index), or the rows themselves."""
    if items is None:
        return hit, None
    n = int(items.max()) + 1 if len(items) else 0
    return np.bincount(items, weights=hit, minlength=n), np.bincount(items, minlength=n)


def _subsampled(dsd, seed: int = 0) -> tuple[dict, dict]:
    """Token arrays and labels per split; at most MAX_TRAIN training examples (seeded subsample)."""
    seqs = {s: _arrays(dsd[s], "input_ids") for s in ("train", "validation", "test")}
    labels = {s: np.asarray(dsd[s]["label"]) for s in seqs}
    if len(seqs["train"]) > MAX_TRAIN:
        keep = np.sort(np.random.default_rng(seed).choice(len(seqs["train"]), MAX_TRAIN, replace=False))
        seqs["train"] = [seqs["train"][i] for i in keep]
        labels["train"] = labels["train"][keep]
    return seqs, labels


def pixel_lr_baseline(dsd, *, seed: int = 0) -> dict[str, Any]:
    """Image: logistic regression on the raw pixel intensities (token − 1, scaled to [0, 1],
    sequences padded to the longest), C on validation. A linear model that sees every pixel
    at its place: what a sequence model must beat to have used more than a linear template."""
    seqs, labels = _subsampled(dsd, seed)
    width = max(len(a) for split in seqs.values() for a in split)
    x = {}
    for split, rows in seqs.items():
        m = np.zeros((len(rows), width), dtype=np.float32)
        for i, a in enumerate(rows):
            m[i, : len(a)] = np.clip(a - 1, 0, None) / 255.0
        x[split] = m
    return _fit_lr(x, labels, "pixel LR", "logistic regression on raw pixels, C on validation")


def kmer_lr_baseline(dsd, *, k: int = 3, seed: int = 0) -> dict[str, Any]:
    """Protein: logistic regression on the sequence's k-mer counts (k = 3, hashed into 2^18
    columns; sublinear TF-IDF), C on validation: the classic composition baseline."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfTransformer

    seqs, labels = _subsampled(dsd, seed)
    vocab = 1 + max(int(a.max()) for split in seqs.values() for a in split if len(a))
    buckets = 1 << 18

    def counts(rows):
        r, c = [], []
        for i, a in enumerate(rows):
            if len(a) < k:
                continue
            ids = sum(a[j : len(a) - k + 1 + j] * vocab**j for j in range(k)) % buckets
            r.append(np.full(len(ids), i))
            c.append(ids)
        r = np.concatenate(r) if r else np.zeros(0, np.int64)
        c = np.concatenate(c) if c else np.zeros(0, np.int64)
        return sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), buckets))

    tfidf = TfidfTransformer(sublinear_tf=True)
    x = {"train": tfidf.fit_transform(counts(seqs["train"]))}
    for split in ("validation", "test"):
        x[split] = tfidf.transform(counts(seqs[split]))
    return _fit_lr(x, labels, f"{k}-mer LR", f"{k}-mer TF-IDF logistic regression, C on validation")


SHORTCUTS = {"pathfinder": dot_distance_baseline}  # task-specific shortcuts; others follow the data's layout
EXTRA_SHORTCUTS = {"image": (pixel_lr_baseline,), "protein": (kmer_lr_baseline,)}  # beside the bag of n-grams


def _query_rows(dsd, split: str, limit: int | None = None, seed: int = 0):
    """Per-position tasks (``targets``, -100 off the queries): (sequence index, query token,
    target) of every query of a split, at most ``limit`` (a seeded subsample above it)."""
    seqs = _arrays(dsd[split], "input_ids")
    targets = _arrays(dsd[split], "targets")
    rows = [(i, int(s[j]), int(t[j])) for i, (s, t) in enumerate(zip(seqs, targets)) for j in np.flatnonzero(t != -100)]
    if limit and len(rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
        rows = [rows[k] for k in keep]
    return seqs, rows


def tagger_baselines(dsd, *, seed: int = 0) -> list[dict[str, Any]]:
    """Per-query baselines of a per-position task (MQAR, selective copying): the most frequent
    train target, and a logistic regression on the query token (one-hot; a key, or a marker)
    beside its sequence's unigram+bigram TF-IDF counts, C on validation. Both should sit near
    chance: a bag of tokens does not say which value followed which key, nor which data token
    came k-th (if it did, the generator would leak the answer)."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfTransformer

    data = {s: _query_rows(dsd, s, MAX_TRAIN if s == "train" else None, seed) for s in ("train", "validation", "test")}
    y = {s: np.asarray([t for _, _, t in rows]) for s, (_, rows) in data.items()}
    values, counts = np.unique(y["train"], return_counts=True)
    label = values[int(np.argmax(counts))]
    test_items = np.asarray([i for i, _, _ in data["test"][1]], dtype=np.int64)
    correct, count = per_item(y["test"] == label, test_items)
    out = [
        baseline(
            "majority",
            "accuracy",
            float((y["test"] == label).mean()),
            len(y["test"]),
            choice=int(label),
            note="per query",
            correct=correct,
            count=count,
        )
    ]
    vocab = 1 + max(int(a.max()) for seqs, _ in data.values() for a in seqs if len(a))
    tfidf = TfidfTransformer(sublinear_tf=True)
    x = {}
    for split, (seqs, rows) in data.items():
        counts_ = ngram_counts([seqs[i] for i, _, _ in rows], vocab)
        counts_ = tfidf.fit_transform(counts_) if split == "train" else tfidf.transform(counts_)
        query = sparse.csr_matrix(
            (np.ones(len(rows)), (np.arange(len(rows)), [q for _, q, _ in rows])), shape=(len(rows), vocab)
        )
        x[split] = sparse.hstack([query, counts_]).tocsr()
    out.append(
        _fit_lr(
            x,
            y,
            "bag-of-n-grams LR",
            "per query: query token + its sequence's unigram+bigram TF-IDF, C on validation",
            items=test_items,
        )
    )
    return out


def spider_lookup_baselines(dsd) -> list[dict[str, Any]]:
    """Text-to-SQL (Spider), scored by exact set match as the cells' accuracy column: copy the
    most frequent training query (``majority``), and the template lookup (nearest training
    question, its SQL with names and values filled by string match; ``tasks/_spider_lookup.py``)."""
    from tasks._spider_lookup import exact_hits, lookup_exact

    test = dsd["test"]
    query = max(set(dsd["train"]["query"]), key=list(dsd["train"]["query"]).count)
    majority, lookup = exact_hits([query] * len(test), test), lookup_exact(dsd)
    n = max(1, len(test))
    return [
        baseline(
            "majority",
            "accuracy",
            sum(majority) / n,
            len(test),
            choice=query,
            correct=majority,
            note="the most frequent training query, exact set match",
        ),
        baseline(
            "template lookup",
            "accuracy",
            sum(lookup) / n,
            len(test),
            correct=lookup,
            note="nearest training question's SQL, names and values filled by string match; exact set match",
        ),
    ]


def compute_baselines(dsd, task: str) -> list[dict[str, Any]]:
    """Every baseline that applies to a prepared DatasetDict (train/validation/test)."""
    columns = set(dsd["train"].column_names)
    if "target_ids" in columns:  # sequence-to-sequence (Spider), scored by exact set match
        return spider_lookup_baselines(dsd)
    if "targets" in columns:  # per-position classification (MQAR, selective copying): per query
        return tagger_baselines(dsd)
    if "label" not in columns:
        return ngram_lm_baselines(dsd)
    out = [majority_baseline(dsd)]
    if {"input_ids_1", "input_ids_2"} <= columns:
        out.append(trigram_cosine_baseline(dsd))
    elif task in SHORTCUTS:
        out.append(SHORTCUTS[task](dsd))
    else:
        out.append(bag_of_ngrams_baseline(dsd))
    for extra in EXTRA_SHORTCUTS.get(task, ()):
        out.append(extra(dsd))
    return out


def baselines_for(task: str, fingerprint: str | None, cache_path: str | None, store: str | Path) -> dict[str, Any]:
    """``{"baselines": [...]}`` for a cell's data, from ``store`` or computed from the data cache
    at ``cache_path`` (and stored); ``{"baselines": [], "error": why}`` when neither works."""
    store = Path(store)
    if not fingerprint:
        return {"baselines": [], "error": "the result records no data fingerprint"}
    path = store / f"{task}-{fingerprint}-v{VERSION}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("recomputing baselines: cannot read %s (%s)", path, exc)
    if not cache_path or not (Path(cache_path) / "data").exists():
        return {
            "baselines": [],
            "error": f"data cache {cache_path or '(none recorded)'} not found; "
            f"run the cell again (or `python -m harness data`) to rebuild it",
        }
    try:
        import datasets

        dsd = datasets.load_from_disk(str(Path(cache_path) / "data"))
        result = {
            "task": task,
            "fingerprint": fingerprint,
            "version": VERSION,
            "baselines": compute_baselines(dsd, task),
        }
    except Exception as exc:  # a baseline must never stop the report
        log.warning("baselines of %s (%s) failed: %s", task, cache_path, exc)
        return {"baselines": [], "error": f"{type(exc).__name__}: {exc}"}
    from harness.core.results import write_json_atomic

    write_json_atomic(path, result)
    return result
