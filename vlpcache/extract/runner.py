"""`vlpcache extract`: sources -> reader (decode workers) -> mapper (detector) -> shard writer.

The driver plans a run once (discovery, detector choice, cache settings, the resume check) and keeps
the progress bar and the summary; the engine decides where the stages run: `local` (decoding worker
processes, the detector in this process: `detect_and_write`) or `ray` (ray_engine.py: the same
stages on Ray Data).

Resumable: items already in the cache are skipped, items recorded as failed too (unless
--retry-failed). Shards are committed atomically, so a kill -9 loses at most the shard in progress.
An item whose source changed since it was cached (extract/stamps.py) is extracted again, its new row
naming the one it replaces (the reader takes the row no other replaces); so is an item whose row a read
found damaged (the reader recorded it and leaves that row out).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlpcache.cache.manifest import read_failures, read_manifest
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import LOCK_DIR, MANIFEST_NAME, SHARD_DIR, CacheSettings
from vlpcache.cache.writer import ShardWriter, check_cache_settings
from vlpcache.errors import UserError
from vlpcache.extract.detectors.choice import choose_detector, load_detector
from vlpcache.extract.detectors.spec import DetectorSpec
from vlpcache.extract.options import ENGINES, ExtractOptions
from vlpcache.extract.progress import ExtractProgress, ExtractSummary
from vlpcache.extract.reader import IDLE, IDLE_AFTER_S, FrameReader, Prefetch, decoded_items_within_budget
from vlpcache.extract.sources import (SIZES_DIFFER, SKIPPED, OtherFiles, discover_items, other_files, passed_over_line,
                                      picture_beside, shard_of)
from vlpcache.extract.stamps import source_changed, stamp_known
from vlpcache.files import lies_under, may_write, read_only_reason, same_file
from vlpcache.interrupts import stop_if_interrupted
from vlpcache.report import printable, said_if_slow, say, sayer
from vlpcache.workspace import Workspace


@dataclass
class Plan:
    todo: list  # the items to extract
    clashes: list[tuple[str, str]]  # (path, reason) of each passed over: its id or its file is cached from another
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (id, old path, new path) of cached items
    # whose file is gone, taken to be the files now found under their ids
    copied: list[tuple[str, str, str]] = field(default_factory=list)  # (id, old path, new path) of cached items
    # found under their ids with the content they were extracted from, their first file still there (a copy of
    # the data, a copied project): read from the new path, as the moved ones
    changed: int = 0  # cached items whose source changed since: extracted again (the new rows replace the old)
    retried: int = 0  # items recorded as failed whose source changed since: tried again
    redone: int = 0  # items whose cached row a read found damaged (the reader leaves it out): extracted again
    mended: list[tuple[str, str]] = field(default_factory=list)  # (id, path) of cached items recorded as failed
    # when their source had changed, whose source is again what the cache holds: the failure no longer holds
    # cached items under the roots that discovery no longer finds: (id, path, why, its row), why "gone" (no file
    # there) or "no longer an item" (there, but not an item with these options: a frames folder now photos)
    gone: list[tuple[str, str, str, tuple[str, int]]] = field(default_factory=list)
    gone_failures: list[tuple[str, str]] = field(default_factory=list)  # (id, path): failed, and the file gone


def items_to_extract(items, cache: RegionCache, options: ExtractOptions, summary: ExtractSummary,
                     roots: list[Path] = (), linked: dict[str, str] | None = None) -> Plan:
    """This shard's items that are not cached (or cached from a source that has changed since) and not
    (unless --retry-failed, or the file changed since it failed) recorded as failed; and the (path,
    reason) of each one passed over because an earlier extract cached its id from another file (a second
    batch of `0001.mp4`s), or its file under another id (`data` after `data/train`, or through a folder link in
    `linked`); how many cached ids came from files no longer there, taken to be these ones, moved; and the
    cached items (and failed ones) under the roots that are no longer found there (Plan.gone)."""
    shard_index, shard_count = options.shard_part()
    failed_before = cache.failures
    cached = {item_id: i for i, item_id in enumerate(cache.ids)}
    cached_id = {path: item_id for item_id, path in zip(cache.ids, cache.paths)}
    plan = Plan([], [])
    fresh: dict[str, list] = {}  # real path -> the items never cached before that are that file
    order = {item.id: n for n, item in enumerate(items)}

    def failed_as_it_is(item_id: str, path: str) -> bool:
        """Recorded as failed, from the source as it is now (a failure without a stamp: as it may be)."""
        return item_id in failed_before and not source_changed(failed_before[item_id].get("source", ""), path)

    for item in items:
        if shard_of(item.id, shard_count) != shard_index:
            summary.other_shards += 1
            continue
        path = str(item.path)
        if item.id in cached:
            i = cached[item.id]
            before = cache.paths[i]
            same = before == path or same_file(before, path)
            gone = not same and not os.path.lexists(before)  # moved here, if its content agrees
            copy = not (same or gone) and stamp_known(cache.sources[i]) and not source_changed(cache.sources[i], path)
            if not (same or gone or copy) and picture_beside(before, cache.kinds[i], item.path, item.kind):
                plan.clashes.append((path, f"id '{item.id}' is cached from the picture beside it, {before}, which an "
                                           f"earlier extract took; {SKIPPED} "
                                           "(to have the video instead, move the picture out of the folder and extract "
                                           "again)"))
            elif not (same or gone or copy):
                plan.clashes.append((path, f"id '{item.id}' is already cached, extracted from {before} by an "
                                           f"earlier extract; {SKIPPED} (extract it into another cache, or from a root "
                                           f"that names it otherwise)"))
            elif not source_changed(cache.sources[i], path):
                summary.skipped_cached += 1
                if gone:
                    plan.moved.append((item.id, before, path))
                elif copy:
                    plan.copied.append((item.id, before, path))
                if item.id in failed_before:
                    plan.mended.append((item.id, path))
            elif failed_as_it_is(item.id, path) and not options.retry_failed:
                summary.skipped_failed += 1  # changed, and its new content failed
            else:  # changed under its path, or moved and changed
                plan.todo.append(dataclasses.replace(item, replaces=cache.sources[i]))
                plan.changed += 1
        elif path in cached_id:
            plan.clashes.append((path, f"already cached as '{cached_id[path]}' by an earlier extract from another "
                                       f"root; {SKIPPED} (captions name it '{cached_id[path]}')"))
        elif item.id in cache.damaged:
            plan.todo.append(item)
            plan.redone += 1
        elif item.id in failed_before and not options.retry_failed:
            if failed_as_it_is(item.id, path):
                summary.skipped_failed += 1
            else:  # replaced since it failed
                plan.todo.append(item)
                plan.retried += 1
        elif (real := os.path.realpath(path)) != path and real in cached_id:
            plan.clashes.append((path, f"a link to {real}, already cached as '{cached_id[real]}'; {SKIPPED} (captions "
                                       f"name it '{cached_id[real]}')"))
        elif (clash := cached_through_link(path, linked or {}, cached_id)) is not None:  # by an extract before
            plan.clashes.append((path, clash))
        else:
            fresh.setdefault(real, []).append(item)
    for real, same in fresh.items():  # a file and links to it found in this run: the file itself, else the first
        keep = next((item for item in same if str(item.path) == real), same[0])
        plan.todo.append(keep)
        plan.clashes += [(str(item.path), f"the same file as '{keep.id}' ({real}), which this run extracts; {SKIPPED} "
                                          f"(captions name it '{keep.id}')") for item in same if item is not keep]
    plan.todo.sort(key=lambda item: order[item.id])  # in discovery order, as found
    plan.gone, plan.gone_failures = no_longer_there(items, cache, failed_before, roots, shard_index, shard_count)
    return plan


def frames_cached(cache_dir: Path) -> frozenset[str]:
    """The paths of the frames folders a cache holds whose frames were of one size: discovery need not look into
    them again (a folder whose sampled images differed is looked into: an extract before this one kept it as one
    item, with a note, where it is photos)."""
    if not (Path(cache_dir) / MANIFEST_NAME).is_file():
        return frozenset()
    try:
        with RegionCache(cache_dir, say=lambda line: None, say_damaged=False) as cache:
            notes = cache.notes if "frames" in cache.kinds else {}
            return frozenset(path for item_id, path, kind in zip(cache.ids, cache.paths, cache.kinds)
                             if kind == "frames" and not notes.get(item_id, "").startswith(SIZES_DIFFER))
    except (UserError, OSError):  # said when the cache is opened to write
        return frozenset()


def cached_through_link(path: str, linked: dict[str, str], cached_id: dict[str, str]) -> str | None:
    """Why `path` is passed over where an earlier extract cached it through a link to a folder that discovery now
    passes over for the folder's own path (it walked `a_link/x.mp4` for `z_real/x.mp4`); None where none did."""
    for link, real in linked.items():
        if path == real or path.startswith(real.rstrip(os.sep) + os.sep):
            if (through := link + path[len(real):]) in cached_id:
                return (f"already cached as '{cached_id[through]}' from {through}, a link to it that is now passed "
                        f"over; {SKIPPED} (captions name it '{cached_id[through]}')")
    return None


