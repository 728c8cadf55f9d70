"""The HDF5 region cache: schema, crash-safe shard writer, lazy reader."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import unicodedata
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import (LOCK_DIR, MANIFEST_NAME, SCHEMA_VERSION, SHARD_DIR, SHARD_SECONDS, STRINGS,
                                   CacheSettings, empty_item)
from vlpcache.cache.manifest import passed_over_path, read_failures, read_passed_over
from vlpcache.records import json_lines
from vlpcache.cache.writer import ShardWriter
from vlpcache.errors import UserError
from as_a_shell import as_a_shell_starts_it
from broken_media import damage_chunk
from hdf5_format import layout_message_versions, set_layout_message_versions, superblock_version
from waiting import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
SETTINGS = CacheSettings(frames=3, regions=4, feature_dim=8, detector="test", detector_weights_sha256="d" * 64,
                         backbone="test", backbone_weights_sha256="b" * 64)


def random_item(seed: int, settings: CacheSettings = SETTINGS) -> dict:
    rng = np.random.default_rng(seed)
    item = empty_item(settings)
    item["features"][:] = rng.standard_normal(item["features"].shape)
    item["boxes"][:] = np.sort(rng.random(item["boxes"].shape), axis=-1)
    item["scores"][:] = rng.random(item["scores"].shape)
    item["labels"][:] = rng.integers(-1, 80, item["labels"].shape)
    item["region_mask"][:] = rng.random(item["region_mask"].shape) > 0.3
    item["frame_mask"][:2] = True
    item["timestamps"][:3] = [0.5, 1.5, 0.0]
    item["frame_size"][:] = [240, 320]
    item["duration"][...] = 3.0
    return item


def write_items(cache_dir, ids, writer_name="s0of1", **kwargs):
    with ShardWriter(cache_dir, SETTINGS, writer_name=writer_name, **kwargs) as writer:
        for i, item_id in enumerate(ids):
            writer.add(item_id, f"/data/{item_id}.mp4", "video", random_item(i))


def test_written_items_read_back_identical_by_index_and_id(tmp_path):
    write_items(tmp_path, ["a", "b/ü n", "c"])
    cache = RegionCache(tmp_path)
    assert len(cache) == 3 and cache.ids == ["a", "b/ü n", "c"]
    for i, item_id in enumerate(cache.ids):
        expected = random_item(i)
        got = cache.get(item_id)
        for spec in cache.settings.arrays():
            assert got[spec.name].dtype == spec.dtype
            np.testing.assert_array_equal(got[spec.name], expected[spec.name].astype(spec.dtype))
        assert got["path"] == f"/data/{item_id}.mp4" and got["kind"] == "video"
    assert cache[1]["id"] == "b/ü n"


def test_an_id_typed_in_the_other_unicode_normal_form_reads_the_one_item_held_so(tmp_path):
    # cache["café"] typed composed (NFC) of an item extracted from a decomposed (NFD) file name was a KeyError,
    # where Searcher.like found it
    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    write_items(tmp_path / "one", [nfd, "x"])
    cache = RegionCache(tmp_path / "one")
    assert nfc in cache and cache[nfc]["id"] == nfd and cache.get(nfc, "features")["id"] == nfd
    assert cache.index_of(nfc) == 0 and "cafe" not in cache
    composed, decomposed, mixed = "\u00e9\u00fc", "e\u0301u\u0308", "\u00e9u\u0308"  # "éü": NFC, NFD, neither
    write_items(tmp_path / "both", [composed, decomposed])  # two files whose names differ in form alone
    both = RegionCache(tmp_path / "both")
    assert (both.index_of(composed), both.index_of(decomposed)) == (0, 1) and mixed not in both  # which one: neither
    with pytest.raises(KeyError):
        both[mixed]


def test_a_shard_says_its_times_count_from_the_files_start_and_an_older_one_reads_as_from_the_videos(tmp_path):
    # caches written before counted a video's times from its video stream's first frame: their thumbnails are read
    # back at that count (serve), where the video starts after another stream
    from vlpcache.cache.schema import TIMES_ATTR, TIMES_FROM_FILE, TIMES_FROM_VIDEO

    write_items(tmp_path, ["a"])
    assert RegionCache(tmp_path).get("a")["times_from"] == TIMES_FROM_FILE
    [shard] = (tmp_path / SHARD_DIR).glob("*.h5")
    with h5py.File(shard, "r+") as f:
        del f.attrs[TIMES_ATTR]
    cache = RegionCache(tmp_path)
    assert cache.get("a")["times_from"] == TIMES_FROM_VIDEO == cache.blank("a")["times_from"]
    assert cache.get("a", "boxes")["times_from"] == TIMES_FROM_VIDEO


def test_reading_some_arrays_of_an_item_gives_those_alone_equal_to_a_full_read(tmp_path):
    write_items(tmp_path, ["a", "b", "c"])
    cache = RegionCache(tmp_path)
    part = cache.get("b", ("labels", "boxes"))
    assert set(part) == {"labels", "boxes", "id", "path", "kind", "source", "times_from"}
    full = cache.get("b")
    assert np.array_equal(part["labels"], full["labels"]) and np.array_equal(part["boxes"], full["boxes"])


def test_attribute_arrays_are_written_and_read_only_in_caches_whose_detector_labels_attributes(tmp_path):
    with_attributes = dataclasses.replace(SETTINGS, detector="vg:test", attributes=True)
    item = random_item(0, with_attributes)
    item["attributes"][:] = np.arange(12).reshape(3, 4) - 1
    item["attribute_scores"][:] = 0.25
    with ShardWriter(tmp_path / "vg", with_attributes) as writer:
        writer.add("a", "/data/a.mp4", "video", item)
    got = RegionCache(tmp_path / "vg").get("a")
    np.testing.assert_array_equal(got["attributes"], item["attributes"])
    assert got["attributes"].dtype == np.int16 and np.all(got["attribute_scores"] == np.float16(0.25))

    write_items(tmp_path / "coco", ["a"])  # a cache without them, as every cache before the vg detector
    plain = RegionCache(tmp_path / "coco")
    assert not plain.settings.attributes and "attributes" not in plain.get("a")
    (shard,) = (tmp_path / "coco" / SHARD_DIR).glob("*.h5")
    with h5py.File(shard) as f:
        assert "attributes" not in f and "attribute_scores" not in f


def test_a_cache_from_before_attribute_arrays_reads_as_one_without_them(tmp_path):
    write_items(tmp_path, ["a"])
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"attributes": false,', ""))
    assert "attributes" not in manifest.read_text()
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    with h5py.File(shard, "r+") as f:
        del f.attrs["attributes"]  # as vlpcache wrote shards before the setting existed
    write_items(tmp_path, ["b"], writer_name="s1of2")  # the same settings: more may be added
    cache = RegionCache(tmp_path)
    assert not cache.settings.attributes and cache.ids == ["a", "b"]


def test_notes_of_items_kept_despite_problems_are_read_back_and_shards_from_before_notes_have_none(tmp_path):
    with ShardWriter(tmp_path, SETTINGS) as writer:
        writer.add("a", "/data/a.mp4", "video", random_item(0))
        writer.add("b", "/data/b", "frames", random_item(1), note="1 of 12 frames unreadable, e.g. 4.jpg: corrupt")
    (old,) = (tmp_path / SHARD_DIR).glob("*.h5")
    write_items(tmp_path, ["c"], writer_name="s1of2")
    with h5py.File(old, "r") as f:
        assert list(f["notes"].asstr()[:]) == ["", "1 of 12 frames unreadable, e.g. 4.jpg: corrupt"]
    write_items(tmp_path / "old", ["d"])
    (before,) = (tmp_path / "old" / SHARD_DIR).glob("*.h5")
    with h5py.File(before, "r+") as f:
        del f["notes"]  # as vlpcache wrote shards before notes existed
    shutil.copy(before, tmp_path / SHARD_DIR / "s0of2-00000.h5")  # one cache: shards with and without notes
    cache = RegionCache(tmp_path)
    assert sorted(cache.ids) == ["a", "b", "c", "d"]
    assert cache.notes == {"b": "1 of 12 frames unreadable, e.g. 4.jpg: corrupt"}
    assert [cache.note_of(i) for i in ("a", "b", "c", "d")] == ["", cache.notes["b"], "", ""]


def test_shard_is_chunked_one_video_per_chunk_with_provenance(tmp_path):
    write_items(tmp_path, ["a", "b"])
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    with h5py.File(shard) as f:
        assert f["features"].chunks == (1, 3, 4, 8)
        assert f["features"].dtype == np.float16
        assert f.attrs["schema_version"] == SCHEMA_VERSION and f.attrs["frames"] == 3
        assert f.attrs["detector_weights_sha256"] == "d" * 64 and "vlpcache_version" in f.attrs


def test_a_reader_keeps_a_bounded_number_of_shards_open_and_reads_every_item_right(tmp_path, monkeypatch):
    # each open shard holds about 0.8 MB of HDF5's own: an epoch over WebVid's 5,000 shards held 4 GB a process
    monkeypatch.setenv("VLPCACHE_OPEN_SHARDS", "3")
    ids = [f"v{i}" for i in range(14)]
    write_items(tmp_path, ids, max_items=2)  # 7 shards
    cache = RegionCache(tmp_path)
    fds = len(os.listdir("/proc/self/fd"))
    order = np.random.default_rng(0).permutation([*range(14), *range(14)])
    for i in order:  # an epoch's random order, twice over: shards closed and opened again
        got = cache.get(ids[i])
        np.testing.assert_array_equal(got["features"], random_item(i)["features"].astype(np.float16))
        assert len(cache._handles) <= 3
    assert len(os.listdir("/proc/self/fd")) <= fds + 3
    assert cache.notes == {} and len(cache._handles) == 3  # a walk over every shard too
    cache.close()
    assert len(os.listdir("/proc/self/fd")) <= fds  # let go, the files are closed
    monkeypatch.setenv("VLPCACHE_OPEN_SHARDS", "none")
    with pytest.raises(UserError, match="VLPCACHE_OPEN_SHARDS='none': give how many shard files"):
        RegionCache(tmp_path)


def test_shards_commit_after_max_items_and_reader_sees_union(tmp_path):
    write_items(tmp_path, [f"v{i}" for i in range(5)], max_items=2)
    write_items(tmp_path, ["w0", "w1"], writer_name="s1of2")
    assert len(list((tmp_path / SHARD_DIR).glob("*.h5"))) == 4
    assert sorted(RegionCache(tmp_path).ids) == sorted([f"v{i}" for i in range(5)] + ["w0", "w1"])


def test_a_shard_is_committed_once_its_time_is_up_however_few_items_it_holds(tmp_path):
    def shard_files(cache_dir):
        return sorted(p.name for p in (cache_dir / SHARD_DIR).iterdir())

    with ShardWriter(tmp_path / "due", SETTINGS, max_items=100, max_seconds=0.0) as writer:  # always due
        for i in range(3):
            writer.add(f"v{i}", "/v", "video", random_item(i))
            assert shard_files(tmp_path / "due") == [f"s0of1-{n:05d}.h5" for n in range(i + 1)]  # no .tmp left
        assert writer.pending_items == 0
    with ShardWriter(tmp_path / "later", SETTINGS, max_items=100, max_seconds=HANG_GUARD_S) as writer:  # never due
        for i in range(3):
            writer.add(f"v{i}", "/v", "video", random_item(i))
        assert shard_files(tmp_path / "later") == ["s0of1-00000.h5.tmp"] and writer.pending_items == 3
    assert shard_files(tmp_path / "later") == ["s0of1-00000.h5"] and len(RegionCache(tmp_path / "later")) == 3
    assert SHARD_SECONDS == 120  # the README's "a shard is also committed every 2 minutes"


def start_writer_and_stop_mid_shard(cache_dir, writer_name="s0of1") -> subprocess.Popen:
    """A writer process that has one item in its unfinished shard, waiting to be killed."""
    script = ("import time; from vlpcache.cache.writer import ShardWriter; from vlpcache.cache.schema import *\n"
              f"settings = CacheSettings.from_json({SETTINGS.to_json()!r})\n"
              f"writer = ShardWriter({str(cache_dir)!r}, settings, writer_name={writer_name!r})\n"
              "writer.add('lost', '/x', 'video', empty_item(settings)); writer._file.flush()\n"
              "print('ready', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_a_writer_of_another_shard_count_is_refused_while_one_writes(tmp_path):
    # --shard 0/1 and 0/2 at once both extracted the items they share: 17 of 35 stored twice
    with ShardWriter(tmp_path, SETTINGS, writer_name="s0of2") as first:
        first.add("a", "/a", "video", random_item(0))
        with pytest.raises(UserError) as err:
            ShardWriter(tmp_path, SETTINGS, writer_name="s0of1")
        assert str(err.value).startswith(f"{tmp_path}: an extract with --shard 0/2 is writing it (pid {os.getpid()} on ")
        assert str(err.value).endswith("--shard 0/1 would extract some of its items too, and the cache would hold them "
                                       "twice: wait for it to finish, or give every job that fills this cache the same n "
                                       "(--shard i/2)")
        with ShardWriter(tmp_path, SETTINGS, writer_name="s1of2") as second:  # the other share: welcome
            second.add("b", "/b", "video", random_item(1))
    with ShardWriter(tmp_path, SETTINGS, writer_name="s0of1") as later:  # once it ended
        later.add("c", "/c", "video", random_item(2))
    assert sorted(RegionCache(tmp_path).ids) == ["a", "b", "c"]


def test_a_second_writer_of_the_same_shards_is_refused_naming_the_holder(tmp_path):
    with ShardWriter(tmp_path, SETTINGS) as first:
        first.add("a", "/a", "video", random_item(0))
        with pytest.raises(UserError, match=rf"shards s0of1-\* are being written by pid {os.getpid()} on "
                                            rf"{socket.gethostname()} \(since .*its own -o DIR; to fill one cache from "
                                            r"several jobs at once, give every job the same ROOTs and its own "
                                            r"--shard i/n \(README: Slurm without Ray\)"):
            ShardWriter(tmp_path, SETTINGS)
        assert first._tmp_path.exists()  # the refused writer removed nothing
    assert RegionCache(tmp_path).ids == ["a"]


def test_a_writer_waiting_on_a_lock_holds_the_file_that_is_there_once_the_holder_removes_its_own(tmp_path):
    # the holder removes its lock file on release: a waiter woken on that removed file guards nothing, and
    # must take the lock of the file that is there, so that a third writer is refused, not let in beside it
    import threading

    from vlpcache.locks import WriterLock

    path = tmp_path / "shards.lock"
    first, taken = WriterLock.take(path), []
    waiter = threading.Thread(target=lambda: taken.append(WriterLock.take(path, wait=True)), daemon=True)
    waiter.start()
    waiter.join(0.3)  # blocked in flock on the holder's file
    assert waiter.is_alive() and not taken
    first.release()
    waiter.join(HANG_GUARD_S)
    [second] = taken
    assert second.held and path.exists() and os.stat(path).st_ino == os.fstat(second._fd).st_ino
    assert WriterLock.take(path) is None  # the one lock of that name is held: nobody else is let in
    second.release()
    assert not path.exists()
    with WriterLock.take(path) as third:
        assert third.held


AS_ANOTHER_USER = """import os, sys
from pathlib import Path
from vlpcache.locks import WriterLock  # imported while still root: the other user may not read root's files
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([gid])
os.setgid(gid)
os.setuid(uid)
os.umask(0o002)  # a group-shared project's
folder = Path(sys.argv[3])
"""


def _as_user(uid: int, gid: int, folder: Path, act: str) -> subprocess.CompletedProcess:
    """`act` (Python code that sees `folder` and WriterLock) run as another Unix user (root only), by a new process
    that imports first and then becomes that user (the interpreter may live in /root): not a fork of this test
    process, whose other threads' objects the forked child freed (an av frame reformatter waited for ever there)."""
    return subprocess.run([sys.executable, "-c", AS_ANOTHER_USER + act, str(uid), str(gid), str(folder)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as two other Unix users")
def test_a_lock_left_by_another_user_of_a_shared_group_is_taken_over(tmp_path):
    # a group-shared cache (umask 002, a setgid folder): a killed extract's lock file was made 644 whatever the
    # umask, and every extract of the group's other users then failed, "locks/s0of2.lock: cannot write (EACCES)"
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="vlpcache-group-"))
    try:
        os.chown(folder, 0, 5000)
        folder.chmod(0o2775)
        left_by_a_kill = ("held = WriterLock.take(folder / 's0of2.lock')\n"
                          "os.close(os.open(folder / 'old.lock', os.O_RDWR | os.O_CREAT, 0o644))  # as an older vlpcache left it\n"
                          "os._exit(0 if held else 1)  # killed holding the lock: the kernel frees it, the file stays\n")
        takes_them = "os._exit(0 if all(WriterLock.take(folder / name) for name in ('s0of2.lock', 'old.lock')) else 1)\n"
        killed = _as_user(5001, 5000, folder, left_by_a_kill)
        assert killed.returncode == 0, killed.stderr
        assert (folder / "s0of2.lock").stat().st_mode & 0o777 == 0o664 and (folder / "s0of2.lock").stat().st_uid == 5001
        taken = _as_user(5002, 5000, folder, takes_them)
        assert taken.returncode == 0, taken.stderr  # PermissionError: exit 1 and its traceback
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="no kernel lock table (/proc/locks): not Linux")
def test_whether_a_lock_is_held_is_asked_of_the_kernel_without_taking_it(tmp_path, monkeypatch):
    from vlpcache import locks

    path = tmp_path / "pretrain.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vlpcache.locks import WriterLock; "
                               "lock = WriterLock.take(sys.argv[1]); print('held', flush=True); time.sleep(600)", path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        record = locks.holder_of(path)
        assert locks.lock_held(path) is True and locks.holder_active(path, record)
        assert locks.WriterLock.take(path) is None  # still held: the look took nothing
    finally:
        kill_9(holder)
    assert locks.lock_held(path) is False and not locks.holder_active(path, record)
    # a live process given the dead holder's pid (a restarted container, pids wrapped) holds no lock: gone
    alive = dataclasses.replace(record, pid=os.getpid())
    assert locks.process_alive(alive.pid) and not locks.holder_active(path, alive)
    # the table gives the file system's device, which a btrfs subvolume's stat does not: the inode decides;
    # a waiter's line ("->") is not a holder
    inode, table = os.stat(path).st_ino, tmp_path / "locks"
    table.write_text(f"1: FLOCK  ADVISORY  WRITE 1 00:99:{inode} 0 EOF\n")
    monkeypatch.setattr(locks, "PROC_LOCKS", str(table))
    assert locks.lock_held(path) is True and locks.holder_active(path, record)
    table.write_text(f"1: FLOCK  ADVISORY  WRITE 1 00:99:{inode + 1} 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 1 00:99:{inode} 0 EOF\n")
    assert locks.lock_held(path) is False and not locks.holder_active(path, alive)
    # no table to ask: whether the recorded process exists decides, as before
    monkeypatch.setattr(locks, "PROC_LOCKS", str(tmp_path / "absent"))
    assert locks.lock_held(path) is None and locks.holder_active(path, alive) and not locks.holder_active(path, record)


