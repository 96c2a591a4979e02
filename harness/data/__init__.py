"""Data: the ``Task`` base class every task subclasses, the prepared-data cache, batching, readers of
real files (``harness.data.task``), and the Debian packages offline sources are built from
(``harness.data.debian``). Builds on ``harness.core``."""

from harness.data.debian import debian_path, fetch_package
from harness.data.task import (
    PAD_ID,
    SPLITS,
    DataInfo,
    DataSourceError,
    MalformedRecord,
    Task,
    collate,
    stratified_split,
    text_lines,
    unseen_splits,
)

__all__ = [
    "PAD_ID",
    "SPLITS",
    "DataInfo",
    "DataSourceError",
    "MalformedRecord",
    "Task",
    "collate",
    "debian_path",
    "fetch_package",
    "stratified_split",
    "text_lines",
    "unseen_splits",
]