def no_longer_there(items, cache: RegionCache, failed: dict[str, dict], roots, shard_index: int, shard_count: int):
    """(Plan.gone, Plan.gone_failures): this shard's cached items whose paths lie under one of the roots
    that exist, and that discovery did not find; the failed ones whose file is gone. A root that is not
    there (an unmounted disk) counts for nothing."""
    there = [root for root in roots if os.path.exists(root)]
    # a root as given and as it resolves: a root given through a symbolic link covers the items cached
    # from its target, and the reverse
    under = tuple({*(os.path.normpath(os.path.abspath(root)) for root in there), *map(os.path.realpath, there)})
    if not under:
        return [], []

    @functools.lru_cache(maxsize=65536)
    def real_folder(folder: str) -> str:  # once a folder: a million items live in far fewer
        return os.path.realpath(folder)

    def real(path: str) -> str:
        return os.path.join(real_folder(os.path.dirname(path)), os.path.basename(path))

    found = {item.id for item in items}
    # a cached file found under another id, or through a link, is there
    found_paths = {form for item in items for form in (os.path.normpath(str(item.path)), real(str(item.path)))}

    def within(path: str) -> bool:
        return lies_under(path, under)

    def lost(item_id: str, path: str) -> bool:
        path = os.path.normpath(path)
        if item_id in found or path in found_paths or shard_of(item_id, shard_count) != shard_index:
            return False  # (a path found as it is: no need to resolve it)
        resolved = real(path)
        return (within(path) or within(resolved)) and resolved not in found_paths

    gone = [(item_id, path, "gone" if not os.path.lexists(path) else "no longer an item", cache.row_of(item_id))
            for item_id, path in zip(cache.ids, cache.paths) if lost(item_id, path)]
    gone += [(item_id, record["path"], "gone", (record["shard"], record["row"])) for item_id, record in cache.damaged.items()
             if lost(item_id, record["path"]) and not os.path.lexists(record["path"])]  # found damaged, then its file went
    failures = [(item_id, record["path"]) for item_id, record in failed.items()
                if isinstance(record.get("path"), str) and lost(item_id, record["path"])
                and not os.path.lexists(record["path"]) and item_id not in cache]
    return gone, failures