def test_a_lock_held_by_a_process_of_another_pid_namespace_reads_as_held(tmp_path):
    # a run training in a container with pids of its own on the same host name (Apptainer --pid): /proc/locks
    # there hides the locks of processes outside it, and `inspect RUN` there called the training run stopped
    from vlpcache import locks

    path = tmp_path / "pretrain.lock"
    ask = ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c",
           "import sys; from pathlib import Path; from vlpcache.locks import PROC_LOCKS, lock_held; "
           "print(Path(PROC_LOCKS).read_text().count(' FLOCK '), lock_held(Path(sys.argv[1])))", str(path)]
    with locks.WriterLock.take(path):
        try:
            there = subprocess.run(ask, capture_output=True, text=True, timeout=HANG_GUARD_S)
        except FileNotFoundError:
            pytest.skip("no unshare here")
        if there.returncode != 0 and "Traceback" not in there.stderr:
            pytest.skip(f"no PID namespace of its own here (unshare -p, root only: {there.stderr.strip()[-80:]})")
        assert there.stdout == "0 True\n", there.stderr  # its table lists none of ours
        assert locks.WriterLock.take(path) is None  # the look took nothing
    path.touch()  # released, its file removed: as a holder killed leaves it
    assert subprocess.run(ask, capture_output=True, text=True, timeout=HANG_GUARD_S).stdout == "0 False\n"


