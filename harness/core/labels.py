"""How results are named in tables, plots and listings, one way for the report and the speed
benchmark: softmax (the reference) first, lengths as ``1K``, a failed status as its mark."""

from __future__ import annotations

import math
from collections.abc import Iterable

REFERENCE = "softmax"  # the mechanism every other is compared with

# A result that did not finish, as a table cell shows it (cells: failed, oom, nan, timeout;
# speed measurements: failed, oom, timeout, skipped).
FAILURE_MARK = {"failed": "✗ failed", "oom": "✗ oom", "nan": "✗ nan", "timeout": "✗ timeout", "skipped": "– skipped"}


def softmax_first(labels: Iterable[str]) -> list[str]:
    """The distinct ``labels`` sorted, softmax's first: ``softmax`` and its variant rows
    (``softmax [v1]``), then the others alphabetically."""
    return sorted(set(labels), key=lambda label: (label.split(" [", 1)[0] != REFERENCE, label))


def length_label(length) -> str:
    """A sequence length as a column or tick shows it: ``1K`` for 1024, ``?`` for none."""
    if length is None or (isinstance(length, float) and math.isnan(length)):
        return "?"
    length = int(length)
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)