def prune(plan: Plan, writer: ShardWriter | None, dropping: bool) -> None:
    """Say which cached items under the roots are no longer there; with --prune, drop them from the cache
    (the reader leaves their rows out) and clear the failures of files that are gone."""
    parts = []
    if plan.gone:
        item_id, path, why, _ = plan.gone[0]
        parts.append(f"{len(plan.gone)} cached item(s) {'that are' if dropping else 'under these roots are'} no longer "
                     f"there{' under these roots' if dropping else ''} (e.g. {printable(item_id)!r}: {printable(path)} "
                     f"{'is gone' if why == 'gone' else 'is there but ' + why})")
    if plan.gone_failures:
        parts.append(f"{len(plan.gone_failures)} recorded failure(s) of files that are gone")
    what = " and ".join(parts)
    if not dropping:
        say(f"extract: {what}; {'search still finds them' if plan.gone else 'inspect --failures lists them'}: add "
            "--prune to drop them from the cache")
        return
    # a failure its file's later content mended is hidden while the item is cached: it goes with the item
    recorded = read_failures(writer.cache_dir) if plan.gone else {}
    writer.record_removals([(item_id, row, path, why) for item_id, path, why, row in plan.gone])
    for item_id, path, why, row in plan.gone:
        if item_id in recorded:
            writer.clear_failure(item_id, recorded[item_id].get("path", path))
    for item_id, path in plan.gone_failures:
        writer.clear_failure(item_id, path)
    say(f"extract: dropped {what} (--prune)" + ("; `vlpcache index` drops them from the index" if plan.gone else ""))


