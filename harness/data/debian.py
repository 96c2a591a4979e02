"""Real offline material from Debian packages, unpacked into the data cache.

``debian_path("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")`` returns the
folder from the installed system when the package is installed, otherwise from a copy
unpacked into the cache (``<cache>/debian/<package>/``), fetched with ``apt-get download``
(no root needed, nothing installed) and unpacked with ``dpkg-deb -x`` once ``dpkg-deb`` has
read its control fields and its sha256 matches the ``SHA256`` of that version in the apt
package lists (``apt-cache show``; the lists are signed by Debian). When neither works the
error says which package to install.

What it can change on the system: nothing, unless the apt package lists hold no record of
the package at all; then, as root only, it runs ``apt-get update`` once to refresh them
(``/var/lib/apt/lists``) and says so in a warning. Without root it says to run that instead.

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

from harness.data.integrity import check_sha256, sha256_file
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
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if not shutil.which(tool)]
    if missing:
        raise DataSourceError(f"cannot fetch Debian package '{package}': {', '.join(missing)} not available here")
    if not apt_records(package):
        _refresh_lists_for(package)
    log.info("fetching Debian package %s into %s", package, root)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or not debs:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no .deb downloaded"]
            raise DataSourceError(
                f"apt-get download {package} failed ({detail[0]}); the package lists may be stale "
                f"(run `apt-get update` as root), or install the package by hand"
            )
        checked = verify_deb(debs[0], package)
        staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=_ensure(root.parent)))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        (staging / ".complete").write_text(f"{debs[0].name} sha256={checked['SHA256']}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    return root


def _refresh_lists_for(package: str) -> None:
    """The apt package lists hold no ``package``: as root, refresh them once (``apt-get update``,
    the only system change this module makes, said in a warning); otherwise say to."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        raise DataSourceError(
            f"Debian package '{package}' is not in the apt package lists: run `apt-get update` as root "
            f"(or install the package), then fetch again"
        )
    log.warning("the apt package lists hold no %s: running `apt-get update` (refreshes /var/lib/apt/lists)", package)
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
    if not apt_records(package):
        raise DataSourceError(f"Debian package '{package}' is not in the apt package lists, even after apt-get update")


def apt_records(spec: str) -> list[dict[str, str]]:
    """The records of ``spec`` (``package`` or ``package=version``) in the apt package lists
    (``apt-cache show``): one dict of top-level fields per version and architecture; empty
    when the lists hold none."""
    done = subprocess.run(["apt-cache", "show", spec], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    records = []
    for paragraph in done.stdout.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in paragraph.splitlines() if ": " in line and not line[0].isspace())
        if "Package" in fields:
            records.append(fields)
    return records


def verify_deb(deb: Path, package: str) -> dict[str, str]:
    """The apt lists' record of the downloaded ``deb``, once ``dpkg-deb`` has read it as a
    Debian archive of ``package`` and its sha256 is the record's ``SHA256``; otherwise a
    one-line DataSourceError naming the file (nothing is unpacked)."""
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Package", "Version", "Architecture"], capture_output=True, text=True
    )
    if fields.returncode != 0:
        detail = fields.stderr.strip().splitlines()[-1:] or ["unreadable"]
        raise DataSourceError(f"{deb.name}: not a valid Debian archive ({detail[0]}); refused, not unpacked")
    control = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
    if control.get("Package") != package:
        raise DataSourceError(f"{deb.name}: holds package {control.get('Package')!r}, not {package!r}; refused")
    version, arch = control.get("Version", ""), control.get("Architecture", "")
    records = [r for r in apt_records(f"{package}={version}") if r.get("Architecture") == arch and "SHA256" in r]
    if not records:
        raise DataSourceError(
            f"{deb.name}: {package} {version} ({arch}) has no SHA256 in the apt package lists; refused, not unpacked"
        )
    got = sha256_file(deb)
    matching = [r for r in records if r["SHA256"] == got]  # the same version from two archives: either one
    check_sha256(deb, (matching or records)[0]["SHA256"], pinned_by=f"apt-cache show {package}={version}")
    return (matching or records)[0]


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
