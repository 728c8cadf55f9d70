"""What the reader and the writer both read of a cache directory: the manifest (settings every shard
shares), the failure logs (one JSON line per failed item), the paths extraction passed over while
looking for media, and whether a shard file agrees with the settings."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

from vlpcache.cache.schema import (COLLECTION_KEY, DAMAGED_DIR, FAILURE_DIR, MANIFEST_NAME, MOVES_DIR, PASSED_OVER_SUFFIX,
                                   REMOVED_DIR, STRINGS, CacheSettings, layout_damage, shard_differences)
from vlpcache.files import system_reason
from vlpcache.records import json_lines, read_optional_json
from vlpcache.report import say

# what reading a damaged HDF5 file raises
UNREADABLE = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def read_manifest(cache_dir: Path) -> CacheSettings:
    return CacheSettings.read(
        Path(cache_dir) / MANIFEST_NAME,
        missing=f"{cache_dir}: not a vlpcache cache (no {MANIFEST_NAME}); run `vlpcache extract` first",
        what="manifest",
    )


def collection_of(cache_dir: Path) -> str:
    """Which collection a cache holds: its manifest's random id, the same in a copy or after a move (an
    index built over the cache serves them too); for a cache made before manifests had one, its path."""
    manifest = read_optional_json(Path(cache_dir) / MANIFEST_NAME)
    collection = manifest.get(COLLECTION_KEY) if isinstance(manifest, dict) else None
    return collection if isinstance(collection, str) and collection else f"path:{Path(cache_dir).resolve()}"


def read_failures(cache_dir: Path, writer: str = "*") -> dict[str, dict]:
    """id -> latest failure record, over every writer's log (or the one `writer` named: a Ray actor's own) (none
    where the latest record clears it: one writer may clear what another recorded); partial lines from a crash
    are ignored."""
    latest = {item_id: records[-1] for item_id, records in _records(Path(cache_dir) / FAILURE_DIR, writer).items()}
    return {item_id: record for item_id, record in latest.items() if not record.get("cleared")}


def read_moves(cache_dir: Path) -> dict[str, list[dict]]:
    """id -> the records of its item found at other paths, {"id", "from", "to", "time"}, oldest first,
    over every writer's log."""
    return _records(Path(cache_dir) / MOVES_DIR)


def read_damaged(cache_dir: Path) -> dict[tuple[str, int], dict]:
    """(shard key, row) -> the record of a row a read found damaged, {"id", "shard", "row", "reason",
    "time"}, over every reader's log."""
    return _row_records(Path(cache_dir) / DAMAGED_DIR)


def read_removed(cache_dir: Path) -> dict[tuple[str, int], dict]:
    """(shard key, row) -> the record of a row `extract --prune` dropped, {"id", "shard", "row", "path",
    "reason", "time"}, over every writer's log."""
    return _row_records(Path(cache_dir) / REMOVED_DIR)


def _row_records(folder: Path) -> dict[tuple[str, int], dict]:
    found = {}
    for records in _records(folder).values():
        for record in records:
            if isinstance(record.get("shard"), str) and isinstance(record.get("row"), int):
                found[record["shard"], record["row"]] = record
    return found


def _records(folder: Path, writer: str = "*") -> dict[str, list[dict]]:
    """id -> its records in the JSON-lines logs of a folder (those of `writer`: "*" every one), by time (writers'
    logs interleave); torn lines are passed over."""
    found: dict[str, list[dict]] = {}
    for log in sorted(folder.glob(f"{writer}.jsonl")):
        try:
            text = log.read_text(encoding="utf-8", errors="replace")
        except OSError as err:  # another user's file, made with a umask of 077: the others still count
            _say_unreadable_log(log, err)
            continue
        for line in json_lines(text):
            try:
                record = json.loads(line)
                found.setdefault(record["id"], []).append(record)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    for records in found.values():
        records.sort(key=lambda record: record.get("time", 0) if isinstance(record.get("time"), (int, float)) else 0)
    return found


_said_unreadable: set[str] = set()  # logs said once a process


def _say_unreadable_log(log: Path, err: OSError) -> None:
    if str(log) in _said_unreadable:
        return
    _said_unreadable.add(str(log))
    owner = "; another user's file? ask its owner to make it readable (chmod a+r)" if err.errno == errno.EACCES else ""
    say(f"note: {log}: cannot be read ({system_reason(err)}): its records ({log.parent.name}) are left out{owner}")