def say_some(problems: list[tuple[str, str]], first: int = 5) -> None:
    """The first few (path, reason) lines, then how many more (inspect --failures lists them all)."""
    for path, reason in problems[:first]:
        say(f"{printable(path)}: {reason}")
    if len(problems) > first:
        say(f"... and {len(problems) - first} more such path(s); inspect --failures lists them")


def detect_and_write(todo, spec: DetectorSpec, writer: ShardWriter, options: ExtractOptions,
                     summary: ExtractSummary, started: float) -> None:
    """The local engine: decode `todo` in worker processes, run the detector on the frames in this
    process, write each item or its failure."""
    from vlpcache.devices import resolve_device
    from vlpcache.extract.mapper import RegionMapper

    reader = FrameReader(options.frames, spec.max_side, options.worker_count(), timeout=options.decode_time_limit())
    # the workers start decoding now, while torch and the networks load, up to about 256 MB of
    # decoded frames ahead (yolox at T=8: 64 items, four CUDA batches)
    depth = decoded_items_within_budget(spec.max_side, options.frames)
    with (Prefetch(reader(todo), depth=depth, stop=reader.stop, idle_after=IDLE_AFTER_S) as decoded,
          ExtractProgress(summary, len(todo), options.description(), spec.detector, started, options.quiet,
                          writer.cache_dir) as progress):
        device = resolve_device(options.device).type
        detector = load_detector(spec, device, options.score_threshold, options.autotune)
        mapper = RegionMapper(detector, writer.settings, options.detector_batch_size(device))
        progress.ready()
        try:
            for result in mapper(decoded):
                if result is IDLE:  # no item for a while: what is due is committed all the same
                    writer.commit_if_due()
                else:
                    progress.advance(str(result.decoded.item.path), result.write(writer), result.error, result.note)
                stop_if_interrupted()
        finally:
            summary.detect_seconds, summary.wait_seconds = mapper.detect_seconds, mapper.wait_seconds


def extract_engine(options: ExtractOptions):
    """None for the local engine; for `ray`, the ray_engine module, once Ray is found installed and the
    cluster's address answering (one clear line otherwise)."""
    if options.engine not in ENGINES:
        raise UserError(f"--engine {options.engine!r}: choose from {', '.join(ENGINES)}")
    if options.engine == "local":
        if options.ray_address:
            raise UserError("--ray-address is for --engine ray; add --engine ray or leave the address out")
        return None
    from vlpcache.extract import ray_engine

    ray_engine.require_ray()
    ray_engine.check_address(options.ray_address)
    return ray_engine


def nothing_found(roots: list[Path], cache_dir: Path) -> UserError:
    """The error of a run that found no media under its roots, saying where the cache holds items of them (a root
    emptied, or moved away: --prune drops them)."""
    line = f"no videos, images or frame folders found under {', '.join(map(printable, roots))}: {printable(other_files(roots))}"
    if (Path(cache_dir) / MANIFEST_NAME).exists():
        under = [os.path.abspath(root) for root in roots]
        with RegionCache(cache_dir, say_damaged=False) as cache:
            gone = sum(lies_under(path, under) for path in map(os.path.abspath, cache.paths))
        if gone:
            line += (f"; the cache holds {gone:,} item(s) extracted from there, no longer there (search still finds "
                     "them): add --prune to drop them from the cache")
    return UserError(line)


