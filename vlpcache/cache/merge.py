"""`vlpcache merge`: several caches of the same settings into one, so that a collection extracted apart (a
cache per array task) is indexed, searched, served and evaluated as one.

The sources are left as they are. Each shard a source reads comes into the target's shards/ as
`m-<source's collection>-<its name>` (every cache has its own `s0of1-00000.h5`): a hard link where both
are on one filesystem (no copy and no space: a committed shard is never written again), else a copy.
Its records come with it: failures, moves, the paths passed over, and the rows dropped by `extract
--prune` or found damaged, whose shard names are rewritten to the new ones (so the merged cache leaves
out what the source leaves out). The records of a source are written before its shards, and each shard
lands whole (a temporary renamed into place), so a merge stopped at any moment (Ctrl-C, kill -9, a
full disk) leaves a cache that every reader reads, and the same command brings the rest: a shard that
is there already is passed over.

Before anything is written: every source must hold the same settings as the others and the target (a
cache of other features could not be searched with them), and no id may name different files in two
of them (the merged cache would read only one: which?). An id that two caches hold for the same file
(overlapping extracts) is read as one cache's overlapping extracts are: the row committed last. A copy of a
cache keeps its collection id: it merges with its original where only one of them grew since the copy (the
shards they share are there once, the longer record logs stay), and is refused where both did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from vlpcache.cache.manifest import collection_of, open_shard, read_manifest
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import (COMMITTED_ATTR, DAMAGED_DIR, FAILURE_DIR, MANIFEST_NAME, MOVES_DIR, PASSED_OVER_SUFFIX,
                                   REMOVED_DIR, SHARD_DIR, SHARD_SUFFIX)
from vlpcache.cache.writer import MERGE_WRITER, held_writer, open_cache_dir, take_writer_lock
from vlpcache.errors import UserError
from vlpcache.files import fsync_path, replace_atomically, system_reason, write_failure
from vlpcache.locks import LOCK_SUFFIX, holder_description
from vlpcache.records import json_lines
from vlpcache.report import Say, human_size, items_word, printable, progress_bar, say

MERGED_PREFIX = "m-"
PARTIAL_SUFFIX = ".merging"  # a shard being brought in: never read (not *.h5), removed by the next merge
MERGE_AGAIN = "the shards merged before are kept; make room and run the same command again to bring the rest"


def merged_name(collection: str, name: str) -> str:
    """The name a source's shard or record file takes in the merged cache."""
    return f"{MERGED_PREFIX}{hashlib.blake2b(collection.encode('utf-8'), digest_size=6).hexdigest()}-{name}"


