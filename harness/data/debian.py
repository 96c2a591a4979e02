"""Real offline material from Debian packages, with no system change.

``debian_path("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")`` returns the
folder from the installed system when the package is installed, otherwise from a copy
unpacked into the cache (``apt-get download`` + ``dpkg-deb -x``; no root needed). When
neither works the error says which package to install.

``python -m harness tool debian-fetch packages=[PKG,...]`` unpacks packages ahead of time (``make data``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.task import CACHE_ENV, DEFAULT_CACHE_DIR, DataSourceError

log = logging.getLogger(__name__)


def unpack_root(package: str) -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)) / "debian" / package


def debian_path(package: str, relative: str, *, fetch: bool = True) -> Path:
    """The path ``/<relative>`` as shipped by ``package``: system copy, else unpacked copy."""
    system = Path("/") / relative
    if system.exists():
        return system
    unpacked = unpack_root(package) / relative
    if unpacked.exists():
        return unpacked
    if fetch:
        fetch_package(package)
        if unpacked.exists():
            return unpacked
    raise DataSourceError(
        f"/{relative} not found: it ships in the Debian package '{package}'. "
        f"Install it (apt-get install {package}) or run `python -m harness tool debian-fetch packages=[{package}]` "
        f"(or `make data`), or point the task at its real source (task.source=...)"
    )


def fetch_package(package: str) -> Path:
    """Download ``package``'s .deb with apt-get and unpack it under the cache."""
    from harness.data.task import cache_lock

    root = unpack_root(package)
    if (root / ".complete").exists():
        return root
    _ensure(root.parent)
    with cache_lock(root):  # two processes fetching one package: one fetches, the other waits and reuses it
        if (root / ".complete").exists():
            return root
        return _fetch_locked(package, root)


def _fetch_locked(package: str, root: Path) -> Path:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise DataSourceError(f"cannot fetch Debian package '{package}': apt-get/dpkg-deb not available here")
    log.info("fetching Debian package %s into %s", package, root)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            log.info("apt-get download %s failed; refreshing the package lists once", package)
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or not debs:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no .deb downloaded"]
            raise DataSourceError(
                f"apt-get download {package} failed ({detail[0]}); try `apt-get update` first, "
                f"or install the package by hand"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=_ensure(root.parent)))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        (staging / ".complete").write_text(debs[0].name + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    return root


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class FetchSettings:
    """Unpack Debian packages into the data cache ahead of time (what an offline task needs)."""

    packages: list[str] = field(default_factory=list)  # package names, e.g. [manpages,manpages-dev]


def fetch(settings: FetchSettings) -> int:
    """``python -m harness tool debian-fetch``: one line per package; exit 1 when one failed."""
    from harness.core.overrides import UsageError

    if not settings.packages:
        raise UsageError("debian-fetch needs packages=[NAME,...]")
    status = 0
    for package in settings.packages:
        try:
            print(f"{package}: {fetch_package(package)}")
        except DataSourceError as exc:
            print(f"{package}: {exc}", file=sys.stderr)
            status = 1
    return status