def existing_settings(cache_dir: Path) -> CacheSettings | None:
    """The settings of the cache in `cache_dir`, None where there is none yet."""
    return read_manifest(cache_dir) if (Path(cache_dir) / MANIFEST_NAME).is_file() else None


def read_only_cache(cache_dir: Path) -> bool:
    """Whether `cache_dir` holds a cache this user may not write (a shared, finished one: another user's, made
    read-only, or on a read-only mount): extract then takes no lock, which it could not, and writes nothing."""
    cache_dir = Path(cache_dir)
    return (cache_dir / MANIFEST_NAME).is_file() and not all(map(may_write, (cache_dir, cache_dir / LOCK_DIR,
                                                                           cache_dir / SHARD_DIR)))


def check_read_only_cache(items, cache_dir: Path, settings, options: ExtractOptions, summary: ExtractSummary,
                          roots: list[Path], linked: dict[str, str]) -> None:
    """Extract into a cache this user may not write: where it holds every item as it is now, it is up to date, said
    as a writable cache's summary says it; where there is work (items to extract, moves or mended failures to record,
    what --prune would drop), one line that the cache is read-only, before any detector loads."""
    check_cache_settings(cache_dir, settings)
    with RegionCache(cache_dir, say_damaged=False) as cache:
        plan = items_to_extract(items, cache, options, summary, roots, linked)
    say_some(plan.clashes)
    summary.passed_over += len(plan.clashes)
    work = [*([f"{len(plan.todo)} item(s) to extract"] if plan.todo else []),
            *([f"{len(plan.moved) + len(plan.copied)} moved item(s) to record"] if plan.moved or plan.copied else []),
            *([f"{len(plan.mended)} mended failure(s) to clear"] if plan.mended else []),
            *([f"{len(plan.gone) + len(plan.gone_failures)} item(s) or failure(s) to drop (--prune)"]
              if options.prune and (plan.gone or plan.gone_failures) else [])]
    if work:
        raise UserError(f"{cache_dir}: the cache is read-only ({read_only_reason(cache_dir)}) and this extract has "
                        f"{', '.join(work)}; nothing was written; extract into a cache you can write (-o DIR), or ask "
                        "its owner to run it")
    if plan.gone or plan.gone_failures:
        prune(plan, None, dropping=False)  # only said


def remember_given(workspace: Workspace, roots: list[Path], spec: DetectorSpec, options: ExtractOptions) -> None:
    """Record in the workspace what extract was given: its roots (pretrain finds caption files beside them), and a
    --weights file (`search --like FILE` extracts a clip outside the cache with it, by the sha256 the cache holds)."""
    workspace.remember_roots([r for r in roots if r.exists()])
    if options.weights and spec.detector_file is not None:
        workspace.remember_weights(spec.provenance["detector_weights_sha256"], spec.detector_file)