def merge_caches(sources: list, target, progress: bool = True, say: Say = say) -> dict:
    """Bring every source cache's shards and records into `target` (created where it is not a cache);
    returns {"items", "shards": {"linked", "copied", "present"}, "bytes_copied", "shared_ids"}."""
    sources, target = [Path(s) for s in sources], Path(target)
    readers, existing = _checked_sources(sources, target, say)
    shared = _shared_ids(readers, existing)
    counts = {"linked": 0, "copied": 0, "present": 0}
    copied_bytes = 0
    busy = (lambda holder: f"{target}: another merge into it is running ({holder}); wait for it to finish (it brings "
            "what this one would), then run this one again if it had other caches")
    with take_writer_lock(target, MERGE_WRITER, busy):
        if (path := held_writer(target, f"s*of*{LOCK_SUFFIX}")) is not None:  # its ids were read before: they may clash
            raise UserError(f"{target}: an extract is writing it ({holder_description(path)}); wait for it to finish, "
                            "then merge (the ids it caches meanwhile are checked against the merged caches' then)")
        open_cache_dir(target, readers[0].settings)  # a new cache gets a collection id of its own
        for leftover in (target / SHARD_DIR).glob(f"*{SHARD_SUFFIX}{PARTIAL_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a killed merge's (this one holds the merge lock)
        collections = [collection_of(reader.cache_dir) for reader in readers]
        shards = [(collection, shard) for reader, collection in zip(readers, collections) for shard in _read_shards(reader)]
        written: dict[Path, str] = {}  # record files this merge wrote: a copy's come after its original's
        for reader, collection in zip(readers, collections):
            _bring_records(reader.cache_dir, target, collection, say, written)
        with progress_bar(shards, unit="shard", desc="merge", disable=not progress, leave=False) as bar:
            for collection, shard in bar:
                how, size = _bring_shard(shard, target / SHARD_DIR / merged_name(collection, shard.name))
                counts[how] += 1
                copied_bytes += size
        fsync_path(target / SHARD_DIR)
    merged = RegionCache(target, say=lambda line: None)
    items = len(merged)
    copies = f", {counts['copied']} copied ({human_size(copied_bytes)}: another filesystem)" if counts["copied"] else ""
    present = f", {counts['present']} there already" if counts["present"] else ""
    if left_out := sum(len(reader.shard_paths) for reader in readers) - len(shards):
        present += f"; {left_out} shard(s) the sources leave out themselves (said above) stay out"
    overlap = (f"; {len(shared):,} id(s) two caches hold for the same file (e.g. {printable(shared[0])!r}) are read "
               "once, the row extracted last") if shared else ""
    say(f"merge: {target} holds {items:,} {items_word(merged.kinds)} from {len(readers)} cache(s): {counts['linked']} "
        f"shard(s) linked{copies}{present}{overlap}; the sources are unchanged; `vlpcache index --cache {target}` "
        "indexes it")
    return {"items": items, "shards": counts, "bytes_copied": copied_bytes, "shared_ids": len(shared)}


def _checked_sources(sources: list[Path], target: Path, say: Say) -> tuple[list[RegionCache], RegionCache | None]:
    """Readers of the sources and of the target (None where it is no cache yet), once every check passed."""
    if not sources:
        raise UserError("give the caches to merge: vlpcache merge CACHE... -o TARGET")
    seen: dict[Path, Path] = {}
    for source in sources:
        if not (source / MANIFEST_NAME).is_file():
            raise UserError(f"{source}: not a vlpcache cache (no {MANIFEST_NAME}); give the folders `vlpcache "
                            "extract -o` wrote")
        if target.exists() and os.path.samefile(source, target):
            raise UserError(f"{source} is the target itself; give the caches to bring into it")
        if (real := source.resolve()) in seen:
            raise UserError(f"{source} is given twice" + (f" (also as {seen[real]})" if seen[real] != source else ""))
        seen[real] = source
    settings = read_manifest(sources[0])
    is_cache = (target / MANIFEST_NAME).is_file()
    for other in sources[1:] + ([target] if is_cache else []):
        if diffs := read_manifest(other).differences(settings):
            raise UserError(f"{other} holds other region features than {sources[0]} ({'; '.join(diffs[:3])}): caches "
                            "merge only with the same settings (one model reads them all)")
    readers = [RegionCache(source, say=say) for source in sources]
    _grown_apart(readers)
    return readers, RegionCache(target, say=say) if is_cache else None


def _grown_apart(readers: list[RegionCache]) -> None:
    """One line refusing the merge where two sources are copies of one cache (one collection id) that have both
    written since they were copied: a shard of the same name but other rows, or a log that is not the other's
    with lines added. What a merge brings is named by its collection, and theirs would collide."""
    first: dict[str, RegionCache] = {}
    for reader in readers:
        original = first.setdefault(collection_of(reader.cache_dir), reader)
        if original is reader:
            continue
        theirs = {shard.name: shard for shard in original.shard_paths}
        differs = next((f"each has its own shard {shard.name}" for shard in reader.shard_paths
                        if shard.name in theirs and not _same_shard(shard, theirs[shard.name])), None)
        differs = differs or _logs_apart(original.cache_dir, reader.cache_dir)
        if differs:
            raise UserError(f"{original.cache_dir} and {reader.cache_dir} are copies of one cache that have both grown "
                            f"since ({differs}): a merge names what it brings by the cache it comes from, and theirs "
                            f"would collide; extract the folders of one into the other (`vlpcache extract ROOT... -o "
                            f"{original.cache_dir}`: what it holds is passed over), then merge that one; nothing was written")


def _logs_apart(a: Path, b: Path) -> str | None:
    """"each has its own records in failures/x.jsonl" where a record log of both is neither one the other with
    lines added; None where none is."""
    for log in sorted(a.glob("*/*.jsonl")):
        other = b / log.parent.name / log.name
        if log.parent.name in (FAILURE_DIR, MOVES_DIR, REMOVED_DIR, DAMAGED_DIR) and other.is_file():
            try:
                mine, theirs = log.read_bytes(), other.read_bytes()
            except OSError:  # another user's (a umask of 077): said where the merge brings records
                continue
            if not (mine.startswith(theirs) or theirs.startswith(mine)):
                return f"each has its own records in {log.parent.name}/{log.name}"
    return None


def _shared_ids(sources: list[RegionCache], target: RegionCache | None) -> list[str]:
    """The ids more than one source holds for the same file (the target holds those it merged before as
    they are); one line refusing the merge where an id names different files in two of the caches."""
    first: dict[str, tuple[RegionCache, str]] = {}
    shared, clashes = [], []
    for cache in ([target] if target is not None else []) + sources:
        for item_id, path in zip(cache.ids, cache.paths):
            if (before := first.setdefault(item_id, (cache, path)))[0] is cache:
                continue
            if before[1] != path:
                clashes.append((item_id, before, (cache, path)))
            elif before[0] is not target:
                shared.append((item_id, before, (cache, path)))
    if clashes:
        item_id, (a, a_path), (b, b_path) = clashes[0]
        raise UserError(
            f"{len(clashes):,} id(s) name other files in two of the caches, e.g. {printable(item_id)!r}: "
            f"{printable(a_path)} in {a.cache_dir}, {printable(b_path)} in {b.cache_dir}; a merged cache would read "
            "only one of each: extract the parts with the same ROOTs and --shard i/n (ids are the paths below "
            "the roots), or merge the caches whose ids differ; nothing was written")
    return [item_id for item_id, _, _ in shared]


def _read_shards(reader: RegionCache) -> list[Path]:
    """The shards the source reads (not those it leaves out: unreadable, or of other settings)."""
    read = {key.rsplit("@", 1)[0] for key in reader.read_shards}
    return [shard for shard in reader.shard_paths if shard.name in read]


def _bring_shard(shard: Path, dest: Path) -> tuple[str, int]:
    """Link (else copy) `shard` in as `dest`, whole: ("linked" | "copied" | "present", bytes copied)."""
    if dest.exists():
        if _same_shard(shard, dest):
            return "present", 0
        raise UserError(f"{dest} is there already and is not {shard} (the source's shard was replaced since an "
                        f"earlier merge?); move {dest} out of the cache and merge again")
    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    try:
        try:
            os.link(shard, partial)
            how, size = "linked", 0
        except OSError:  # another filesystem, or links refused (another user's file under protected_hardlinks)
            partial.unlink(missing_ok=True)
            shutil.copyfile(shard, partial)
            fsync_path(partial)
            how, size = "copied", partial.stat().st_size
        os.replace(partial, dest)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise write_failure(dest, err, MERGE_AGAIN) from None
    except BaseException:  # Ctrl-C: the part goes, what landed stays
        partial.unlink(missing_ok=True)
        raise
    return how, size


def _same_shard(a: Path, b: Path) -> bool:
    if os.path.samefile(a, b):
        return True
    if a.stat().st_size != b.stat().st_size:
        return False
    with open_shard(a) as fa, open_shard(b) as fb:
        return float(fa.attrs.get(COMMITTED_ATTR, 0.0)) == float(fb.attrs.get(COMMITTED_ATTR, 0.0))


def _bring_records(source: Path, target: Path, collection: str, say: Say, written: dict[Path, str]) -> None:
    """The source's record files under their merged names; the rows' shard names rewritten where a record
    names one (dropped by --prune, found damaged). Written again by every merge: the source's are current;
    but where a copy of a cache merged with it (one collection) wrote a log that grew from this one, the longer
    stays (`written`: what this merge wrote; _grown_apart refused copies whose logs differ otherwise)."""
    for folder, pattern in ((FAILURE_DIR, "*.jsonl"), (FAILURE_DIR, f"*{PASSED_OVER_SUFFIX}"), (MOVES_DIR, "*.jsonl"),
                            (REMOVED_DIR, "*.jsonl"), (DAMAGED_DIR, "*.jsonl")):
        for log in sorted((source / folder).glob(pattern)):
            if log.name.startswith("."):
                continue
            try:
                text = log.read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as err:  # another user's log (a umask of 077): the shards still come
                say(f"{log}: not merged, it does not read ({system_reason(err, log)}); its records (failures, moves, "
                    f"items dropped or found damaged) stay out of {target}")
                continue
            if folder in (REMOVED_DIR, DAMAGED_DIR):
                text = "".join(_renamed_row(line, collection) for line in json_lines(text, keepends=True))
            dest = target / folder / merged_name(collection, log.name)
            if written.get(dest, "").startswith(text) and log.suffix == ".jsonl":
                continue  # a copy's log that this one's original grew from (the same, or what it was when copied)
            written[dest] = text
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                replace_atomically(dest, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))
            except OSError as err:
                raise write_failure(dest, err, MERGE_AGAIN) from None


def _renamed_row(line: str, collection: str) -> str:
    """A record line naming a shard row ("shard": "<name>@<commit time>") with the shard's merged name; a
    torn line as it is (readers pass it over)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not (isinstance(record, dict) and isinstance(record.get("shard"), str)):
        return line
    record["shard"] = merged_name(collection, record["shard"])
    return json.dumps(record, ensure_ascii=False) + "\n"