def test_a_holder_recorded_on_another_host_is_at_work_while_its_lock_is_held_and_gone_once_it_is_free(tmp_path):
    # a pretrain on another node of a shared workspace killed (a Slurm job cancelled): inspect went on saying
    # "training now: pid N on node2" for ever, since another machine's pids cannot be looked at
    from vlpcache import locks

    path = tmp_path / "pretrain.lock"
    with locks.WriterLock.take(path):
        elsewhere = dataclasses.replace(locks.holder_of(path), host=f"not-{socket.gethostname()}")
        assert elsewhere.elsewhere and locks.holder_active(path, elsewhere)
        assert locks.WriterLock.take(path) is None  # the look took nothing
        path.write_text(json.dumps(vars(elsewhere)))  # what the other node's process wrote, as its holder
        kept = path.read_bytes()
    path.write_bytes(kept)  # its holder killed: the record stays, the lock is free
    assert locks.holder_of(path) == elsewhere and not locks.holder_active(path, elsewhere)


def test_writers_of_other_shards_write_side_by_side(tmp_path):
    with ShardWriter(tmp_path, SETTINGS, "s0of2") as a, ShardWriter(tmp_path, SETTINGS, "s1of2") as b:
        a.add("a", "/a", "video", random_item(0))
        b.add("b", "/b", "video", random_item(1))
    assert sorted(RegionCache(tmp_path).ids) == ["a", "b"]


def test_a_killed_writers_unfinished_shard_is_invisible_and_removed_on_resume(tmp_path):
    victim = start_writer_and_stop_mid_shard(tmp_path)
    assert len(RegionCache(tmp_path)) == 0 and list((tmp_path / SHARD_DIR).glob("*.tmp"))
    kill_9(victim)  # the kernel frees its lock
    ShardWriter(tmp_path, SETTINGS).close()
    assert not list((tmp_path / SHARD_DIR).glob("*.tmp")) and not list((tmp_path / LOCK_DIR).iterdir())


def test_unfinished_shards_of_a_writer_at_work_are_left_alone_and_of_a_dead_one_removed(tmp_path):
    working, dead = start_writer_and_stop_mid_shard(tmp_path, "s0of3"), start_writer_and_stop_mid_shard(tmp_path, "s1of3")
    try:
        kill_9(dead)
        ShardWriter(tmp_path, SETTINGS, "s2of3").close()
        assert [p.name for p in (tmp_path / SHARD_DIR).glob("*.tmp")] == ["s0of3-00000.h5.tmp"]
        assert [p.name for p in (tmp_path / LOCK_DIR).iterdir()] == ["s0of3.lock"]
    finally:
        kill_9(working)


def test_a_complete_shard_under_its_temporary_name_is_not_read(tmp_path):
    write_items(tmp_path, ["a"])
    write_items(tmp_path, ["b"], writer_name="s1of2")
    shard = tmp_path / SHARD_DIR / "s1of2-00000.h5"
    shard.rename(shard.with_name(shard.name + ".tmp"))  # flushed, not yet renamed when its writer died
    assert RegionCache(tmp_path).ids == ["a"]


def test_an_item_stored_twice_is_read_once_from_the_shard_committed_last_or_the_first_of_older_shards(tmp_path):
    write_items(tmp_path, ["a", "b"], writer_name="s0of2")  # random_item(0), random_item(1)
    write_items(tmp_path, ["c", "a"], writer_name="s1of2")  # "a" again (extracted again), as random_item(1)
    cache = RegionCache(tmp_path)
    assert cache.ids == ["a", "b", "c"] and len(cache) == 3 and cache.column("features").shape[0] == 3
    np.testing.assert_array_equal(cache.get("a")["features"], random_item(1)["features"].astype(np.float16))
    np.testing.assert_array_equal(cache.column("features")[0], cache[0]["features"])  # in the first row's place
    np.testing.assert_array_equal(cache.get("c")["features"], random_item(0)["features"].astype(np.float16))
    np.testing.assert_array_equal(cache[2]["features"], cache.get("c")["features"])
    assert cache.committed[0] > cache.committed[1]
    cache.close()
    for shard in (tmp_path / SHARD_DIR).glob("*.h5"):  # as shards written before commit times were kept
        with h5py.File(shard, "a") as f:
            del f.attrs["committed"]
    cache = RegionCache(tmp_path)
    np.testing.assert_array_equal(cache.get("a")["features"], random_item(0)["features"].astype(np.float16))
    assert cache.committed == [0.0] * 3 and cache.sources == [""] * 3


def test_a_refresh_lists_only_the_shards_committed_since_and_reads_as_a_new_reader(tmp_path, monkeypatch):
    # a server's refresh after each commit of a running extract read the ids of every shard again, in the request
    # (2-7 s a search at 200k items)
    write_items(tmp_path, ["a", "b"], writer_name="s0of2")
    write_items(tmp_path, ["c"], writer_name="s1of2")
    cache = RegionCache(tmp_path)
    listed, list_shard = [], RegionCache._list_shard
    monkeypatch.setattr(RegionCache, "_list_shard", lambda self, shard: listed.append(shard.name) or list_shard(self, shard))
    write_items(tmp_path, ["b", "d"], writer_name="s0of3")  # b stored again, in a shard that sorts between the two
    cache.refresh()
    assert listed == ["s0of3-00000.h5"]
    fresh = RegionCache(tmp_path)
    for name in ("ids", "paths", "kinds", "sources", "committed", "times_from", "read_shards", "damaged", "removed"):
        assert getattr(cache, name) == getattr(fresh, name), name
    assert cache.ids == ["a", "b", "d", "c"] and cache.shard_of("b") == "s0of3-00000.h5"
    np.testing.assert_array_equal(cache.get("b")["features"], fresh.get("b")["features"])


def test_an_item_extracted_again_is_read_from_the_row_that_replaces_the_other_whatever_the_clocks_said(tmp_path):
    def extract(writer_name, seed, source, replaces="", committed=None):
        with ShardWriter(tmp_path, SETTINGS, writer_name=writer_name) as writer:
            writer.add("a", "/data/a.mp4", "video", random_item(seed), source=source, replaces=replaces)
        if committed is not None:  # a writer on a node whose clock is behind
            with h5py.File(tmp_path / SHARD_DIR / f"{writer_name}-00000.h5", "a") as f:
                f.attrs["committed"] = committed

    extract("s0of3", 0, source="stamp-1")
    extract("s1of3", 1, source="stamp-2", replaces="stamp-1", committed=1.0)
    cache = RegionCache(tmp_path)
    assert cache.ids == ["a"] and cache.sources == ["stamp-2"] and cache.shard_of("a") == "s1of3-00000.h5"
    np.testing.assert_array_equal(cache.get("a")["features"], random_item(1)["features"].astype(np.float16))
    extract("s2of3", 2, source="stamp-3", replaces="stamp-2", committed=0.5)  # and again, read between the two
    cache.refresh()
    assert cache.sources == ["stamp-3"] and cache.shard_of("a") == "s2of3-00000.h5"
    before = cache.shard_key_of("a")
    assert cache.ids_in_shards({before}) == ["a"]
    cache.close()
    (tmp_path / SHARD_DIR / "s2of3-00000.h5").rename(tmp_path / "moved-out.h5")  # as a damaged shard is
    extract("s2of3", 3, source="stamp-4", replaces="stamp-3")  # its items extracted again: the same file name
    cache.refresh()
    assert cache.sources == ["stamp-4"] and cache.shard_of("a") == "s2of3-00000.h5"
    assert cache.shard_key_of("a") != before and cache.ids_in_shards({before}) == []  # another shard


