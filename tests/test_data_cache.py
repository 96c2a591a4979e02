"""The data cache (harness.data.task.Task.load): keyed on the source files' size and mtime,
never caches an empty split, rebuilds an unreadable cache once (naming it), removes the
temporary folders of killed builds, and lets two processes build the same cache at once."""

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.core.registry import create_task
from harness.data.task import DataSourceError, Task, cache_lock, remove_orphans
from tasks import listops

ROWS = [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [MIN 2 ) 9 ) ] )", 2), ("( ( [SM 3 ) ] )", 3)]


def write_listops(folder: Path, rows=ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in listops.SPLIT_FILES.values():
        listops.write_tsv(folder / name, rows)
    return folder


def lra_task(folder: Path):
    return create_task("listops", source="lra", data_dir=str(folder), max_len=64)


# ----------------------------------------------------------------------------- keyed on the source files


def test_a_source_file_edited_after_preparation_is_read_again(tmp_path):
    src = write_listops(tmp_path / "lra")
    _, first = lra_task(src).load(tmp_path / "cache")
    assert first.sizes["test"] == 3
    listops.write_tsv(src / "basic_test.tsv", ROWS[:2])  # edited in place: same path, same config
    _, second = lra_task(src).load(tmp_path / "cache")
    assert second.sizes["test"] == 2 and second.fingerprint != first.fingerprint
    assert second.cache_path != first.cache_path


def test_same_size_edit_with_a_new_mtime_is_a_new_key(tmp_path):
    src = write_listops(tmp_path / "lra")
    task = lra_task(src)
    before = task.cache_path(tmp_path)
    path = src / "basic_val.tsv"
    path.write_text(path.read_text().replace("[MAX 2", "[MAX 3"), newline="")  # same size
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert task.cache_path(tmp_path) != before
    assert lra_task(src).cache_path(tmp_path) == task.cache_path(tmp_path)  # stable while nothing changes


def test_offline_sources_list_their_files_too():
    files = create_task("text").source_files()  # man pages of Debian manpages + manpages-dev
    assert len(files) > 1000 and all(Path(p).name.endswith(".gz") for p in files)
    assert create_task("listops").source_files() == []  # a seeded generator reads no file


# ----------------------------------------------------------------------------- empty splits, broken caches


def test_an_empty_split_is_an_error_naming_task_and_split_and_is_not_cached(tmp_path):
    task = create_task("listops", min_length=5, max_length=40, max_len=40, num_train=20, num_val=0, num_test=5)
    with pytest.raises(DataSourceError, match=r"task 'listops' \(source=generated\) built an empty validation split"):
        task.load(tmp_path)
    assert not task.cache_path(tmp_path).exists()
    assert not [p for p in (tmp_path / "listops").iterdir() if p.is_dir()]  # no temporary folder left either


def test_a_truncated_arrow_file_is_rebuilt_once_naming_the_cache(tmp_path, caplog):
    src = write_listops(tmp_path / "lra")
    dsd, info = lra_task(src).load(tmp_path / "cache")
    arrow = next(Path(info.cache_path, "data", "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="harness.data.task"):
        again, info2 = lra_task(src).load(tmp_path / "cache")
    messages = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(messages) == 1 and info.cache_path in messages[0] and "rebuilding" in messages[0]
    assert info2.fingerprint == info.fingerprint and list(again["train"]["label"]) == [9, 2, 3]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.data.task"):
        lra_task(src).load(tmp_path / "cache")
    assert "cannot be read" not in caplog.text  # repaired for good


def test_a_deleted_split_or_broken_meta_is_rebuilt(tmp_path):
    import shutil

    src = write_listops(tmp_path / "lra")
    _, info = lra_task(src).load(tmp_path / "cache")
    shutil.rmtree(Path(info.cache_path, "data", "test"))
    assert lra_task(src).load(tmp_path / "cache")[1].sizes["test"] == 3
    Path(info.cache_path, "meta.json").write_text('{"source": "lra"')  # truncated JSON
    assert lra_task(src).load(tmp_path / "cache")[1].fingerprint == info.fingerprint


def test_a_cache_unreadable_even_after_its_rebuild_is_an_error_naming_it(tmp_path, monkeypatch):
    import datasets

    src = write_listops(tmp_path / "lra")
    task = lra_task(src)
    task.load(tmp_path / "cache")

    def broken(*args, **kwargs):
        raise OSError("Expected to be able to read 4808 bytes for message body, got 2064")

    monkeypatch.setattr(datasets, "load_from_disk", broken)  # the disk keeps failing
    with pytest.raises(
        DataSourceError,
        match=rf"data cache {task.cache_path(tmp_path / 'cache')} was just built but "
        rf"cannot be read \(OSError: Expected",
    ):
        task.load(tmp_path / "cache")


# ----------------------------------------------------------------------------- orphans and concurrent builds


def test_orphaned_temporary_folders_are_removed_unless_a_build_holds_their_lock(tmp_path):
    root = tmp_path / "cache" / "listops"
    orphan = root / ".lra-0123456789ab-k2j3h4g5"  # left by a killed build of lra-0123456789ab
    (orphan / "data").mkdir(parents=True)
    busy = root / ".lra-ba9876543210-q1w2e3r4"  # another build is writing it now
    (busy / "data").mkdir(parents=True)
    with cache_lock(root / "lra-ba9876543210"):
        assert remove_orphans(root) == [orphan]
        assert busy.exists() and not orphan.exists()
        src = write_listops(tmp_path / "lra")
        lra_task(src).load(tmp_path / "cache")  # a load cleans up too, and leaves the busy one alone
        assert busy.exists()
    remove_orphans(root)
    assert not busy.exists()


@dataclass
class SlowConfig:
    counter: str = ""  # file that gets one line per build
    seconds: float = 0.5


class SlowTask(Task):
    """A task whose build takes a while and counts itself: the race of two first-use builds."""

    name = "slow"
    config_class = SlowConfig

    @property
    def vocab_size(self) -> int:
        return 4

    def build(self):
        import datasets

        with open(self.cfg.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(self.cfg.seconds)
        return datasets.DatasetDict(
            {
                s: datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "label": [0, 1]})
                for s in ("train", "validation", "test")
            }
        )


def _load_after(start: float, cfg: SlowConfig, cache: str, out) -> None:
    try:
        time.sleep(max(0.0, start - time.time()))
        _, info = SlowTask(cfg).load(cache)
        out.put(("ok", info.fingerprint, info.cache_path))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(("failed", f"{type(exc).__name__}: {exc}", ""))


def test_concurrent_first_use_builds_in_four_processes_build_once_and_all_load(tmp_path):
    ctx = multiprocessing.get_context("fork")  # children start at once (no re-import)
    out = ctx.Queue()
    cfg = SlowConfig(counter=str(tmp_path / "builds.txt"))
    start = time.time() + 0.3
    procs = [ctx.Process(target=_load_after, args=(start, cfg, str(tmp_path / "cache"), out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r[0] for r in results] == ["ok"] * 4, results
    assert len({r[1] for r in results}) == 1 and len({r[2] for r in results}) == 1
    assert len((tmp_path / "builds.txt").read_text().splitlines()) == 1  # the others waited, then loaded
    assert not [p for p in (tmp_path / "cache" / "slow").iterdir() if p.is_dir() and p.name.startswith(".")]
