"""`vlpcache merge`: caches extracted apart (a cache per array task) brought into one, on real HDF5 caches."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broken_media import damage_chunk
from test_cache import SETTINGS, random_item
from vlpcache.cache.merge import PARTIAL_SUFFIX, merge_caches
from vlpcache.cache.reader import DamagedShard, RegionCache
from vlpcache.cache.schema import SHARD_DIR, CacheSettings
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import UserError


def write(cache_dir: Path, ids: list[str], seed: int, writer_name: str = "s0of1", settings: CacheSettings = SETTINGS,
          folder: str = "/data") -> None:
    """Items of `ids` from files under `folder`, two to a shard."""
    with ShardWriter(cache_dir, settings, writer_name=writer_name, max_items=2) as writer:
        for i, item_id in enumerate(ids):
            writer.add(item_id, f"{folder}/{item_id}.mp4", "video", random_item(seed + i, settings))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and "locks" not in p.parts}


def two_tasks(tmp_path: Path) -> tuple[Path, Path]:
    """Two caches of one collection, as two array tasks wrote them: items dropped by --prune, found damaged,
    failed and moved in each."""
    a, b = tmp_path / "cache-0", tmp_path / "cache-1"
    write(a, ["a0", "a1", "a2", "a3", "a4"], seed=0)
    write(b, ["b0", "b1", "b2"], seed=10)  # the same writer name: s0of1-00000.h5 in both
    cache = RegionCache(a)
    with ShardWriter(a, SETTINGS, writer_name="pruner") as writer:
        # a path holding U+0085, which str.splitlines takes for a line end: the record was not renamed with its shard
        writer.record_removals([("a2", cache.row_of("a2"), "/data/a2\u0085.mp4", "gone")])  # extract --prune
        writer.record_failure("a9", "/data/a9.mp4", "invalid data")
    with ShardWriter(b, SETTINGS, writer_name="mover") as writer:
        writer.record_move("b1", "/data/b1.mp4", "/moved/b1.mp4")
    damage_chunk(b / SHARD_DIR / "s0of1-00001.h5", "features", 0)  # b2's row
    with pytest.raises(DamagedShard):
        RegionCache(b).get("b2")  # found damaged: recorded in b
    return a, b


def test_caches_of_array_tasks_merge_into_one_that_reads_each_item_as_its_source_does(tmp_path, capsys):
    a, b = two_tasks(tmp_path)
    sources = {a: files_of(a), b: files_of(b)}
    target = tmp_path / "cache"
    summary = merge_caches([a, b], target, progress=False)
    said = capsys.readouterr().err
    merged = RegionCache(target)
    assert sorted(merged.ids) == ["a0", "a1", "a3", "a4", "b0", "b1"] == sorted(RegionCache(a).ids + RegionCache(b).ids)
    for source in (RegionCache(a), RegionCache(b)):
        for item_id in source.ids:
            ours, theirs = merged.get(item_id), source.get(item_id)
            assert ours["path"] == theirs["path"] and ours["kind"] == theirs["kind"]
            for name in ("features", "boxes", "labels", "region_mask", "frame_mask", "timestamps"):
                np.testing.assert_array_equal(ours[name], theirs[name])
    # what the sources leave out and why comes along: dropped (--prune), damaged, failed, moved
    assert list(merged.removed) == ["a2"] and list(merged.damaged) == ["b2"]
    assert merged.left_out_line("a2").startswith("'a2' was dropped from the cache ")
    assert list(merged.failures) == ["a9"] and merged.get("b1")["path"] == "/moved/b1.mp4"
    # linked, not copied (one filesystem); the sources untouched
    assert summary["shards"] == {"linked": 5, "copied": 0, "present": 0} and summary["items"] == 6
    shards = sorted((target / SHARD_DIR).iterdir())
    assert len(shards) == 5 and all(s.stat().st_nlink == 2 for s in shards)
    assert {a: files_of(a), b: files_of(b)} == sources
    assert said.strip().endswith(f"merge: {target} holds 6 videos from 2 cache(s): 5 shard(s) linked; the sources are "
                                 f"unchanged; `vlpcache index --cache {target}` indexes it")
    # run again: nothing new to bring; a shard committed since in a source comes in
    write(b, ["b3"], seed=20, writer_name="s1of2")
    again = merge_caches([a, b], target, progress=False)
    assert again["shards"] == {"linked": 1, "copied": 0, "present": 5} and "b3" in RegionCache(target).ids
    assert len(list((target / SHARD_DIR).iterdir())) == 6


@pytest.fixture
def other_filesystem(tmp_path):
    """A folder on another filesystem than tmp_path's (the tmpfs of /dev/shm): no hard links across."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev):
        pytest.skip("no writable /dev/shm on another filesystem than the tests' temporary folder")
    folder = shm / f"vlpcache-merge-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_merge_across_filesystems_copies_and_one_stopped_midway_finishes_when_run_again(tmp_path, other_filesystem,
                                                                                         monkeypatch, capsys):
    a, b = two_tasks(tmp_path)
    target = other_filesystem / "cache"
    copies = []
    copy = shutil.copyfile

    def copied_then_stopped(source, dest):
        copies.append(dest)
        if len(copies) == 3:  # Ctrl-C (or kill -9) while the third shard is being copied
            Path(dest).write_bytes(b"part of a shard")
            raise KeyboardInterrupt
        return copy(source, dest)

    monkeypatch.setattr(shutil, "copyfile", copied_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        merge_caches([a, b], target, progress=False)
    landed = sorted(p.name for p in (target / SHARD_DIR).iterdir())
    assert len(landed) == 2 and not any(name.endswith(PARTIAL_SUFFIX) for name in landed)  # whole shards, no part
    assert sorted(RegionCache(target).ids) == ["a0", "a1", "a3"]  # readable as it is (a2: dropped in its source)
    (target / SHARD_DIR / ("x.h5" + PARTIAL_SUFFIX)).write_bytes(b"a kill -9's part")  # as a kill -9 leaves it
    summary = merge_caches([a, b], target, progress=False)
    assert summary["shards"] == {"linked": 0, "copied": 3, "present": 2} and summary["bytes_copied"] > 0
    assert not list((target / SHARD_DIR).glob(f"*{PARTIAL_SUFFIX}"))
    assert sorted(RegionCache(target).ids) == ["a0", "a1", "a3", "a4", "b0", "b1"]
    assert all(s.stat().st_nlink == 1 for s in (target / SHARD_DIR).iterdir())  # copies
    assert ", 3 copied (" in capsys.readouterr().err


def test_a_full_disk_during_a_merge_is_one_line_and_keeps_what_landed(tmp_path, other_filesystem, monkeypatch):
    a, b = two_tasks(tmp_path)
    target = other_filesystem / "cache"
    copy, copies = shutil.copyfile, []

    def full(source, dest):
        copies.append(dest)
        if len(copies) == 2:
            Path(dest).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(source, dest)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(UserError) as err:
        merge_caches([a, b], target, progress=False)
    assert "No space left on device (ENOSPC)" in str(err.value) and str(err.value).endswith(
        "the shards merged before are kept; make room and run the same command again to bring the rest")
    assert [p.name for p in (target / SHARD_DIR).iterdir()] == [Path(copies[0]).name[:-len(PARTIAL_SUFFIX)]]
    monkeypatch.setattr(shutil, "copyfile", copy)
    assert merge_caches([a, b], target, progress=False)["shards"] == {"linked": 0, "copied": 4, "present": 1}


def test_a_merge_refuses_other_settings_ids_of_other_files_and_the_target_itself_writing_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, ["x", "y"], seed=0)
    write(b, ["y", "z"], seed=5, folder="/other")  # y: another file under the same id
    target = tmp_path / "cache"
    with pytest.raises(UserError, match=r"^1 id\(s\) name other files in two of the caches, e.g. 'y': /data/y.mp4 in "
                                        rf"{a}, /other/y.mp4 in {b}; .*nothing was written$"):
        merge_caches([a, b], target, progress=False)
    assert not target.exists()
    shutil.rmtree(b)
    write(b, ["y", "z"], seed=5)  # y: the same file (overlapping extracts): read once
    merge_caches([a, b], target, progress=False)
    assert sorted(RegionCache(target).ids) == ["x", "y", "z"]
    four = tmp_path / "four"
    write(four, ["w"], seed=1, settings=dataclasses.replace(SETTINGS, frames=4))
    for sources, said in (([a, four], f"{four} holds other region features than {a} (frames: 4 != 3)"),
                          ([four], f"{target} holds other region features than {four} (frames: 3 != 4)"),
                          ([a, target], f"{target} is the target itself"),
                          ([a, tmp_path / "a/"], f"{a} is given twice"),
                          ([tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: not a vlpcache cache")):
        before = files_of(target)
        with pytest.raises(UserError) as err:
            merge_caches(sources, target, progress=False)
        assert str(err.value).startswith(said), str(err.value)
        assert files_of(target) == before


def test_a_cache_and_its_copy_merge_where_one_grew_and_are_refused_where_both_did(tmp_path):
    """A copy keeps its cache's collection id, which names what a merge brings: copies that both wrote since
    collided (a shard "replaced since an earlier merge?"), and the copy's records replaced its original's."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, ["x", "y", "z"], seed=0)  # two shards
    with ShardWriter(a, SETTINGS, writer_name="s0of1") as writer:
        writer.record_failure("old", "/data/old.mp4", "invalid data")
    shutil.copytree(a, b)
    with ShardWriter(b, SETTINGS, writer_name="s0of1", max_items=2) as writer:  # the copy grows: a shard, a failure
        writer.add("w", "/data/w.mp4", "video", random_item(9, SETTINGS))
        writer.record_failure("bad", "/data/bad.mp4", "invalid data")
    for order in ([b, a], [a, b]):  # the original's log is what the copy's was: the longer stays either way
        target = tmp_path / f"merged-{order[0].name}"
        merge_caches(order, target, progress=False)
        merged = RegionCache(target)
        assert sorted(merged.ids) == ["w", "x", "y", "z"] and sorted(merged.failures) == ["bad", "old"]
    with ShardWriter(a, SETTINGS, writer_name="s0of1", max_items=2) as writer:  # the original grows too
        writer.add("v", "/data/v.mp4", "video", random_item(7, SETTINGS))
    target = tmp_path / "both"
    with pytest.raises(UserError, match=rf"^{a} and {b} are copies of one cache that have both grown since \(each has "
                                        r"its own shard s0of1-00002\.h5\): .* nothing was written$"):
        merge_caches([a, b], target, progress=False)
    assert not target.exists()
    c = tmp_path / "c"  # a copy whose shards stay as they were, and whose failures went another way than a's
    shutil.copytree(a, c)
    for cache, item_id in ((a, "a1"), (c, "c1")):
        with ShardWriter(cache, SETTINGS, writer_name="s0of1") as writer:
            writer.record_failure(item_id, f"/data/{item_id}.mp4", "invalid data")
    with pytest.raises(UserError, match=rf"^{a} and {c} are copies of one cache that have both grown since \(each has "
                                        r"its own records in failures/s0of1\.jsonl\): "):
        merge_caches([a, c], target, progress=False)
    assert not target.exists()


def test_a_record_file_that_does_not_read_is_one_line_and_the_shards_still_come(tmp_path, capsys):
    a = tmp_path / "a"
    write(a, ["x", "y"], seed=0)
    (a / "failures" / "s1of2.jsonl").mkdir()  # as unreadable as another user's log written with a umask of 077
    (a / SHARD_DIR / "s1of2-00000.h5").write_bytes(b"not HDF5")  # a shard the source itself leaves out
    summary = merge_caches([a], tmp_path / "cache", progress=False)
    assert summary["items"] == 2 and sorted(RegionCache(tmp_path / "cache").ids) == ["x", "y"]
    assert summary["shards"]["linked"] == 1 and not (tmp_path / "cache" / SHARD_DIR / "s1of2-00000.h5").exists()
    assert (f"{a / 'failures' / 's1of2.jsonl'}: not merged, it does not read (Is a directory (EISDIR)); its records "
            f"(failures, moves, items dropped or found damaged) stay out of {tmp_path / 'cache'}") in (said := capsys.readouterr().err)
    assert "; 1 shard(s) the sources leave out themselves (said above) stay out; " in said
    assert f"{a / SHARD_DIR / 's1of2-00000.h5'}: unreadable shard (" in said  # the source's reader said it


def test_a_second_merge_into_a_cache_being_merged_into_stops_at_once_naming_the_first(tmp_path):
    from vlpcache.cache.merge import MERGE_WRITER
    from vlpcache.cache.writer import lock_path
    from vlpcache.locks import WriterLock

    a = tmp_path / "a"
    write(a, ["x"], seed=0)
    lock_path(tmp_path / "cache", MERGE_WRITER).parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vlpcache.locks import WriterLock; lock = WriterLock.take(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(lock_path(tmp_path / "cache", MERGE_WRITER))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"^{tmp_path / 'cache'}: another merge into it is running \(pid "
                                            rf"{holder.pid} on .*\); wait for it to finish"):
            merge_caches([a], tmp_path / "cache", progress=False)
        assert not (tmp_path / "cache" / SHARD_DIR).exists()
    finally:
        holder.kill()
        holder.wait()
    freed = WriterLock.take(lock_path(tmp_path / "cache", MERGE_WRITER))  # the kernel freed it with its holder
    assert freed is not None
    freed.release()
    merge_caches([a], tmp_path / "cache", progress=False)
    assert RegionCache(tmp_path / "cache").ids == ["x"]


def test_a_merge_and_an_extract_into_one_cache_at_once_the_second_to_start_is_refused(tmp_path):
    # each checked ids against the cache as it was: an extract and a merge at once left one id cached from two
    # files (the merged rows hidden), where one after the other refuses the clash
    from vlpcache.cache.merge import MERGE_WRITER
    from vlpcache.cache.writer import take_writer_lock

    a, cache = tmp_path / "a", tmp_path / "cache"
    write(a, ["x"], seed=0)
    write(cache, ["y"], seed=1)
    with ShardWriter(cache, SETTINGS, writer_name="s0of2"):  # an extract at work on it
        with pytest.raises(UserError, match=rf"^{cache}: an extract is writing it \(pid {os.getpid()} on .*\); wait "
                                            "for it to finish, then merge"):
            merge_caches([a], cache, progress=False)
    with take_writer_lock(cache, MERGE_WRITER):  # a merge at work on it
        with pytest.raises(UserError, match=rf"^{cache}: a merge into it is running \(pid {os.getpid()} on .*\); "
                                            "wait for it to finish, then extract$"):
            ShardWriter(cache, SETTINGS, writer_name="s0of1")
    merge_caches([a], cache, progress=False)  # one after the other
    assert sorted(RegionCache(cache).ids) == ["x", "y"]


def test_merge_command_then_index_reads_the_merged_collection(tmp_path, monkeypatch, capsys):
    from vlpcache.cli import main

    a, b = tmp_path / "cache-0", tmp_path / "cache-1"
    write(a, ["a0", "a1"], seed=0)
    write(b, ["b0"], seed=3)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(sys, "argv", ["vlpcache", "merge", str(a), str(b), "--quiet"])
    main()  # returns where the command succeeds
    assert sorted(RegionCache(tmp_path / "ws" / "cache").ids) == ["a0", "a1", "b0"]  # the workspace's cache by default
    assert capsys.readouterr().err.startswith(f"merge: {tmp_path / 'ws' / 'cache'} holds 3 videos from 2 cache(s)")