def test_shard_columns_give_each_videos_rows_once_and_inspect_counts_them_shard_by_shard(tmp_path):
    """Totals over a cache read one shard at a time equal those of the videos read one by one, with a
    video that two shards hold counted once (where the cache takes it from)."""
    from vlpcache.cache.inspect import region_counts

    write_items(tmp_path, [f"v{i}" for i in range(5)], max_items=2)  # 3 shards
    write_items(tmp_path, ["w0", "v1"], writer_name="s1of2")  # "v1" again
    cache = RegionCache(tmp_path)
    parts = list(cache.shard_columns(("labels", "frame_mask")))
    assert len(parts) == 4 and sum(len(p["labels"]) for p in parts) == len(cache) == 6
    items = [cache[i] for i in range(len(cache))]
    real = [item["region_mask"] & item["frame_mask"][:, None] for item in items]
    labels = np.concatenate([item["labels"][mask] for item, mask in zip(items, real)])
    counts = region_counts(cache)
    assert counts["frames"] == sum(int(item["frame_mask"].sum()) for item in items)
    assert counts["regions"] == sum(int(item["region_mask"].sum()) for item in items)
    np.testing.assert_array_equal(counts["by_class"], np.bincount(labels[labels >= 0]))
    assert counts["frames_without_detections"] == sum(
        int(frame) and not ((item["labels"][t] >= 0) & item["region_mask"][t]).any()
        for item in items for t, frame in enumerate(item["frame_mask"]))


def test_a_damaged_chunk_fails_to_read_with_one_line_naming_shard_and_item_instead_of_other_numbers(tmp_path):
    """A chunk changed on disk is caught by its checksum (lzf, the features' compression, has none of its
    own; the other arrays are stored raw): the item's read raises DamagedShard, one line naming the
    shard, the item and the way out; the shard's other items read as written."""
    from vlpcache.cache.inspect import region_counts
    from vlpcache.cache.reader import DamagedShard

    write_items(tmp_path, ["a", "b", "c"])
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    with h5py.File(shard) as f:
        assert all(f[spec.name].fletcher32 for spec in SETTINGS.arrays())
    damage_chunk(shard, "features", 1)
    damage_chunk(shard, "labels", 2)
    cache = RegionCache(tmp_path)
    np.testing.assert_array_equal(cache.get("a")["features"], random_item(0)["features"].astype(np.float16))
    with pytest.raises(DamagedShard) as err:
        cache.get("b")
    assert str(err.value).startswith(f"{shard}: item 'b' cannot be read (") and "\n" not in str(err.value)
    assert str(err.value).endswith(f"the shard is damaged (a disk fault or a bad copy); recorded in {tmp_path / 'damaged'}: "
                                   "the next `vlpcache extract` extracts it again")
    assert RegionCache(tmp_path, say=lambda line: None).get("c", ("boxes",))["boxes"].shape == (3, 4, 4)  # its sound arrays
    with pytest.raises(DamagedShard, match="item 'b' cannot be read"):
        cache.get("b", ("boxes",))  # found damaged: the whole row, from then on
    with pytest.raises(DamagedShard, match="item 'c' cannot be read"):
        cache.read(2)
    assert region_counts(cache)["frames"] == 2  # a's: the totals read b and c row by row, and neither reads
    with pytest.raises(DamagedShard, match="its 'features' cannot be read"):
        cache.column("features")


def test_damage_the_checksum_misses_is_caught_by_its_values_and_extract_never_writes_them(tmp_path):
    """fletcher32 adds 16-bit words modulo 65535, so a word of zeros turned to ones (a flipped run of bits,
    a sector of 0xFF) passes it: a box of 0.0 then reads as NaN, which would make every loss of a training
    run NaN. extract never writes a NaN or an infinity (an item whose detector gives one fails), so a
    reader takes one for damage, recorded as any."""
    from vlpcache.cache.reader import DamagedShard
    from vlpcache.extract.mapper import RegionItem
    from vlpcache.extract.reader import DecodedItem
    from vlpcache.extract.sources import Item

    with ShardWriter(tmp_path, SETTINGS) as writer:
        for i, item_id in enumerate(["a", "b"]):
            item = random_item(i)
            item["boxes"][:] = [0.0, 0.0, 1.0, 1.0]  # whole frames: the first words are zeros
            writer.add(item_id, f"/data/{item_id}.mp4", "video", item)
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    damage_chunk(shard, "boxes", 1)
    with h5py.File(shard, "r") as f:
        assert np.isnan(f["boxes"][1]).any()  # read without complaint: the checksum passed
    with pytest.raises(DamagedShard, match=r"item 'b' cannot be read \(its 'boxes' hold values that are not numbers\)"):
        RegionCache(tmp_path).get("b")
    assert RegionCache(tmp_path, say=lambda line: None).ids == ["a"]

    from vlpcache.cache.schema import not_finite  # read by the exponent's bits: each dtype, each kind of value

    for dtype in (np.float16, np.float32, np.float64, ">f4"):
        extremes = np.array([0.0, -0.0, 1e-8, np.finfo(dtype).max, np.finfo(dtype).min], dtype)
        assert not_finite({"x": extremes, "y": np.array(7.0, dtype)}) == ""
        for bad in (np.nan, -np.nan, np.inf, -np.inf):
            assert not_finite({"x": extremes, "y": np.array([[1.0, bad]], dtype)}) == "y", (dtype, bad)
    assert not_finite({"duration": np.float32(np.nan)}) == "duration"  # a per-video scalar reads as np.float32
    arrays = random_item(0)
    arrays["features"][0, 0, 0] = np.inf
    failed = RegionItem(DecodedItem(Item("v", Path("/v.mp4"), "video"), None), arrays)
    assert failed.arrays is None and failed.error == ("the detector gave values that are not numbers (NaN or infinity) "
                                                      "for its features")
    assert RegionItem(DecodedItem(Item("v", Path("/v.mp4"), "video"), None), random_item(0)).error is None


@pytest.mark.parametrize("name, index, value, said", [
    ("boxes", (0, 0, 2), 3e38, "3e+38, not within [-0.001, 1.001]"),  # finite: passed the NaN check, made NaN embeddings
    ("timestamps", (1,), -2.0, "-2, not within [0, inf]"),
    ("duration", (), -1.0, "-1, not within [0, inf]"),
    ("labels", (2, 3), 80, "80, not within [-1, 79]"),  # COCO's 80 classes: 0 to 79
    ("labels", (0, 1), -2, "-2, not within [-1, 79]"),
    ("features", (0, 1, 2), -5000.0, "-5000, not within [-4096, 4096]"),  # float16 holds up to 65504
])
def test_a_value_out_of_its_range_is_damage_and_extract_never_writes_one(tmp_path, name, index, value, said):
    """A box of 3e38 is finite, so the NaN check passed it: `index` wrote a NaN embedding without a word, `search`
    dropped the item, `pretrain` stopped with "the loss is nan ... a lower learning rate". A value extract never
    writes (a box past the frame, a negative time, a label out of the detector's vocabulary, a feature no backbone
    gives) is damage, recorded as any; a row at the edges of the ranges reads."""
    from vlpcache.cache.reader import DamagedShard
    from vlpcache.cache.schema import VALUE_BOUNDS, out_of_range
    from vlpcache.extract.mapper import RegionItem
    from vlpcache.extract.reader import DecodedItem
    from vlpcache.extract.sources import Item

    edges = random_item(0)
    edges["boxes"][0, 0] = [-0.0005, 0.0, 1.0, 1.0005]  # rounding past the frame
    edges["labels"][0, :2] = [-1, 79]
    edges["features"][0, 0, :2] = [-4096.0, 4096.0]
    edges["timestamps"][0] = edges["duration"][...] = 0.0
    with ShardWriter(tmp_path, SETTINGS) as writer:
        for item_id, item in zip("abc", [edges, random_item(1), random_item(2)]):
            writer.add(item_id, f"/data/{item_id}.mp4", "video", item)
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    with h5py.File(shard, "r+") as f:
        f[name][(1, *index)] = value
    cache = RegionCache(tmp_path)
    assert cache.get("a")["labels"][0, 1] == 79 and cache.get("c") is not None
    with pytest.raises(DamagedShard, match=rf"item 'b' cannot be read \(its {name!r} hold {re.escape(said)}\)"):
        cache.get("b")
    assert RegionCache(tmp_path, say=lambda line: None).ids == ["a", "c"]  # recorded: extract redoes it

    arrays = random_item(1)
    arrays[name][index] = value
    failed = RegionItem(DecodedItem(Item("v", Path("/v.mp4"), "video"), None), arrays)
    if name != "labels":  # the detector's own vocabulary: checked by a read, by the cache's detector
        assert failed.arrays is None and failed.error == f"the detector gave values out of their range: {name!r} hold {said}"
    assert out_of_range(edges, VALUE_BOUNDS) == ""


def test_a_vg_caches_labels_and_attributes_read_within_visual_genomes_vocabulary():
    from vlpcache.cache.labels import value_bounds

    vg, coco = value_bounds("vg:vg_frcnn.pth"), value_bounds("yolox:yolox_nano_coco.onnx")
    assert vg["labels"] == (-1, 1599) and vg["attributes"] == (-1, 399) and coco["labels"] == (-1, 79)


