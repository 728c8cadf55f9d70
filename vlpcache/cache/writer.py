"""Write region features into a cache directory, crash-safely.

Each writer (one per `--shard i/n`; a Ray run's actors are writers `s<i>of<n>-ray-<actor>`) fills its own
shard files under a temporary name and renames a shard into place only after it is flushed, closed and
fsynced, so a kill -9 at any instant loses at most the shard in progress and never leaves a
half-written file that a reader takes for whole.

One process at a time writes under a writer name: it holds `locks/<writer>.lock` (locks.py), which the
kernel frees when the process exits, however it exits. A second process with the same name is refused
in one line naming the holder. Temporary shards are removed only by the writer that owns them (the
unfinished shard of its own killed predecessor) or when their writer's lock is free.

A write that fails (disk full, I/O error, read-only filesystem) becomes one line naming the file and
the reason; committed shards are untouched and the shard in progress is removed, so that a later run
resumes cleanly.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from vlpcache import __version__
from vlpcache.cache.manifest import UNREADABLE, first_line, newer_hdf5, open_shard, passed_over_path, read_manifest, read_passed_over, shard_file_differences
from vlpcache.cache.schema import (
    COLLECTION_KEY,
    COMMITTED_ATTR,
    FAILURE_DIR,
    HDF5_FORMAT,
    LOCK_DIR,
    MANIFEST_NAME,
    MOVES_DIR,
    REMOVED_DIR,
    SHARD_DIR,
    SHARD_ITEMS,
    SHARD_SECONDS,
    SHARD_SUFFIX,
    STRINGS,
    TMP_SUFFIX,
    CacheSettings,
    outdated_schema,
    shard_attrs,
    weights_difference,
)
from vlpcache.errors import UserError
from vlpcache.files import fsync_path, lies_under, write_failure
from vlpcache.locks import LOCK_SUFFIX, WriterLock, holder_description
from vlpcache.records import write_json
from vlpcache.report import printable, say

FEATURE_COMPRESSION = "lzf"  # fast; padded frames and regions are zeros and shrink to almost nothing


def open_cache_dir(cache_dir: Path, settings: CacheSettings) -> None:
    """Create the cache directory with its manifest, or check that an existing one matches settings."""
    cache_dir = Path(cache_dir)
    (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    (cache_dir / FAILURE_DIR).mkdir(parents=True, exist_ok=True)
    # the first writer's manifest stays when several start at once; theirs is compared below
    write_json(cache_dir / MANIFEST_NAME, {**settings.to_json(), COLLECTION_KEY: uuid.uuid4().hex}, keep_existing=True)
    check_cache_settings(cache_dir, settings)


def check_cache_settings(cache_dir: Path, settings: CacheSettings) -> None:
    """Refuse, in one line, a cache (its manifest or a committed shard) made with other settings than `settings`;
    reads only (an extract into a cache this user may not write checks it too)."""
    existing = read_manifest(cache_dir)
    outdated = outdated_schema(existing)
    if outdated:
        raise UserError(f"{cache_dir}: {outdated}; extract into a new directory (-o) or delete this one to re-extract")
    diffs = existing.differences(settings)
    if diffs:
        raise UserError(
            f"{cache_dir}: cache was made with different settings ({'; '.join(diffs)}); "
            "use another output directory (-o) or the same settings" + trunk_file_hint(existing, settings)
        )
    refuse_shards_of_other_settings(cache_dir, settings)


def trunk_file_hint(existing: CacheSettings, settings: CacheSettings) -> str:
    """What to do where a cache written before caches recorded their trunk's tensors names another trunk file: it may
    hold the same tensors (saved by another torch version), but only that file is known to be its weights."""
    if existing.backbone_tensors_sha256 or not settings.backbone_tensors_sha256:
        return ""
    if weights_difference(existing.to_json(), settings.to_json()) is None:
        return ""
    return (f"; this cache records its backbone's weights by their file only (sha256 {existing.backbone_weights_sha256[:12]}…): "
            "to extend it, put the file it was made with in the models folder (--models DIR or VLPCACHE_MODELS) "
            "in place of this one")


def refuse_shards_of_other_settings(cache_dir: Path, settings: CacheSettings) -> None:
    """Every committed shard must have been made with `settings`, whatever the manifest says (it may
    have been edited, or a shard copied in from another cache), and be one this h5py reads the format of."""
    for shard in sorted((cache_dir / SHARD_DIR).glob(f"*{SHARD_SUFFIX}")):
        try:
            with open_shard(shard) as f:
                diffs = shard_file_differences(f, settings)
        except UNREADABLE as err:  # readers report it and leave it out; its items are extracted again,
            if fix := newer_hdf5(reason := first_line(err)):  # unless only this h5py cannot read it: cached twice
                raise UserError(f"{shard}: unreadable ({reason}): {fix}; nothing was written, as its items would have "
                                "been extracted again") from None
            continue
        if diffs:
            raise UserError(f"{shard}: made with other settings than this extract ({'; '.join(diffs[:3])}); move it "
                            "out of the cache, or extract into another directory (-o)")


# a writer still starting may find its lock taken for an instant by another writer that removes the
# temporaries of dead writers (remove_unfinished_shards); a real holder holds it for the whole run
LOCK_PATIENCE_SECONDS = 1.0
RAY_ACTOR_PATIENCE_SECONDS = 120.0  # a lost node's actors end after Ray's health checks fail (about 30 s by default)
_TEMPORARY_NAME = re.compile(rf"^(?P<writer>.+)-\d+{re.escape(SHARD_SUFFIX + TMP_SUFFIX)}$")
# h5py objects of shards abandoned after a write error. HDF5 would try to flush them again when they
# are freed and, on a full disk, crash the interpreter: they are kept until the process ends, and the
# command line ends such a process without the interpreter's teardown (cli.exit_now).
ABANDONED: list = []


def lock_path(cache_dir: Path, writer_name: str) -> Path:
    return Path(cache_dir) / LOCK_DIR / f"{writer_name}{LOCK_SUFFIX}"


def take_writer_lock(cache_dir: Path, writer_name: str, busy: Callable[[str], str] | None = None) -> WriterLock:
    """The lock of writer `writer_name`, or one line naming the process that holds it: `busy(holder)`, else
    extract's line."""
    path = lock_path(cache_dir, writer_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = WriterLock.take(path, patience=LOCK_PATIENCE_SECONDS)
    if lock is None:
        holder = holder_description(path)
        raise UserError(busy(holder) if busy else
                        f"{cache_dir}: shards {writer_name}-* are being written by {holder}; wait for "
                        "that extract to finish, or give this one its own -o DIR; to fill one cache from several jobs "
                        "at once, give every job the same ROOTs and its own --shard i/n (README: Slurm without Ray)")
    return lock


SHARD_SET = re.compile(r"^s(\d+)of(\d+)$")  # the writer of --shard i/n (ExtractOptions.shard_set)
MERGE_WRITER = "merge"  # the writer lock a merge holds on its target: a second merge into it stops at once


def held_writer(cache_dir: Path, pattern: str, wanted: Callable[[str], bool] = lambda name: True) -> Path | None:
    """The lock file (under locks/, its name matching the glob `pattern`, its writer's name `wanted`) of a writer at
    work on the cache now; None where there is none (a file left by one that ended is removed)."""
    for path in sorted((Path(cache_dir) / LOCK_DIR).glob(pattern)):
        if not wanted(path.name[: -len(LOCK_SUFFIX)]):
            continue
        if (lock := WriterLock.take(path)) is None:
            return path
        lock.release()
    return None


def refuse_while_merging(cache_dir: Path) -> None:
    """One line where a merge brings other caches into this one now: its ids were checked against the cache as it
    was, and an item this extract caches meanwhile could be another file's under one of them (each hiding the other)."""
    if (path := held_writer(cache_dir, f"{MERGE_WRITER}{LOCK_SUFFIX}")) is not None:
        raise UserError(f"{cache_dir}: a merge into it is running ({holder_description(path)}); wait for it to finish, "
                        "then extract")


def refuse_other_shard_counts(cache_dir: Path, writer_name: str) -> None:
    """One line where an extract of another --shard count writes the cache now: --shard 0/1 and 0/2 at once share
    items, which both would extract and store (twice the work, and each item twice in the shards)."""
    own = SHARD_SET.match(writer_name)
    if own is None:
        return

    def of_another_count(name: str) -> bool:  # (one of the same count writes its own shard of the items, or is this one)
        return (other := SHARD_SET.match(name)) is not None and other[2] != own[2]

    if (path := held_writer(cache_dir, f"s*of*{LOCK_SUFFIX}", of_another_count)) is not None:
        other = SHARD_SET.match(path.name[: -len(LOCK_SUFFIX)])
        raise UserError(f"{cache_dir}: an extract with --shard {other[1]}/{other[2]} is writing it ({holder_description(path)}); "
                        f"--shard {own[1]}/{own[2]} would extract some of its items too, and the cache would hold them "
                        f"twice: wait for it to finish, or give every job that fills this cache the same n (--shard i/{other[2]})")


def wait_for_ray_actors_of(cache_dir: Path, writer_name: str) -> None:
    """Wait for the Ray actors of an earlier extract of this shard set (`<writer>-ray-<actor>`) to end: Ray
    ends them once their driver is gone (finished: within a second or two; killed on a lost login node:
    after the cluster's health checks), and what they commit meanwhile a new run would extract again."""
    for path in sorted((Path(cache_dir) / LOCK_DIR).glob(f"{writer_name}-ray-*{LOCK_SUFFIX}")):
        lock = WriterLock.take(path, patience=LOCK_PATIENCE_SECONDS)
        if lock is None:
            say(f"extract: waiting for {holder_description(path)}, a Ray actor of an earlier extract of these shards, "
                "to end (Ray ends the actors of a driver that ended, once it notices)")
            lock = WriterLock.take(path, patience=RAY_ACTOR_PATIENCE_SECONDS)
        if lock is None:
            raise UserError(f"{cache_dir}: shards {path.stem}-* are still being written by {holder_description(path)}, "
                            f"a Ray actor of an earlier extract of these shards, after {RAY_ACTOR_PATIENCE_SECONDS:.0f} s; "
                            "wait for it to end, or end it, then run this again")
        lock.release()  # the release removes the file


def unfinished_shards(cache_dir: Path) -> list[Path]:
    """The shards being written, or left by a writer that was stopped (temporary files, never read)."""
    return sorted((Path(cache_dir) / SHARD_DIR).glob(f"*{SHARD_SUFFIX}{TMP_SUFFIX}"))


def remove_unfinished_shards(cache_dir: Path, own_writer: str) -> None:
    """Remove the temporary shards of our own killed predecessor and of writers that no longer run (their
    lock is free), never those of a writer at work; and the lock files that dead writers left."""
    cache_dir = Path(cache_dir)
    for tmp in unfinished_shards(cache_dir):
        match = _TEMPORARY_NAME.match(tmp.name)
        if match is None:
            continue
        if match["writer"] == own_writer:
            tmp.unlink(missing_ok=True)
            continue
        lock = WriterLock.take(lock_path(cache_dir, match["writer"]))
        if lock is not None:
            with lock:
                tmp.unlink(missing_ok=True)
    for path in (cache_dir / LOCK_DIR).glob(f"*{LOCK_SUFFIX}"):
        if path.name != f"{own_writer}{LOCK_SUFFIX}" and (lock := WriterLock.take(path)) is not None:
            lock.release()  # the release removes the file


def remove_empty_failure_logs(cache_dir: Path, own_writer: str) -> None:
    """Remove the empty failure logs that writers of earlier versions left (they opened theirs at their start,
    recorded or not), never that of a writer at work (its lock is held)."""
    for log in (Path(cache_dir) / FAILURE_DIR).glob("*.jsonl"):
        if not _empty_file(log):
            continue
        if log.stem == own_writer:
            log.unlink(missing_ok=True)
        elif (lock := WriterLock.take(lock_path(cache_dir, log.stem))) is not None:
            with lock:
                if _empty_file(log):
                    log.unlink(missing_ok=True)


def _empty_file(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:  # removed meanwhile
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def first_missing_folder(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet; None if `path` exists."""
    missing = None
    for folder in (path := Path(path).absolute(), *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_untouched_cache(cache_dir: Path, made: Path) -> None:
    """Remove a cache that a writer made (with its folders up to `made`) and that holds nothing but its empty
    skeleton: the manifest and empty folders. Anything else in it (a shard, a record, another writer's lock)
    keeps it whole."""
    cache_dir = Path(cache_dir).absolute()
    folders = [cache_dir / name for name in (SHARD_DIR, FAILURE_DIR, LOCK_DIR)]
    try:
        if not set(os.listdir(cache_dir)) <= {MANIFEST_NAME, *(f.name for f in folders)}:
            return
        if any(f.exists() and os.listdir(f) for f in folders):
            return
        (cache_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for folder in folders:
            if folder.exists():
                folder.rmdir()
        for folder in (cache_dir, *cache_dir.parents):
            folder.rmdir()  # fails where something else is there: left as it is
            if folder == made:
                break
    except OSError:  # another writer's meanwhile, or not ours to remove: left as it is
        pass


class RecordLog:
    """Append-only JSON lines (failed items, moved items), fsynced per record or batch of records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        # a kill -9 mid-line leaves a partial last line: end it so the next record starts clean
        if self._file.tell() > 0:
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                self._file.write(b"\n")

    def append(self, record: dict) -> None:
        self.append_all([record])

    def append_all(self, records: list[dict]) -> None:
        """The records, fsynced once: `extract --prune` of 500k items took 500k fsyncs (40 min at an NFS's 5 ms)."""
        now = time.time()
        self._file.write(b"".join(json.dumps({**record, "time": now}, ensure_ascii=False).encode() + b"\n"
                                  for record in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class ShardWriter:
    """Appends videos to the current temporary shard; `commit()` renames it into place.

    A shard is committed automatically after `max_items` videos or `max_seconds` of writing, so
    that a crash costs at most that much work. The writer holds its name's lock from construction
    to `close()`.
    """

    def __init__(
        self,
        cache_dir: Path,
        settings: CacheSettings,
        writer_name: str = "s0of1",
        max_items: int = SHARD_ITEMS,
        max_seconds: float | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self.writer_name = writer_name
        self.max_items = max_items
        self.max_seconds = SHARD_SECONDS if max_seconds is None else max_seconds
        self.shard_dir = self.cache_dir / SHARD_DIR
        self.lock: WriterLock | None = None
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._tmp_path: Path | None = None
        self._count = 0
        self._opened_at = 0.0
        self.committed_items = 0
        self._made_dir = first_missing_folder(self.cache_dir)  # removed again by a run that fails having done nothing
        try:
            self.lock = take_writer_lock(self.cache_dir, writer_name)
            if "-ray-" not in writer_name and writer_name != MERGE_WRITER:  # a driver (or a local run) of a shard set
                refuse_while_merging(self.cache_dir)
                refuse_other_shard_counts(self.cache_dir, writer_name)
                wait_for_ray_actors_of(self.cache_dir, writer_name)
            open_cache_dir(self.cache_dir, settings)
            # the writer's record logs by folder (failures, moves, removals), each opened on its first record:
            # a writer that records nothing leaves no file (a Ray run's actors are new writers every run)
            self._logs: dict[str, RecordLog] = {}
            remove_unfinished_shards(self.cache_dir, writer_name)
            remove_empty_failure_logs(self.cache_dir, writer_name)
        except OSError as err:
            self.lock and self.lock.release()
            raise write_failure(err.filename or self.cache_dir, err,
                                "nothing was written; extract into a writable directory with free space (-o)") from None
        except BaseException:
            self.lock and self.lock.release()
            self._made_dir and remove_untouched_cache(self.cache_dir, self._made_dir)
            raise

    def _next_seq(self) -> int:
        pattern = re.compile(rf"^{re.escape(self.writer_name)}-(\d+){re.escape(SHARD_SUFFIX)}")
        seqs = [int(m.group(1)) for p in self.shard_dir.iterdir() if (m := pattern.match(p.name))]
        return max(seqs, default=-1) + 1

    @contextmanager
    def _writing(self):
        """Around every write of a shard: a failure abandons the shard in progress and becomes one line."""
        try:
            yield
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for some failed writes
            path = self._tmp_path or self.shard_dir
            self._abandon()
            raise write_failure(path, err, f"committed shards are kept ({self.committed_items} items of them from this "
                                           "run) and the unfinished one is removed; make room and re-run the same "
                                           "command to resume") from None

    def _abandon(self) -> None:
        """Give up the shard in progress: its file goes, its h5py objects are never flushed again."""
        if self._file is not None:
            ABANDONED.append((self._file, self._datasets))
        self._file, self._datasets, self._count = None, {}, 0
        if self._tmp_path is not None:
            try:
                self._tmp_path.unlink(missing_ok=True)
            except OSError:
                pass

    def _open_shard(self) -> None:
        name = f"{self.writer_name}-{self._next_seq():05d}{SHARD_SUFFIX}"
        self._tmp_path = self.shard_dir / (name + TMP_SUFFIX)
        f = self._file = h5py.File(self._tmp_path, "w", libver=HDF5_FORMAT)
        rows = min(256, self.max_items)  # per chunk of a per-video scalar or string: a small shard stays small
        for key, value in shard_attrs(self.settings, __version__).items():
            f.attrs[key] = value
        for spec in self.settings.arrays():
            shape = self.settings.shape_of(spec)
            self._datasets[spec.name] = f.create_dataset(
                spec.name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=spec.dtype,
                chunks=(1, *shape) if shape else (rows,),  # one video per chunk
                compression=FEATURE_COMPRESSION if spec.name == "features" else None,
                fletcher32=True,  # a checksum per chunk: a damaged shard fails to read instead of giving other numbers
            )
        for name in STRINGS:
            self._datasets[name] = f.create_dataset(name, shape=(0,), maxshape=(None,),
                                                    dtype=h5py.string_dtype("utf-8"), chunks=(rows,))
        self._count = 0
        self._opened_at = time.monotonic()

    def add(self, item_id: str, path: str, kind: str, arrays: dict[str, np.ndarray], note: str = "",
            source: str = "", replaces: str = "") -> None:
        """Append one video; arrays are keyed by the names of settings.arrays(), with their shapes; `note`
        says what was wrong with an item kept anyway (committed with it, so never recorded twice);
        `source` is the stamp of what it was extracted from (extract/stamps.py), `replaces` the stamp of
        the cached row of the id it replaces (its source changed)."""
        values = {}
        for spec in self.settings.arrays():
            values[spec.name] = np.asarray(arrays[spec.name], dtype=spec.dtype)
            expected = self.settings.shape_of(spec)
            if values[spec.name].shape != expected:
                raise ValueError(f"{item_id}: {spec.name} has shape {values[spec.name].shape}, cache expects {expected}")
        values.update(zip(STRINGS, (item_id, path, kind, note, source, replaces), strict=True))
        with self._writing():
            if self._file is None:
                self._open_shard()
            i = self._count
            for name, value in values.items():
                ds = self._datasets[name]
                ds.resize(i + 1, axis=0)
                ds[i] = value
        self._count += 1
        if self._count >= self.max_items:
            self.commit()
        self.commit_if_due()

    def commit_if_due(self) -> None:
        """Commit the shard being written if it was begun `max_seconds` ago or more (also called while no item
        comes: a decode stalled on one file does not hold the others' regions uncommitted)."""
        if self._file is not None and time.monotonic() - self._opened_at >= self.max_seconds:
            self.commit()

    def commit(self) -> None:
        """Finish the current shard: flush, fsync, rename into place. No-op when nothing is pending."""
        if self._file is None:
            return
        with self._writing():
            for ds in self._datasets.values():  # an add() interrupted half-way leaves a partial last row: drop it
                if ds.shape[0] != self._count:
                    ds.resize(self._count, axis=0)
            self._file.attrs["complete"] = True
            self._file.attrs[COMMITTED_ATTR] = time.time()
            self._file.flush()
            self._datasets = {}
            self._file.close()
            self._file = None
            fsync_path(self._tmp_path)
            final = self._tmp_path.with_name(self._tmp_path.name[: -len(TMP_SUFFIX)])
            os.replace(self._tmp_path, final)
            self._tmp_path = None
            fsync_path(self.shard_dir)
        self.committed_items += self._count
        self._count = 0

    @property
    def pending_items(self) -> int:
        return self._count

    def record_failure(self, item_id: str, path: str, reason: str, source: str = "") -> None:
        """One failed item; `source`: the stamp of the file that failed (extract/stamps.py), "" unknown."""
        self._log(FAILURE_DIR, {"id": item_id, "path": path, "reason": reason, **({"source": source} if source else {})})

    def clear_failure(self, item_id: str, path: str) -> None:
        """The item's failure no longer holds (its file is again the one the cache holds)."""
        self._log(FAILURE_DIR, {"id": item_id, "path": path, "cleared": True})

    def record_move(self, item_id: str, before: str, path: str) -> None:
        """A cached item found at `path`, its file at `before` gone: the reader gives its new path."""
        self._log(MOVES_DIR, {"id": item_id, "from": before, "to": path})

    def record_removals(self, removed: list[tuple[str, tuple[str, int], str, str]]) -> None:
        """Cached items dropped (`extract --prune`: their files are no longer there), each (id, its row (shard key,
        row), path, reason): the reader leaves those rows out. Written together, fsynced once."""
        self._log(REMOVED_DIR, *({"id": item_id, "shard": row[0], "row": row[1], "path": path, "reason": reason}
                                 for item_id, row, path, reason in removed))

    def _log(self, folder: str, *records: dict) -> None:
        path = self.cache_dir / folder / f"{self.writer_name}.jsonl"
        try:
            if folder not in self._logs:
                self._logs[folder] = RecordLog(path)
            self._logs[folder].append_all(list(records))
        except OSError as err:
            raise write_failure(path, err, "the shards committed before are kept; make room and re-run the same "
                                           "command to resume") from None

    def record_passed_over(self, roots: list[Path], problems: list[tuple[str, str]], drop_gone: bool = False) -> None:
        """Keep what discovery left out, for `inspect --failures`: this run's (path, reason) problems
        replace the writer's earlier record of every path under `roots` (a path mended since drops out);
        what it recorded under other roots stays, unless `drop_gone` (extract --prune) and it is no longer
        there (a folder moved or deleted). Paths are kept absolute and printable (a name that is not UTF-8
        is one of the problems)."""
        def absolute(path) -> str:
            return printable(os.path.abspath(path))

        below = [absolute(root) for root in roots]
        kept = [record for path, record in read_passed_over(self.cache_dir, self.writer_name).items()
                if not lies_under(path, below)
                and not (drop_gone and not os.path.lexists(path))]
        now = time.time()
        records = kept + [{"path": absolute(path), "reason": printable(reason), "time": now} for path, reason in problems]
        target = passed_over_path(self.cache_dir, self.writer_name)
        if not records and not target.exists():
            return
        try:
            write_json(target, records)
        except OSError as err:
            raise write_failure(target, err, "nothing was extracted yet; make room and re-run the same command") from None

    def close(self) -> None:
        try:
            self.commit()
        finally:
            for log in self._logs.values():
                log.close()
            self.lock.release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is not None and self._made_dir:  # an extract that failed before writing anything
            remove_untouched_cache(self.cache_dir, self._made_dir)