def passed_over_path(cache_dir: Path, writer_name: str) -> Path:
    return Path(cache_dir) / FAILURE_DIR / f"{writer_name}{PASSED_OVER_SUFFIX}"


def read_passed_over(cache_dir: Path, writer_name: str | None = None) -> dict[str, dict]:
    """path -> {"path", "reason", "time"} of each path that discovery left out (a broken link, an
    unreadable folder, a duplicate id...), as the last run over its root found it: over every writer's
    record, or one writer's; a damaged record reads as empty (it is rewritten by the next run)."""
    paths = [passed_over_path(cache_dir, writer_name)] if writer_name else \
        sorted((Path(cache_dir) / FAILURE_DIR).glob(f"*{PASSED_OVER_SUFFIX}"))
    passed_over: dict[str, dict] = {}
    for path in paths:
        records = read_optional_json(path)
        for record in records if isinstance(records, list) else []:
            if not (isinstance(record, dict) and isinstance(record.get("path"), str)
                    and isinstance(record.get("reason"), str) and isinstance(record.get("time"), (int, float))):
                continue
            if record["time"] >= passed_over.get(record["path"], {}).get("time", 0):
                passed_over[record["path"]] = record
    return passed_over


def open_shard(path: Path):
    """A committed shard, read-only (an h5py.File). With HDF5's file lock, as h5py opens files by default:
    opened without it, the same file opened by other code of the process with it fails ("file locking flag
    values don't match"). Where the file system refuses locks (some NFS mounts), lock_refused says so."""
    import h5py

    # no chunk cache: a read takes one video, its own chunk, so a cache of chunks is never hit again, and
    # h5py's default (1 MiB per dataset) held about 10 MB per open shard: 2 GB over 200 shards of random reads
    return h5py.File(path, "r", rdcc_nbytes=0)


def first_line(err: BaseException) -> str:
    """Why h5py could not read a shard, as unreadable_shards and the lines about a shard give it."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def lock_refused(err: BaseException) -> str:
    """What to do where HDF5 could not lock a shard (its message says "unable to lock file"), or the
    process holds it open with other locking flags, else ""."""
    text = str(err).lower()
    if "flag values don't match" in text:  # HDF5's words for an h5py.File(..., locking=False or swmr=True)
        return ("this process holds the file open already with other HDF5 locking flags (an h5py.File opened "
                "with locking=False or swmr=True?): close that, or open it as h5py does by default")
    if "unable to lock file" not in text:  # HDF5's words ("block" is no lock)
        return ""
    return ("HDF5 could not lock the file: a file system without lock support (some NFS mounts)? set "
            "HDF5_USE_FILE_LOCKING=FALSE in the environment and run again (shards are never written once "
            "committed), or another program holds it open for writing")


# HDF5's words for a file or object of a format version it does not know: "bad version number for layout message",
# "bad object header version number", "bad superblock version number", "incorrect ... version", "... out of bounds"
_NEWER_FORMAT = re.compile(r"\b(bad|wrong|incorrect|unknown|unsupported)\b[^()]*\bversion\b|\bversion\b[^()]*\bout of bounds\b",
                           re.IGNORECASE)


def newer_hdf5(reason: str) -> str:
    """Where HDF5 could not read a shard (`reason`: h5py's first line) for a format version it does not know,
    which a newer HDF5 wrote (HDF5 2.0's, for one, writing "latest" as vlpcache did before schema.HDF5_FORMAT):
    what it is and what to do, else "". Such a shard is not damaged: its items are not to be extracted again."""
    import h5py

    if not _NEWER_FORMAT.search(re.sub(r"name = '[^']*'", "", reason)):  # not a word of the file's own name
        return ""
    return (f"written by a newer HDF5 than this h5py {h5py.version.version} (HDF5 {h5py.version.hdf5_version}) reads, "
            "not damaged: upgrade h5py (pip install -U 'h5py>=3.16'; built on HDF5 2.0, it reads every shard vlpcache "
            "has written)")


def shard_file_differences(shard, settings: CacheSettings) -> list[str]:
    """schema.shard_differences of an open shard file (an h5py.File): empty when it agrees with settings.
    ValueError (UNREADABLE) where it agrees but its datasets break the layout of every shard (schema.layout_damage)."""
    columns = {name: (shard[name].shape, shard[name].dtype)
               for name in (*(spec.name for spec in settings.arrays()), *STRINGS) if name in shard}
    diffs = shard_differences(settings, shard.attrs, {name: shape for name, (shape, _) in columns.items()})
    if not diffs and (damage := layout_damage(settings, columns)):
        raise ValueError(damage)
    return diffs