def run_extract(roots, cache_dir=None, **options) -> ExtractSummary:
    """The `vlpcache extract` command; `options` are ExtractOptions fields."""
    started = time.monotonic()
    options = ExtractOptions(**options).with_detector_defaults()
    engine = extract_engine(options)  # ray: installed, and its address answers, before anything is written
    options.decode_time_limit()  # a bad --decode-timeout too
    options.shard_part()  # and a bad --shard, before the detector's weights are looked for (or fetched)
    workspace = Workspace()
    cache_dir = Path(cache_dir) if cache_dir else workspace.cache_dir
    roots = [Path(r) for r in roots]

    others = OtherFiles()
    where = ", ".join(printable(str(root)) for root in roots[:3]) + (f" and {len(roots) - 3} more" if len(roots) > 3 else "")
    with said_if_slow(f"extract: looking for videos, images and frame folders under {where}...", sayer(options.quiet)):
        items, problems = discover_items(roots, options.frame_folders, others, linked := {}, lambda: frames_cached(cache_dir))
    for path, reason in problems:
        say(f"{printable(path)}: {reason}")
    if items and (line := passed_over_line(others)):
        say(printable(line))
    passed_over = [(path, reason) for path, reason in problems if f"; {SKIPPED}" in reason]
    if not items and not options.prune:  # with --prune, a root emptied on purpose is pruned
        raise nothing_found(roots, cache_dir)

    if options.device == "cuda" and engine is None:  # a missing GPU fails before anything is written; auto
        # resolves while the workers decode; the ray engine asks the cluster
        from vlpcache.devices import resolve_device

        resolve_device(options.device)
    spec = choose_detector(options.detector, options.backbone, options.weights, options.models,  # nothing loaded yet
                           options.input_scale(), options.proposals)
    settings = spec.cache_settings(options.frames, options.regions, options.score_threshold, existing_settings(cache_dir))
    summary = ExtractSummary(passed_over=len(passed_over))
    if read_only_cache(cache_dir):
        check_read_only_cache(items, cache_dir, settings, options, summary, roots, linked)
        workspace.remember_roots([r for r in roots if r.exists()])
        return summary_said(summary, started)
    # the driver's writer owns the shard set: it checks the settings and removes the unfinished shards
    # of a killed run, its own and (named `<shard set>-ray-<actor>`) those of its Ray actors
    with ShardWriter(cache_dir, settings, writer_name=options.shard_set(), max_items=options.items_per_shard) as writer:
        remember_given(workspace, roots, spec, options)  # settings taken, shard set held: a refused run records none
        cache = RegionCache(cache_dir, say_damaged=False)  # said below, with what extract does about them
        with said_if_slow(f"extract: {len(items):,} items found; checking them against the {len(cache):,} the cache "
                          "holds (what changed, moved or failed before)...", sayer(options.quiet)):
            plan = items_to_extract(items, cache, options, summary, roots, linked)
        cache.close()
        todo = plan.todo
        say_some(plan.clashes)
        for move in plan.moved + plan.copied:
            writer.record_move(*move)
        if plan.copied:
            item_id, before, path = plan.copied[0]
            say(f"extract: {len(plan.copied)} cached item(s) found here hold the content they were extracted from "
                f"elsewhere, which is still there (a copy of the data; e.g. {printable(item_id)!r}, from "
                f"{printable(before)}): read from here from now on, not extracted again")
        if plan.moved:
            say(f"extract: {len(plan.moved)} cached item(s) were extracted from files that are no longer there; taken to "
                f"be the files now found under the same ids (moved), not extracted again, and read from their new paths")
        if plan.changed:
            say(f"extract: {plan.changed} cached item(s) changed on disk since they were extracted (another size, "
                f"content or set of frames); extracting them again: what they give replaces what the cache held "
                f"(then `vlpcache index` indexes them anew)")
        if plan.retried:
            say(f"extract: {plan.retried} item(s) recorded as failed have changed on disk since; trying them again")
        if plan.gone or plan.gone_failures:
            prune(plan, writer, options.prune)
        if plan.redone:
            say(f"extract: {plan.redone} cached item(s) were found damaged by a read (a disk fault or a bad copy of their "
                f"shard); extracting them again (then `vlpcache index` adds them back)")
        for item_id, path in plan.mended:
            writer.clear_failure(item_id, path)
        if plan.mended:
            say(f"extract: {len(plan.mended)} item(s) recorded as failed are again the files the cache holds; their "
                f"failures are cleared")
        summary.passed_over += len(plan.clashes)
        writer.record_passed_over(roots, passed_over + plan.clashes, drop_gone=options.prune)
        if todo and engine:
            engine.run_on_ray(todo, spec, writer, options, summary, started)
        elif todo:
            detect_and_write(todo, spec, writer, options, summary, started)
    return summary_said(summary, started)


def summary_said(summary: ExtractSummary, started: float) -> ExtractSummary:
    summary.seconds = time.monotonic() - started
    say(summary.line())
    return summary