def test_many_items_found_damaged_are_said_in_a_few_lines_and_all_recorded(tmp_path):
    """One damaged chunk of a per-item scalar holds 256 rows: not 256 lines."""
    from vlpcache.cache.reader import DAMAGE_LINES, BlankWhenDamaged

    ids = [f"v{i}" for i in range(DAMAGE_LINES + 3)]
    write_items(tmp_path, ids)
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    for row in range(len(ids)):
        damage_chunk(shard, "features", row)
    lines = []
    readable = BlankWhenDamaged(RegionCache(tmp_path), "read as a blank", say=lines.append)
    blanks = [readable[i] for i in range(len(ids))]
    assert all(not item["frame_mask"].any() for item in blanks) and len(readable.damaged) == len(ids)
    assert [line.split(": ")[1].split(" (")[0] for line in lines[:DAMAGE_LINES]] == [
        f"item {i!r} cannot be read" for i in ids[:DAMAGE_LINES]]
    assert lines[DAMAGE_LINES:] == [f"(items found damaged after these {DAMAGE_LINES} are recorded without a line each; "
                                    "`vlpcache inspect --failures` lists them all)"]
    assert sorted(RegionCache(tmp_path, say=lambda line: None).damaged) == sorted(ids)


def test_inspect_counts_around_rows_that_do_not_read_and_lists_them(tmp_path, capsys):
    """Totals read whole columns of a shard; one damaged row (a label chunk, a note, which has no checksum
    of its own but whose reference breaks) must not stop inspect for good: the other rows are counted, the
    damaged ones recorded and listed, and the next inspect says the same."""
    from vlpcache.cache.inspect import inspect_cache

    write_items(tmp_path, ["a", "b", "c"])
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    damage_chunk(shard, "labels", 1)
    damage_chunk(shard, "notes", 0, xor=0x01)  # a string's length one bit off (every bit: HDF5 reads 4 GB, slowly)
    for _ in range(2):
        inspect_cache(tmp_path, list_failures=True)
        out = capsys.readouterr().out
        assert "items       1  (video: 1)" in out, out
        assert "unreadable  2 item(s) whose cached row a read found damaged" in out
        assert f"unreadable  a: row 0 of {shard.name} does not read (" in out
        assert f"unreadable  b: row 1 of {shard.name} does not read (" in out
    assert RegionCache(tmp_path, say=lambda line: None).ids == ["c"]


def test_an_item_found_damaged_is_left_out_by_every_reader_from_then_on(tmp_path):
    """Each failed read of an item is recorded in the cache: a reader made later leaves the item out, as
    if it had not been extracted (so that extract redoes it), says so once, and lists it in `damaged`;
    the rows it replaced stay replaced; a cache whose log cannot be written keeps the damage in the reader
    that found it, and its line says the way out that is left."""
    from vlpcache.cache.reader import DamagedShard

    write_items(tmp_path, ["a", "b", "c"])
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    damage_chunk(shard, "features", 1)
    found = RegionCache(tmp_path)
    with pytest.raises(DamagedShard):
        found.get("b")
    lines = []
    later = RegionCache(tmp_path, say=lines.append)
    assert later.ids == ["a", "c"] and "b" not in later and list(later.damaged) == ["b"]
    assert later.damaged["b"]["row"] == 1 and later.damaged["b"]["shard"].startswith(shard.name + "@")
    assert lines == [f"{tmp_path}: 1 item(s) found damaged by an earlier read (e.g. 'b', row 1 of {shard.name}) are left "
                     "out until `vlpcache extract` extracts them again"]
    said = later.left_out_line("b")  # named where it is left out (inspect --render, search --like): why
    assert said.startswith(f"'b' is left out of the cache {tmp_path}: its row 1 of {shard.name} was found damaged on ")
    assert said.endswith("; the next `vlpcache extract` of its folder extracts it again") and f"({later.damaged['b']['reason']})" in said
    assert later.left_out_line("a") is None and later.left_out_line("b.mp4") == said
    np.testing.assert_array_equal(later.get("c")["features"], random_item(2)["features"].astype(np.float16))

    replacing = tmp_path / "replacing"  # an item extracted again (its source changed), and its new row damaged
    with ShardWriter(replacing, SETTINGS, writer_name="s0of2") as writer:
        writer.add("v", "/data/v.mp4", "video", random_item(0), source="old")
    with ShardWriter(replacing, SETTINGS, writer_name="s1of2") as writer:
        writer.add("v", "/data/v.mp4", "video", random_item(1), source="new", replaces="old")
    (new,) = (replacing / SHARD_DIR).glob("s1of2-*.h5")
    damage_chunk(new, "features", 0)
    with pytest.raises(DamagedShard):
        RegionCache(replacing).get("v")
    assert RegionCache(replacing).ids == []  # not the old row back: its content is gone from the source

    readonly = tmp_path / "readonly"
    write_items(readonly, ["x", "y"])
    (shard,) = (readonly / SHARD_DIR).glob("*.h5")
    damage_chunk(shard, "features", 0)
    (readonly / "damaged").write_text("")  # the log cannot be written (tests run as root: a mode would not stop it)
    cache = RegionCache(readonly)
    with pytest.raises(DamagedShard, match=r"it could not be recorded in the cache \(File exists\): move the "
                                           "shard out of .* and run `vlpcache extract` again to redo its items"):
        cache.get("x")
    cache.refresh()
    assert cache.ids == ["y"] and list(cache.damaged) == ["x"]
    assert RegionCache(readonly).ids == ["x", "y"]  # nothing recorded


def test_cache_with_different_settings_is_refused(tmp_path):
    write_items(tmp_path, ["a"])
    other = CacheSettings(**{**SETTINGS.to_json(), "frames": 4})
    with pytest.raises(UserError, match="frames: 3 != 4"):
        ShardWriter(tmp_path, other)


def test_a_trunk_is_the_same_weights_by_its_tensors_where_both_record_them_else_by_its_file(tmp_path):
    # torch.save writes the same tensors as other bytes under other torch versions (README: Detector weights)
    trunk = dataclasses.replace(SETTINGS, backbone_tensors_sha256="t" * 64)
    resaved = dataclasses.replace(trunk, backbone_weights_sha256="c" * 64)
    with ShardWriter(tmp_path, trunk) as writer:
        writer.add("a", "/data/a.mp4", "video", random_item(0))
    with ShardWriter(tmp_path, resaved, writer_name="s1of2") as writer:
        writer.add("b", "/data/b.mp4", "video", random_item(1))
    cache = RegionCache(tmp_path)
    assert cache.ids == ["a", "b"] and not cache.ignored_shards and cache.settings == trunk
    changed = dataclasses.replace(trunk, backbone_tensors_sha256="u" * 64)
    with pytest.raises(UserError, match=f"different settings \\(backbone_tensors_sha256: '{'t' * 64}' != '{'u' * 64}'\\); "
                                        "use another output directory \\(-o\\) or the same settings$"):
        ShardWriter(tmp_path, changed)
    # a run records the settings of the cache it was trained on: one that records no tensors is compared by file
    run = {key: value for key, value in resaved.to_json().items() if key != "backbone_tensors_sha256"}
    assert trunk.feature_differences(resaved.to_json()) == [] and trunk.feature_differences(changed) != []
    assert trunk.feature_differences(run) == [f"backbone_weights_sha256: {'b' * 64!r} != {'c' * 64!r}"]
    assert trunk.feature_differences({**run, "backbone_weights_sha256": "b" * 64}) == []


def test_a_cache_from_before_trunks_were_known_by_their_tensors_names_the_file_to_extend_it_with(tmp_path):
    write_items(tmp_path, ["a"])
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"backbone_tensors_sha256": "",', ""))
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    with h5py.File(shard, "r+") as f:
        del f.attrs["backbone_tensors_sha256"]  # as vlpcache wrote shards before the setting existed
    trunk = dataclasses.replace(SETTINGS, backbone_tensors_sha256="t" * 64)
    with ShardWriter(tmp_path, trunk, writer_name="s1of2") as writer:  # its file: the cache's weights
        writer.add("b", "/data/b.mp4", "video", random_item(1))
    assert RegionCache(tmp_path).ids == ["a", "b"]
    with pytest.raises(UserError, match=f"backbone_weights_sha256: {'b' * 64!r} != {'c' * 64!r}.*same settings; this cache "
                                        f"records its backbone's weights by their file only \\(sha256 {'b' * 12}…\\): to "
                                        "extend it, put the file it was made with in the models folder"):
        ShardWriter(tmp_path, dataclasses.replace(trunk, backbone_weights_sha256="c" * 64))


def test_cache_of_an_older_schema_is_refused_with_what_changed_and_the_fix(tmp_path):
    write_items(tmp_path, ["a"])
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 1'))
    with pytest.raises(UserError, match=r"cache schema 1, this vlpcache writes 2 \(the whole-frame region.*-o\) or delete"):
        ShardWriter(tmp_path, SETTINGS)


def test_wrong_shape_is_rejected_before_anything_is_written(tmp_path):
    item = random_item(0)
    item["features"] = item["features"][:, :2]
    with ShardWriter(tmp_path, SETTINGS) as writer, pytest.raises(ValueError, match="features"):
        writer.add("bad", "/x", "video", item)
    assert len(RegionCache(tmp_path)) == 0


def test_failure_log_survives_a_partial_last_line(tmp_path):
    with ShardWriter(tmp_path, SETTINGS) as writer:
        writer.record_failure("x", "/x.mp4", "no video stream")
    log = next((tmp_path / "failures").glob("*.jsonl"))
    with open(log, "ab") as f:
        f.write(b'{"id": "half')  # a kill -9 mid-write
    with ShardWriter(tmp_path, SETTINGS) as writer:
        writer.record_failure("y", "/y.mp4", "corrupt")
    assert set(read_failures(tmp_path)) == {"x", "y"}


def test_a_record_whose_path_holds_a_unicode_line_separator_reads_back(tmp_path):
    # str.splitlines ends a line at U+0085 (what convmv -f latin1 makes of cp1252's ellipsis), U+2028 and U+2029,
    # which a record's path keeps as they are: the record was torn in two and passed over, so the failed file
    # was tried again at each extract, its log growing a line a time
    names = ["bad\u0085clip", "line\u2028sep", "para\u2029sep", "plain"]
    with ShardWriter(tmp_path, SETTINGS) as writer:
        for name in names:
            writer.record_failure(name, f"/data/{name}.mp4", "no video stream")
    assert set(read_failures(tmp_path)) == set(names)
    assert read_failures(tmp_path)["bad\u0085clip"]["path"] == "/data/bad\u0085clip.mp4"


def test_an_item_that_failed_to_extract_named_later_is_told_as_failed_not_as_a_name_of_nothing(tmp_path):
    # `inspect --render empty` said "'empty' names no item ... ids look like 'frames/video6513'"
    write_items(tmp_path, ["a"])
    with ShardWriter(tmp_path, SETTINGS) as writer:
        writer.record_failure("videos/empty", "/data/videos/empty.mp4", "empty file (0 bytes)")
        writer.record_failure("a", "/data/a.mp4", "cannot open video")  # cached before: its old row is read
    cache = RegionCache(tmp_path)
    said = cache.left_out_line("empty")
    assert said.startswith("'videos/empty' did not extract: empty file (0 bytes) (/data/videos/empty.mp4, on ")
    assert said.endswith("); mend or replace the file and extract its folder again (`inspect --failures` lists every "
                         "failure)")
    assert cache.left_out_line("videos/empty.mp4") == said and cache.left_out_line("nothing") is None
    assert cache.left_out_line("a") is None


def test_json_lines_split_at_newlines_only():
    assert json_lines('{"a": "x\u2028y"}\n{"b": 1}\n') == ['{"a": "x\u2028y"}', '{"b": 1}']
    assert json_lines('{"a": "x\u0085y"}\n{"b"', keepends=True) == ['{"a": "x\u0085y"}\n', '{"b"']
    assert json_lines("") == [] and json_lines("\n") == [""] and json_lines("a\r\nb") == ["a\r", "b"]
    text = 'one\u2029\ntwo\n'
    assert "".join(json_lines(text, keepends=True)) == text


def test_a_writer_that_records_nothing_leaves_no_failure_log_and_empty_ones_left_before_go(tmp_path):
    write_items(tmp_path, ["a"])
    assert list((tmp_path / "failures").iterdir()) == []
    (tmp_path / "failures" / "s0of1-ray-0123456789ab.jsonl").touch()  # a Ray actor's of an earlier version
    with ShardWriter(tmp_path, SETTINGS, writer_name="s1of2") as writer:
        writer.record_failure("x", "/x.mp4", "no video stream")
        write_items(tmp_path, ["b"], writer_name="s0of2")  # a writer starting removes the empty log, keeps the other's
    assert [p.name for p in (tmp_path / "failures").iterdir()] == ["s1of2.jsonl"]
    assert set(read_failures(tmp_path)) == {"x"}


def test_a_writer_that_fails_before_writing_anything_leaves_no_cache_where_there_was_none(tmp_path):
    # an extract that failed early (a detector that does not load, --device cuda on a Ray cluster without
    # a GPU) left manifest.json, shards/, failures/ and locks/ in a folder it had made
    with pytest.raises(UserError), ShardWriter(tmp_path / "new" / "cache", SETTINGS):
        raise UserError("the detector did not load")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # a folder that was there stays, as does a cache that holds a record
    with pytest.raises(UserError), ShardWriter(tmp_path / "empty", SETTINGS):
        raise UserError("the detector did not load")
    with pytest.raises(UserError), ShardWriter(tmp_path / "failed", SETTINGS) as writer:
        writer.record_failure("x", "/x.mp4", "no video stream")
        raise UserError("the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "failed"]
    assert (tmp_path / "empty" / MANIFEST_NAME).exists() and set(read_failures(tmp_path / "failed")) == {"x"}


def test_a_record_log_that_cannot_be_read_is_one_note_and_the_others_count(tmp_path, capsys):
    # another user's log made with umask 077 stopped every reader (inspect, search, eval) with EACCES;
    # root reads any file, so here the log is a folder of a log's name: an OSError on reading alike
    with ShardWriter(tmp_path, SETTINGS) as writer:
        writer.record_failure("x", "/x.mp4", "no video stream")
    (tmp_path / "failures" / "other-writer.jsonl").mkdir()
    (tmp_path / "moves" / "other-writer.jsonl").mkdir(parents=True)
    capsys.readouterr()
    cache = RegionCache(tmp_path)
    assert set(cache.failures) == {"x"} and set(RegionCache(tmp_path).failures) == {"x"}
    notes = capsys.readouterr().err.splitlines()
    assert sorted(notes) == [f"note: {tmp_path / name / 'other-writer.jsonl'}: cannot be read (Is a directory (EISDIR)): its "
                             f"records ({name}) are left out" for name in ("failures", "moves")]  # once each


def test_succeeded_retry_clears_the_failure(tmp_path):
    with ShardWriter(tmp_path, SETTINGS) as writer:
        writer.record_failure("a", "/a.mp4", "corrupt")
    assert set(RegionCache(tmp_path).failures) == {"a"}
    write_items(tmp_path, ["a"])
    assert RegionCache(tmp_path).failures == {}


def test_what_discovery_passed_over_is_kept_per_root_and_a_later_run_over_a_root_replaces_its_list(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"

    def record(roots, problems, writer_name="s0of1", drop_gone=False):
        with ShardWriter(cache_dir, SETTINGS, writer_name=writer_name) as writer:
            writer.record_passed_over(roots, problems, drop_gone=drop_gone)
        return {path: r["reason"] for path, r in read_passed_over(cache_dir).items()}

    assert record([a], []) == {} and not passed_over_path(cache_dir, "s0of1").exists()
    assert record([a], [(str(a / "x.mp4"), "broken symbolic link; skipped"),
                        (str(a / "sub"), "cannot read folder: permission denied; skipped")]) == {
        str(a / "x.mp4"): "broken symbolic link; skipped", str(a / "sub"): "cannot read folder: permission denied; skipped"}
    # a run over another root keeps a's; another shard set's record is read beside it, a path twice once
    assert record([b], [(str(b), "does not exist; skipped")]) == {
        str(a / "x.mp4"): "broken symbolic link; skipped", str(a / "sub"): "cannot read folder: permission denied; skipped",
        str(b): "does not exist; skipped"}
    assert len(record([a], [(str(a / "x.mp4"), "broken symbolic link; skipped")], writer_name="s1of2")) == 3
    # the link mended: the next run over a drops its problems, not b's; a relative root is the same folder
    monkeypatch.chdir(tmp_path)
    assert record([Path("a")], []) == {str(a / "x.mp4"): "broken symbolic link; skipped", str(b): "does not exist; skipped"}
    assert record([a], [], writer_name="s1of2") == {str(b): "does not exist; skipped"}
    # a damaged record reads as empty and is rewritten by the next run; a name that is not UTF-8 is kept printable
    passed_over_path(cache_dir, "s0of1").write_text("{not json")
    assert read_passed_over(cache_dir) == {}
    latin1 = os.fsdecode(bytes(b / "caf") + b"\xe9.mp4")
    assert record([b], [(latin1, "path is not valid UTF-8; skipped")]) == {f"{b}/caf\\xe9.mp4": "path is not valid UTF-8; skipped"}
    # with extract --prune, what is no longer there goes from the records of other roots too (a folder moved)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.mp4").write_text("")
    record([tmp_path / "c"], [(str(tmp_path / "c" / "a.mp4"), "duplicate id 'a'; skipped")])
    assert record([a], [], drop_gone=True) == {str(tmp_path / "c" / "a.mp4"): "duplicate id 'a'; skipped"}


def test_missing_cache_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="run `vlpcache extract` first"):
        RegionCache(tmp_path / "nope")


class _CacheDataset(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return torch.from_numpy(self.cache[i]["features"].astype(np.float32))


def test_reader_opened_in_parent_works_in_dataloader_workers(tmp_path):
    write_items(tmp_path, [f"v{i}" for i in range(6)], max_items=2)
    cache = RegionCache(tmp_path)
    first = cache[0]["features"]  # opens a handle in the parent before the workers fork
    loader = torch.utils.data.DataLoader(_CacheDataset(cache), batch_size=2, num_workers=2)
    batches = torch.cat(list(loader))
    assert batches.shape == (6, 3, 4, 8)
    np.testing.assert_array_equal(batches[0].numpy(), first.astype(np.float32))


def test_a_reader_holds_no_chunk_cache_per_open_shard_so_random_reads_over_many_shards_stay_small(tmp_path):
    # h5py's default chunk cache (1 MiB per dataset) held about 10 MB per shard a training epoch had read from:
    # 2 GB over a 100k-video cache's 200 shards. A read takes one video's own chunk, which no later read reuses.
    write_items(tmp_path, [f"v{i}" for i in range(6)], max_items=2)
    cache = RegionCache(tmp_path)
    for i in (4, 0, 2, 5):
        cache[i]
    assert len(cache._handles) == 3
    for handle in cache._handles.values():
        assert handle.id.get_access_plist().get_cache()[2] == 0  # (metadata elements, slots, chunk bytes, w0)
        assert handle["features"].id.get_access_plist().get_chunk_cache()[1] == 0
    np.testing.assert_array_equal(cache[5]["features"], random_item(5)["features"].astype(np.float16))


def test_column_reads_one_array_for_all_videos_in_cache_order(tmp_path):
    write_items(tmp_path, ["a", "b", "c"], max_items=2)
    cache = RegionCache(tmp_path)
    masks = cache.column("region_mask")
    assert masks.shape == (3, 3, 4)
    np.testing.assert_array_equal(masks[2], cache[2]["region_mask"])


def copy_in_a_shard_of_other_settings(cache_dir, tmp_path, **changes) -> Path:
    """A shard made for another cache (other settings), copied into cache_dir under a writer name of its own."""
    other = CacheSettings(**{**SETTINGS.to_json(), **changes})
    with ShardWriter(tmp_path / "other", other, writer_name="s0of1") as writer:
        writer.add("foreign", "/f", "video", random_item(9, other))
    copied = Path(cache_dir) / SHARD_DIR / "s9of10-00000.h5"
    shutil.copy(next((tmp_path / "other" / SHARD_DIR).glob("*.h5")), copied)
    return copied


def test_a_shard_of_other_settings_is_left_out_and_reported_once(tmp_path, capsys):
    write_items(tmp_path / "cache", ["a", "b"])
    copied = copy_in_a_shard_of_other_settings(tmp_path / "cache", tmp_path, frames=4)
    cache = RegionCache(tmp_path / "cache")
    assert cache.ids == ["a", "b"] and cache.column("features").shape == (2, 3, 4, 8)
    assert cache.ignored_shards == {copied: ["frames 4, not 3"]}
    RegionCache(tmp_path / "cache")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{copied}: made with other settings than the cache (frames 4, not 3)")


def test_a_manifest_edited_by_hand_leaves_every_shard_that_disagrees_out(tmp_path):
    write_items(tmp_path, ["a", "b"], max_items=1)
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"feature_dim": 8', '"feature_dim": 16'))
    cache = RegionCache(tmp_path)
    assert len(cache) == 0 and len(cache.ignored_shards) == 2
    assert next(iter(cache.ignored_shards.values())) == ["feature_dim 8, not 16"]


def test_extract_refuses_settings_its_shards_disagree_with_whatever_the_manifest_says(tmp_path):
    write_items(tmp_path, ["a"])
    manifest = tmp_path / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"frames": 3', '"frames": 4'))
    with pytest.raises(UserError, match=r"s0of1-00000.h5: made with other settings than this extract \(frames 3, not 4\)"):
        ShardWriter(tmp_path, CacheSettings(**{**SETTINGS.to_json(), "frames": 4}))


def test_a_shard_whose_arrays_disagree_with_its_own_attributes_is_left_out(tmp_path):
    write_items(tmp_path, ["a"])
    shard = next((tmp_path / SHARD_DIR).glob("*.h5"))
    with h5py.File(shard, "r+") as f:
        del f["boxes"]
        f.create_dataset("boxes", data=np.zeros((1, 3, 4, 2), np.float32))
    cache = RegionCache(tmp_path)
    assert len(cache) == 0 and cache.ignored_shards[shard] == ["boxes (3, 4, 2) per video, not (3, 4, 4)"]


def rewrite_dataset(shard, name: str, data: np.ndarray, **options) -> None:
    with h5py.File(shard, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data, **options)


@pytest.mark.parametrize("break_", ["an id too many", "a mask of integers", "ids of numbers"])
def test_a_shard_whose_arrays_disagree_in_rows_or_dtype_is_unreadable_not_a_traceback(tmp_path, break_, capsys):
    """Each array's shape per video agreed, but `ids` one row longer than the arrays was an IndexError in inspect,
    index and search, and a region_mask of int64 a ValueError in inspect's totals: a shard made by hand or by
    another program is left out as unreadable, in one line, and extract (which redoes its items) goes on."""
    from vlpcache.cache.inspect import inspect_cache
    from vlpcache.cache.writer import refuse_shards_of_other_settings

    write_items(tmp_path / "cache", ["a", "b"])
    write_items(tmp_path / "cache", ["c"], writer_name="s1of2")
    shard = tmp_path / "cache" / SHARD_DIR / "s0of1-00000.h5"
    with h5py.File(shard, "r") as f:
        ids, mask = list(f["ids"][:]), f["region_mask"][:]
    if break_ == "an id too many":
        rewrite_dataset(shard, "ids", np.array([*ids, b"extra"], dtype=object), dtype=h5py.string_dtype())
    elif break_ == "a mask of integers":
        rewrite_dataset(shard, "region_mask", mask.astype(np.int64) * 7)
    else:
        rewrite_dataset(shard, "ids", np.arange(2))
    cache = RegionCache(tmp_path / "cache")
    assert cache.ids == ["c"] and cache.unreadable_shards[shard] == {
        "an id too many": "'features' has 2 rows, 'ids' 3", "a mask of integers": "'region_mask' holds int64, not bool",
        "ids of numbers": "'ids' holds int64, not strings"}[break_]
    assert f"{shard}: unreadable shard ({cache.unreadable_shards[shard]}); its items are left out" in capsys.readouterr().err
    inspect_cache(tmp_path / "cache")
    assert f"unreadable  {shard.name}: {cache.unreadable_shards[shard]}" in capsys.readouterr().out
    refuse_shards_of_other_settings(tmp_path / "cache", SETTINGS)  # not "made with other settings": redone


def test_inspect_lists_the_shards_it_leaves_out_and_why(tmp_path, capsys):
    from vlpcache.cache.inspect import inspect_cache

    write_items(tmp_path / "cache", ["a"])
    copy_in_a_shard_of_other_settings(tmp_path / "cache", tmp_path, feature_dim=5)
    (tmp_path / "cache" / SHARD_DIR / "s8of10-00000.h5").write_bytes(b"\0" * 100)
    inspect_cache(tmp_path / "cache")
    out, err = capsys.readouterr()
    assert err == "" and "items       1" in out and "in 1 shard\n" in out
    assert "ignored     s9of10-00000.h5: made with other settings than the manifest (feature_dim 5, not 8)" in out
    assert "unreadable  s8of10-00000.h5: " in out
    inspect_cache(tmp_path / "cache", as_json=True)
    summary = json.loads(capsys.readouterr().out)
    assert summary["ignored_shards"] == {"s9of10-00000.h5": ["feature_dim 5, not 8"]}
    assert list(summary["unreadable_shards"]) == ["s8of10-00000.h5"]


def test_a_cache_reads_as_a_notebook_user_tries_it(tmp_path, monkeypatch):
    # cache["video1"], cache[0:2] and get(id, "boxes") were TypeErrors or KeyError: 'b'; a relative cache
    # broke after os.chdir (a notebook's %cd); no repr, no `with`
    write_items(tmp_path / "cache", ["a", "b", "c"])
    monkeypatch.chdir(tmp_path)
    with RegionCache("cache") as cache:
        monkeypatch.chdir("/")
        assert cache["b"]["id"] == "b" and [item["id"] for item in cache[0:2]] == cache.ids[:2]
        assert [item["id"] for item in cache[::-1]] == cache.ids[::-1]
        assert set(cache.get("a", "boxes")) == {"boxes", "id", "path", "kind", "source", "times_from"}
        np.testing.assert_allclose(cache.get("a", "boxes")["boxes"], random_item(0)["boxes"], atol=1e-3)
        assert repr(cache) == f"RegionCache({str(tmp_path / 'cache')!r}: 3 items, 3 frames x 4 regions)"
        with pytest.raises(KeyError, match="'nope' is no array of cache .*its arrays: features, boxes"):
            cache.get("a", ("nope",))
        with pytest.raises(TypeError, match="by position \\(int\\), id \\(str\\) or slice, not float"):
            cache[1.5]
    assert cache._handles == {}  # closed at the end of the block


def test_a_shard_the_process_holds_open_with_other_locking_flags_says_so(tmp_path, capsys):
    # an h5py.File(shard, locking=False) of the user's in the same process: "unreadable shard", move it out
    write_items(tmp_path, ["a"])
    shard = next((tmp_path / SHARD_DIR).glob("*.h5"))
    with h5py.File(shard, "r", locking=False):
        capsys.readouterr()
        assert len(RegionCache(tmp_path)) == 0
        assert capsys.readouterr().err.endswith(
            "its items are left out: this process holds the file open already with other HDF5 locking flags (an "
            "h5py.File opened with locking=False or swmr=True?): close that, or open it as h5py does by default\n")
    assert RegionCache(tmp_path).ids == ["a"]


def test_a_shard_hdf5_cannot_lock_says_how_to_read_it_without_locks(tmp_path, capsys):
    # a file system without lock support (some NFS mounts, where a lab shares its cache) fails HDF5's
    # locking open; it was "unreadable shard" with the advice to move it out and extract again. A lock
    # held by another open fails it the same way (HDF5 asks flock for a shared one, without waiting)
    import fcntl

    write_items(tmp_path, ["a", "b"])
    shard = next((tmp_path / SHARD_DIR).glob("*.h5"))
    held = os.open(shard, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        cache = RegionCache(tmp_path)
        assert cache.ids == [] and list(cache.unreadable_shards) == [shard]
        said = capsys.readouterr().err
        # HDF5's words: "Unable to synchronously open file (unable to lock file", before 1.14 "Unable to open file (..."
        assert said.startswith(f"{shard}: unreadable shard ([Errno 11] Unable to ") and "(unable to lock file" in said
        assert said.endswith("its items are left out: HDF5 could not lock the file: a file system without lock support "
                             "(some NFS mounts)? set HDF5_USE_FILE_LOCKING=FALSE in the environment and run again "
                             "(shards are never written once committed), or another program holds it open for writing\n")
    finally:
        os.close(held)
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}  # as the line says: read without locks
    held = os.open(shard, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        probe = f"from vlpcache.cache.reader import RegionCache; print(sorted(RegionCache({str(tmp_path)!r}).ids))"
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["['a',", "'b']"], done.stderr
    finally:
        os.close(held)


def test_a_shard_this_user_may_not_read_is_not_called_damaged(tmp_path, monkeypatch, capsys):
    # another user's shard (umask 077) was "unreadable shard ([Errno 13] Unable to synchronously open file ...)"
    # with the advice to move it out of the cache and extract again; root reads any file, so the answer of
    # os.access is planted, and the shard cannot be opened
    from vlpcache.cache import reader

    write_items(tmp_path / "cache", ["a"])
    locked = tmp_path / "cache" / SHARD_DIR / "s8of10-00000.h5"
    locked.write_bytes(b"\0" * 100)
    monkeypatch.setattr(reader.os, "access", lambda path, mode: Path(path) != locked)
    cache = RegionCache(tmp_path / "cache")
    assert cache.ids == ["a"] and cache.unreadable_shards == {locked: "Permission denied (EACCES)"}
    assert capsys.readouterr().err == (f"{locked}: this user may not read it (Permission denied (EACCES)); its items are "
                                       "left out: another user's file? its owner can make it readable (chmod a+r)\n")


def test_shards_are_written_in_hdf5_1_10s_format_which_every_admitted_h5py_reads(tmp_path):
    # libver="latest" wrote the writing HDF5's own format: HDF5 2.0's layout messages (version 5), which h5py 3.9 on
    # HDF5 1.12 cannot read ("bad version number for layout message"): its items vanished, extract cached them twice
    write_items(tmp_path, ["a", "b"])
    (shard,) = (tmp_path / SHARD_DIR).glob("*.h5")
    versions = layout_message_versions(shard)
    assert len(versions) == len(SETTINGS.arrays()) + len(STRINGS)  # every dataset's header was read
    assert superblock_version(shard) <= 3 and max(versions) <= 4  # HDF5 1.10's: 3 and 4 (HDF5 2.0's layout is 5)
    assert RegionCache(tmp_path).ids == ["a", "b"]


def test_a_shard_a_newer_hdf5_wrote_is_not_called_damaged_and_extract_refuses_to_cache_its_items_twice(tmp_path,
                                                                                                       capsys):
    # as h5py 3.9 (HDF5 1.12) met a shard of HDF5 2.0's: "unreadable shard (... bad version number for layout message);
    # move it out of the cache and run extract again", and extract cached its items again beside it
    from vlpcache.cache.inspect import inspect_cache

    write_items(tmp_path, ["a", "b"])
    write_items(tmp_path, ["c"])
    newer = sorted((tmp_path / SHARD_DIR).glob("*.h5"))[0]
    assert set_layout_message_versions(newer, 9) == len(SETTINGS.arrays()) + len(STRINGS)  # a version of no HDF5 yet
    cache = RegionCache(tmp_path)
    assert cache.ids == ["c"] and "bad version number for layout message" in cache.unreadable_shards[newer]
    said = capsys.readouterr().err
    assert said.startswith(f"{newer}: unreadable shard (") and "; its items are left out: written by a newer HDF5 " \
        f"than this h5py {h5py.version.version} (HDF5 {h5py.version.hdf5_version}) reads, not damaged: upgrade h5py" in said
    inspect_cache(tmp_path)
    listed = capsys.readouterr().out
    assert f"unreadable  {newer.name}: " in listed and "written by a newer HDF5" in listed and "move it out" not in listed
    shards = sorted(p.name for p in (tmp_path / SHARD_DIR).iterdir())
    for _ in range(2):  # the lock is let go: said the same way again
        with pytest.raises(UserError, match=rf"^{re.escape(str(newer))}: unreadable \(.*bad version number.*\): written "
                                            r"by a newer HDF5 .*; nothing was written, as its items would have been "
                                            r"extracted again$"):
            ShardWriter(tmp_path, SETTINGS)  # as extract (and merge) open the cache: before anything is extracted
    assert sorted(p.name for p in (tmp_path / SHARD_DIR).iterdir()) == shards
    set_layout_message_versions(tmp_path / SHARD_DIR / shards[1], 9)
    with pytest.raises(UserError, match=r"none of its 2 shard\(s\) can be read as its manifest describes \(reported "
                                        r"above\); upgrade h5py for those a newer HDF5 wrote, move the others out"):
        RegionCache(tmp_path).check_not_empty()  # as pretrain and index begin


def test_inspect_of_a_cache_without_detections_says_so_rather_than_leaving_the_line_out(tmp_path, capsys):
    from vlpcache.cache.inspect import inspect_cache

    with ShardWriter(tmp_path, SETTINGS) as writer:
        item = random_item(0)
        item["labels"][:] = -1  # the whole-frame regions alone: nothing scored above the threshold
        item["region_mask"][:] = False
        item["region_mask"][:, 0] = True
        writer.add("dark", "/data/dark.mp4", "video", item)
    inspect_cache(tmp_path)
    frames = int(random_item(0)["frame_mask"].sum())
    assert f"found       no detections in its {frames} frames: only the whole-frame regions (score >= 0.1)" \
        in capsys.readouterr().out



def _open_files_at_most(soft: int, hard: int, command: list[str]) -> list[str]:
    """`command` under `ulimit -Sn soft -Hn hard`."""
    return as_a_shell_starts_it(command, limits={"RLIMIT_NOFILE": (soft, hard)})


def test_a_cache_of_more_shards_than_the_open_files_limit_reads_whole_and_the_soft_limit_is_raised(tmp_path):
    # `ulimit -n 1024` (soft and hard) and a cache of more than about 1,000 shards: inspect, index and pretrain
    # ended in "Too many open files" (a reader kept up to 1,024 shards open); here 64 files and 80 shards (a reader
    # keeps at most half the limit open: 32)
    write_items(tmp_path / "cache", [f"v{i}" for i in range(80)], max_items=1)
    read_all = ("from vlpcache.cache.reader import RegionCache; import resource\n"
                "cache = RegionCache(r'%s')\n"
                "for _ in range(2):\n"
                "    assert all(cache.read(i)['id'] == cache.ids[i] for i in range(len(cache.ids)))\n"
                "print(len(cache.ids), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n") % (tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VLPCACHE_OPEN_SHARDS", None)
    done = subprocess.run(_open_files_at_most(64, 64, [sys.executable, "-c", read_all]), capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["80", "64"], done.stderr[-2000:]
    shown = subprocess.run(_open_files_at_most(64, 64, [sys.executable, "-m", "vlpcache", "inspect",
                                                          str(tmp_path / "cache")]), capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "in 80 shards" in shown.stdout, shown.stderr[-2000:]
    raised = subprocess.run(_open_files_at_most(64, 4096, [sys.executable, "-c", read_all]),  # a shell's soft limit
                            capture_output=True, text=True, env=env)                        # under a higher hard one
    assert raised.returncode == 0 and raised.stdout.split() == ["80", "4096"], raised.stderr[-2000:]
    # the program holds files of its own (here 48): the reader lets half of its shards go and keeps fewer; where
    # it holds none left to let go, one line
    crowded = read_all.replace("for _ in", "taken = [os.open(os.devnull, os.O_RDONLY) for _ in range(48)]\nfor _ in")
    crowded = "import os\n" + crowded + ("cache.close()\nwhile True:\n    try:\n        taken.append(os.open(os.devnull, "
                                          "os.O_RDONLY))\n    except OSError:\n        break\ncache.read(0)\n")
    full = subprocess.run(_open_files_at_most(64, 64, [sys.executable, "-c", crowded]), capture_output=True,
                          text=True, env=env)
    assert full.stdout.split() == ["80", "64"], full.stderr[-2000:]
    assert full.returncode == 1 and full.stderr.strip().splitlines()[-1] == (
        f"vlpcache.errors.UserError: {tmp_path / 'cache'}: this process may open no more files (`ulimit -n` 64) to "
        "read shard s0of1-00000.h5; raise `ulimit -n`, or set VLPCACHE_OPEN_SHARDS lower"), full.stderr[-2000:]


def test_items_pruned_together_are_recorded_with_one_fsync_and_all_left_out(tmp_path, monkeypatch):
    # `extract --prune` of 500k items fsynced each record: 40 minutes at an NFS's 5 ms a sync
    from vlpcache.cache import writer as writer_module

    ids = [f"v{i}" for i in range(50)]
    write_items(tmp_path / "cache", ids)
    cache = RegionCache(tmp_path / "cache")
    rows = [(item_id, cache.row_of(item_id), f"/data/{item_id}.mp4", "gone") for item_id in ids[:40]]
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(writer_module.os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    with ShardWriter(tmp_path / "cache", SETTINGS, writer_name="s0of1") as writer:
        syncs.clear()  # (taking the writer syncs its lock)
        writer.record_removals(rows)
        assert len(syncs) == 1
    assert RegionCache(tmp_path / "cache").ids == ids[40:]
