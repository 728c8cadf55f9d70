"""`vlpcache index`: encode every cached video with a run's checkpoint into a FAISS index.

The index follows the run: each (checkpoint, cache settings) has an index of its own in the index root
(layout.index_dir_for), so a newer run is indexed on first use, saying so, and an earlier run's index
stays. Indexing again adds only the items the index lacks (the cache grew since). One process writes an
index at a time (its lock; others wait), and a failed write leaves the index as it was. Videos are
encoded a chunk at a time and each chunk is kept as it is done (parts.py), so an index stopped by
Ctrl-C, kill -9 or a full disk resumes where it was when run again. A video whose cached row is found
damaged is left out, said in one line (the reader records it; extract redoes it, and the next index
run adds it).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlpcache import report
from vlpcache.cache.manifest import collection_of
from vlpcache.cache.reader import BlankWhenDamaged, RegionCache
from vlpcache.devices import DEFAULT_DEVICE, encoding_threads, resolve_device
from vlpcache.errors import GraphTooNew, UserError
from vlpcache.files import is_write_failure, may_write, read_only_reason, remove_temporaries, system_reason, write_failure
from vlpcache.index.export import check_export_path, export_embeddings
from vlpcache.index.faiss_index import HalfWritten, VideoIndex, keep_factory, new_faiss_index, write_index
from vlpcache.index.layout import (
    CALIBRATION_FILE,
    DEFAULT_MEMORY_BUDGET_MB,
    LOCK_FILE,
    META_FILE,
    QUERYBANK_FILE,
    IndexConfig,
    IndexMeta,
    check_same_source,
    index_dir_for,
    other_indexes,
    read_meta,
)
from vlpcache.index.parts import EncodedPart, EncodedParts, KeptPart
from vlpcache.index.region_store import RegionStore
from vlpcache.locks import WriterLock, holder_description
from vlpcache.model.run_layout import (being_trained_note, default_run, designated_checkpoint_sha256, latest_run,
                                       read_run_locations)
from vlpcache.querybank import BANK_SIZE, BETA, TOP_K, QueryBank, bank_captions, bank_for
from vlpcache.records import read_optional_json, write_json
from vlpcache.report import Say, items_word, printable, progress_bar, say, sayer
from vlpcache.workspace import Workspace

ENCODE_CHUNK = 1024  # videos encoded, then kept on disk as one part (parts.py), at a time


@dataclass
class Sources:
    """Where an index comes from and goes: resolved from the options and the workspace defaults."""

    run_dir: Path
    cache_dir: Path
    index_dir: Path


def resolve_sources(run_dir=None, cache_dir=None, index_dir=None) -> Sources:
    workspace = Workspace()
    cache_dir = Path(cache_dir) if cache_dir else workspace.cache_dir
    if not cache_dir.is_dir():
        raise UserError(f"no cache at {cache_dir}; {_run_caches_hint(run_dir, workspace)}")
    if not run_dir:
        run_dir, note = default_run(workspace.runs_dir, cache_dir)
        if note:
            say(note)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such run directory")
    return Sources(run_dir, cache_dir, Path(index_dir) if index_dir else workspace.index_dir)


def _run_caches_hint(run_dir, workspace: Workspace) -> str:
    """What to do without the workspace's cache: pass one of the caches the run was trained on (a run trained
    on caches of its own, `pretrain --cache A --cache B`), else extract one."""
    try:
        run_dir = Path(run_dir) if run_dir else latest_run(workspace.runs_dir)
        caches = [c for c in read_run_locations(run_dir).get("caches", []) if Path(c).is_dir()]
    except UserError:
        caches = []
    if not caches:
        return "run `vlpcache extract` first or pass --cache DIR"
    if len(caches) == 1:
        return f"{run_dir.name} was trained on {caches[0]}: pass --cache {caches[0]}"
    return (f"{run_dir.name} was trained on {len(caches)} caches ({', '.join(caches)}): pass one of them with --cache "
            "(index, search, serve and eval read one cache at a time)")


def open_cache(cache_dir: Path, say: Say = say) -> RegionCache:
    cache = RegionCache(cache_dir, say=say)
    cache.check_not_empty()
    return cache


def check_run_reads_cache(run, cache: RegionCache) -> None:
    """Refuse a cache whose region features are not the kind the run was trained on."""
    diffs = cache.settings.feature_differences(run.cache_settings or {})
    if diffs:
        raise UserError(
            f"cache {cache.cache_dir} has other region features than run {run.run_dir} was trained on "
            f"({'; '.join(diffs[:2])}); pass the matching --cache or --run, or train a run on this cache "
            "(`vlpcache pretrain --cache ...`: a cache extracted again by a newer vlpcache needs a new run)"
        )


def update_index(run, cache: RegionCache, index_dir: Path, config: IndexConfig, *, device, batch_size: int,
                 rebuild: bool = False, progress: bool = True, say: Say = say, qbnorm: bool = False,
                 warn: Say | None = None) -> VideoIndex:
    """The index of `cache` under `run` in index_dir: built, or brought up to date by encoding only new
    items; its query bank too (made when `qbnorm` asks, kept up to date once it exists). `warn`: where the
    line of an item found damaged, and left out, goes (default `say`; `index --quiet` says it all the same)."""
    check_run_reads_cache(run, cache)
    if (index_dir / META_FILE).exists() and not may_write(index_dir):  # no lock to take: nothing may be written
        return read_only_index(run, cache, index_dir, config, rebuild, qbnorm, say)
    with writing_index(index_dir, say) as waited:
        if waited:  # another process wrote the index meanwhile; extract may have added or dropped items since too
            cache.refresh()
        index = None if rebuild else existing_index(run, cache, index_dir, config, say)
        if index is not None:  # one given with --factory stays, should the index be made again from nothing
            config = keep_factory(config, index.meta)
        parts = EncodedParts(index_dir)
        again = extracted_again(index, cache) if index is not None else []
        if again:
            say(f"index {index_dir}: {len(again)} indexed item(s) were extracted again since they were indexed (their "
                "sources changed, or their rows were found damaged); indexing them anew")
        if dropped := [item_id for item_id in cache.removed if index is not None and item_id in index]:
            say(f"index {index_dir}: {len(dropped)} indexed item(s) were dropped from the cache (extract --prune); "
                "dropping them from the index")
        leaving = set(again) | set(dropped)  # the query bank is made again below: the rows after them move
        if index is not None and (len(leaving) == len(index) or index.regions is None):  # (no regions: made by an older
            index = None  # vlpcache, re-rank needs them) built anew from nothing
        rows = [r for r, item_id in enumerate(cache.ids) if index is None or item_id not in index or item_id in leaving]
        if index is not None and not rows:
            if dropped:
                index, _ = write_rows(index_dir, [index.kept_rows(leaving)], index_meta(index, cache, index_dir), config, index)
            elif moved_since(index, cache, index_dir):  # recorded, so that a copy left at the old path is told apart
                index.meta = index_meta(index, cache, index_dir)
                write_json(index_dir / META_FILE, index.meta.to_json())
            parts.remove()  # left by a run killed after its index was written
            export_for_search(run, index_dir, say)
            update_query_bank(run, index, index_dir, 0, qbnorm, device, batch_size, progress, say)
            update_calibration(run, index, index_dir, device, batch_size, say)
            say(f"index {index_dir}: {coverage(index, cache) or 'up to date'}: {len(index)} items ({index.meta.factory})")
            return index
        if index is None:
            (index_dir / QUERYBANK_FILE).unlink(missing_ok=True)  # it described the old rows
        index, how, encoding_s = _add_encoded(run, cache, rows, index, leaving, index_dir, config, device, batch_size,
                                              progress, parts, say, warn or say)
        if again:
            how += f" ({len(again)} of them indexed anew, extracted again since)"
        parts.remove()
        export_for_search(run, index_dir, say)
        update_query_bank(run, index, index_dir, len(rows), qbnorm, device, batch_size, progress, say)
        update_calibration(run, index, index_dir, device, batch_size, say)
        note = coverage(index, cache)
        say(f"index {index_dir}: {len(index)} items; encoded {len(rows)} {items_word(cache.kinds[r] for r in rows)} in {encoding_s:.1f} s; "
            f"{how}" + (f"; {note}" if note else ""))
        return index


def read_only_index(run, cache: RegionCache, index_dir: Path, config: IndexConfig, rebuild: bool, qbnorm: bool,
                    say: Say) -> VideoIndex:
    """The index in index_dir, which this user may not write (another user's, a shared finished workspace, a read-only
    mount), read without its lock, which cannot be taken. Where it holds every cached item as the cache holds it, it
    is up to date, said as of an index this user may write; where there is work (items to add, to index anew or to
    drop, --rebuild, a query bank asked for and missing), one line that it is read-only, and nothing is written."""
    check_same_source(read_meta(index_dir), index_dir, run.checkpoint_sha256, cache.settings.to_json(), run.run_dir)
    index = VideoIndex.load(index_dir)  # half-written: said as search says it (its owner's `index` builds it again)
    if config.factory and config.factory != index.meta.factory:
        raise UserError(f"{index_dir}: index is {index.meta.factory}, not {config.factory}; add --rebuild to change its type")
    missing = sum(1 for item_id in cache.ids if item_id not in index)
    dropped = sum(1 for item_id in cache.removed if item_id in index)
    work = [*(["--rebuild"] if rebuild else []),
            *([f"{missing} cached item(s) to add"] if missing else []),
            *([f"{len(again)} item(s) extracted again to index anew"] if (again := extracted_again(index, cache)) else []),
            *([f"{dropped} item(s) dropped from the cache to drop"] if dropped else []),
            *(["regions to index (made by an older vlpcache)"] if index.regions is None else []),
            *(["a query bank to make (--qbnorm)"] if qbnorm and bank_for(index_dir / QUERYBANK_FILE, index.ids) is None
              else [])]
    if work:
        raise UserError(f"index {index_dir}: the index is read-only ({read_only_reason(index_dir)}) and has "
                        f"{', '.join(work)}; nothing was written; build the index where you can write (`vlpcache index "
                        "-o DIR`, then search and serve take --index DIR), or ask its owner to run `vlpcache index`")
    say(f"index {index_dir}: {coverage(index, cache) or 'up to date'}: {len(index)} items ({index.meta.factory})")
    return index


def update_query_bank(run, index: VideoIndex, index_dir: Path, added: int, wanted: bool, device, batch_size: int,
                      progress: bool, say: Say) -> None:
    """Extend an existing query bank by the `added` videos at the end of the index; make one when
    `wanted` and missing (or made for other rows)."""
    path = index_dir / QUERYBANK_FILE
    bank = bank_for(path, index.ids[: len(index) - added])
    if bank is not None:
        if added:
            bank.extended(index.embeddings[len(index) - added :]).of_rows(index.ids).save(path)
        return
    there = path.exists()
    path.unlink(missing_ok=True)  # made for other rows (or unreadable): never left to normalise the wrong videos
    if not (wanted or there):
        return
    say(f"query bank: encoding up to {BANK_SIZE} training captions of run {run.run_dir} (QB-Norm)")
    started = time.monotonic()
    bank = run_query_bank(run, index.embeddings, device, batch_size, progress=progress, say=say)
    if bank is None:
        say("note: no training caption of the run can be read; no query bank, search --qbnorm is not available")
        return
    bank = bank.of_rows(index.ids)
    bank.save(path)
    say(f"query bank: {len(bank.bank)} captions in {time.monotonic() - started:.1f} s")


def run_query_bank(run, videos: np.ndarray, device, batch_size: int, beta: float = BETA, k: int = TOP_K,
                   progress: bool = True, say: Say = say) -> QueryBank | None:
    """QB-Norm state of `videos` (C, E) with a bank of the run's own training captions (the files its
    config names, held-out splits left out), encoded by the run; None when none of them can be read."""
    from vlpcache.model.retrieval import encode_texts

    captions = run_training_captions(run, "query bank", progress, say)
    if not captions:
        return None
    with encoding_threads():
        bank = encode_texts(run.model, run.tokenizer, bank_captions(captions), device, batch_size, progress=progress)
    return QueryBank.build(bank.global_.numpy(), videos, beta, k)


def run_training_captions(run, what: str, progress: bool, say: Say) -> list[str]:
    """The captions the run trained on: those of its training files (the files its config names, held-out
    splits left out) whose keys name videos it trained on (its videos.npz record; every caption of a run made
    before the record was kept). A file that also captions videos outside the run's caches (its test videos)
    gives none of theirs, so that a query bank never holds eval's queries. A file that cannot be read is said
    ("note: WHAT: ...; left out")."""
    from vlpcache.captions import read_captions
    from vlpcache.model.data import held_out, training_side
    from vlpcache.model.run_layout import read_run_locations, read_run_videos, video_key_each

    locations = read_run_locations(run.run_dir)
    recorded = read_run_videos(run.run_dir)
    caches = _readable_caches(locations.get("caches", []))  # whose ids the caption keys are matched to
    captions = []
    for path in locations.get("captions", []):
        try:
            read = read_captions(path, progress)
        except UserError as err:
            say(f"note: {what}: {err}; left out")
            continue
        training = training_side(read, caches)[0] if caches else held_out(read, keep_held_out=False)[0]
        ids = list(training.by_id)
        trained = np.isin(video_key_each(ids), recorded[0]) if recorded is not None else np.ones(len(ids), bool)
        captions += [c for item_id, kept in zip(ids, trained) if kept for c in training.by_id[item_id]]
    return captions


def _readable_caches(paths: list[str]) -> list[RegionCache]:
    """The caches of `paths` that open (one moved or damaged since the run trained is passed over)."""
    caches = []
    for path in paths:
        try:
            caches.append(RegionCache(path))
        except (UserError, OSError):
            continue
    return caches


CALIBRATION_CAPTIONS = 1000  # training captions whose best matches set what a weak match is (a seeded sample)
WEAK_PERCENTILE = 1  # a query's best match below that of 99 in 100 training captions is weak


def update_calibration(run, index: VideoIndex, index_dir: Path, device, batch_size: int, say: Say) -> None:
    """What a weak match is for this index: the best global similarity that all but WEAK_PERCENTILE % of
    a sample of the run's training captions find in it (calibration.json); made again when the index's
    size has changed by more than a tenth since (a larger collection holds closer matches; reading a
    caption file of millions on every small update would cost minutes), "weak_below": null where no training
    caption reads (looked for again at the next update). Written last: an index without it is one whose build
    was stopped (calibrated)."""
    from vlpcache.model.retrieval import encode_texts

    path = index_dir / CALIBRATION_FILE
    current = read_optional_json(path)
    if (calibrated(index_dir, run.checkpoint_sha256) and current.get("weak_below") is not None
            and isinstance(current.get("videos"), int) and abs(len(index) - current["videos"]) <= current["videos"] / 10):
        return
    started = time.monotonic()
    captions = run_training_captions(run, "weak-match calibration", False, say) if len(index) else []
    if not captions:
        write_json(path, {"videos": len(index), "captions": 0, "percentile": WEAK_PERCENTILE, "weak_below": None,
                          "checkpoint_sha256": run.checkpoint_sha256})
        return
    sample = bank_captions(captions, CALIBRATION_CAPTIONS)
    with encoding_threads():
        text = encode_texts(run.model, run.tokenizer, sample, device, batch_size).global_.numpy()  # (S, E)
    best = np.full(len(sample), -np.inf, np.float32)
    for start in range(0, len(index), 65536):  # (S, chunk) at a time: a million videos fit in memory
        best = np.maximum(best, (text @ index.embeddings[start : start + 65536].T).max(1))
    weak_below = round(float(np.percentile(best, WEAK_PERCENTILE)), 4)
    write_json(path, {"videos": len(index), "captions": len(sample), "percentile": WEAK_PERCENTILE,
                      "weak_below": weak_below, "checkpoint_sha256": run.checkpoint_sha256})
    say(f"index {index_dir}: a weak match is one below {weak_below:.3f}, what 99 in 100 of {len(sample):,} training "
        f"captions find ({time.monotonic() - started:.1f} s)")


def calibrated(index_dir: Path, checkpoint_sha256: str) -> bool:
    """Whether update_calibration ran on the index in index_dir for this checkpoint: the last step of building it,
    so an index without it (a Searcher's first-use build stopped, Ctrl-C in a notebook) is built on by open_parts."""
    current = read_optional_json(index_dir / CALIBRATION_FILE)
    return isinstance(current, dict) and current.get("checkpoint_sha256") == checkpoint_sha256


@contextmanager
def writing_index(index_dir: Path, say: Say = say):
    """Hold index_dir's lock (waiting, and saying so, while another process writes it); leftovers of
    killed writers go."""
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        lock = WriterLock.take(index_dir / LOCK_FILE)
        waited = lock is None
        if lock is None:
            say(f"waiting for {holder_description(index_dir / LOCK_FILE)}, which is writing the index {index_dir}")
            lock = WriterLock.take(index_dir / LOCK_FILE, wait=True)
        remove_temporaries(index_dir)
    except OSError as err:
        raise write_failure(index_dir, err, "nothing was written; build the index where you can write (`vlpcache index "
                                            "-o DIR`, then search and serve take --index DIR), or pass --run a run "
                                            "indexed there already") from None
    with lock:
        yield waited


def existing_index(run, cache: RegionCache, index_dir: Path, config: IndexConfig, say: Say = say) -> VideoIndex | None:
    """The index already in index_dir, checked against the run and the cache; None when there is none, or
    where a kill left its files from two saves (said: it is built again, from the videos encoded so far)."""
    if not (index_dir / META_FILE).exists():
        return None
    check_same_source(read_meta(index_dir), index_dir, run.checkpoint_sha256, cache.settings.to_json(), run.run_dir)
    try:
        index = VideoIndex.load(index_dir, locked=True)  # (update_index holds its lock)
    except HalfWritten as err:
        say(f"note: {str(err).split('; ')[0]}: it was being written when its writer was stopped; building it again")
        return None
    if config.factory and config.factory != index.meta.factory:
        raise UserError(f"{index_dir}: index is {index.meta.factory}, not {config.factory}; add --rebuild to change its type")
    return index


SAID_BUILD_ITEMS = 20_000  # from this many videos on, building the index after the encoding bar is said first (200k:
# a minute without a word, the HNSW graph, the tuning of its search, the save)


def _add_encoded(run, cache: RegionCache, rows: list[int], index: VideoIndex | None, leaving: set[str], index_dir: Path,
                 config: IndexConfig, device, batch_size: int, progress: bool, kept: EncodedParts, say: Say,
                 warn: Say) -> tuple[VideoIndex, str, float]:
    """Encode the cache's `rows` and write the index of them after the rows of `index` (or of them alone) less those
    of `leaving`; returns it, what was done and the seconds the encoding took. Each chunk is kept as a part as soon
    as it is encoded (rows a kept part holds are not encoded again), and the index is written from the parts one at
    a time (index_rows.py): memory holds a part and the FAISS index, not every encoded video."""
    started = time.monotonic()
    parts = kept.load({cache.ids[r]: cache.shard_key_of(cache.ids[r]) for r in rows})
    done = {item_id for part in parts for item_id in part.ids}
    todo = [r for r in rows if cache.ids[r] not in done]
    if done:
        say(f"resuming: {len(done)} of the {len(rows)} videos to index were encoded by a run that did not finish "
            f"(kept in {kept.folder}); encoding the other {len(todo)}")
    # a damaged item is encoded as a blank with the others, then dropped
    readable = BlankWhenDamaged(cache, "the index leaves it out until then (`vlpcache index` after that extract adds it)", warn)
    parts += _encoded_parts(run, readable, todo, len(rows), len(done), device, batch_size, progress, kept)
    encoding_s = time.monotonic() - started  # the query bank says its own time
    sources = [*([index.kept_rows(leaving)] if index is not None else []), *parts]
    total = sum(len(source.ids) for source in sources)
    if total >= SAID_BUILD_ITEMS:  # after the bar, minutes
        say(f"index: {'building' if index is None else 'updating'} the FAISS index of {total:,} videos (its graph, the "
            "tuning of its search) and saving it ...")
    if index is None:
        meta = IndexMeta(
            checkpoint_sha256=run.checkpoint_sha256,
            cache_settings=cache.settings.to_json(),
            embedding_dim=run.config.embed_dim,
            factory="",
            run_dir=str(Path(run.run_dir).resolve()),
            checkpoint_path=str(Path(run.checkpoint_path).resolve()),
            cache_dir=str(Path(cache.cache_dir).resolve()),
            collection=collection_of(cache.cache_dir),
            index_dir=str(index_dir.resolve()),
            cache_shards=sorted(cache.read_shards),
        )
    else:  # a collection found by the cache's path, built before, gets the cache's
        meta = index_meta(index, cache, index_dir)
    index, how = write_rows(index_dir, sources, meta, config, index)
    if done:
        how = f"{len(done)} of them kept from the run that did not finish; {how}"
    if left_out := len(readable.damaged):
        how = f"{left_out} left out, found damaged (said above); {how}"
    if index.meta.search_params:
        how += f", search {index.meta.search_params} (recall@10 {index.meta.tuned_recall:.3f} on indexed vectors)"
    return index, how, encoding_s


def _encoded_parts(run, readable: BlankWhenDamaged, todo: list[int], total: int, done: int, device, batch_size: int,
                   progress: bool, kept: EncodedParts) -> list[KeptPart]:
    """Encode the cache's rows `todo`, ENCODE_CHUNK at a time, each chunk kept as a part (on disk) once encoded;
    `done` of the `total` to index were encoded before (the bar starts there)."""
    from vlpcache.model.retrieval import as_numpy, encode_videos

    cache, parts = readable.cache, []
    with progress_bar(total=total, initial=done, unit="video", desc="encoding videos", disable=not progress,
                      leave=False) as bar:  # one over every chunk: its rate and time left are the whole index's
        for start in range(0, len(todo), ENCODE_CHUNK):  # bounded memory: region tokens are (B, T*N, E)
            chunk = todo[start : start + ENCODE_CHUNK]
            with encoding_threads():
                video = encode_videos(run.model, readable, chunk, device, batch_size, regions=True, bar=bar)
            if readable.damaged.intersection(chunk):  # encoded as blanks: dropped
                kept_rows = [k for k, r in enumerate(chunk) if r not in readable.damaged]
                chunk, video = [chunk[k] for k in kept_rows], type(video)(*(t[kept_rows] for t in video))
            regions = RegionStore.empty(run.config.embed_dim)
            regions.append(video.regions.numpy(), video.region_mask.numpy())
            try:
                parts.append(kept.add(EncodedPart([cache.ids[r] for r in chunk], as_numpy(video.global_), regions,
                                                  [cache.shard_key_of(cache.ids[r]) for r in chunk])))
            except Exception as err:
                if not is_write_failure(err):
                    raise
                raise write_failure(kept.folder, err, f"the index is as it was before; the {done + start} videos encoded "
                                                      "before this chunk are kept; make room and run `vlpcache index` "
                                                      "again to go on") from None
    return parts


def index_meta(index: VideoIndex, cache: RegionCache, index_dir: Path) -> IndexMeta:
    """An index's meta with the shards of the cache it has now read (shards_read), and where the cache and the index
    now are (a copy of the cache elsewhere then gets an index of its own: layout.cache_owner)."""
    return dataclasses.replace(index.meta, cache_shards=shards_read(index, cache), collection=collection_of(cache.cache_dir),
                               cache_dir=str(Path(cache.cache_dir).resolve()), index_dir=str(Path(index_dir).resolve()))


def moved_since(index: VideoIndex, cache: RegionCache, index_dir: Path) -> bool:
    """Whether the cache or the index is not where the index's last write recorded them (moved, or copied whole)."""
    meta = index.meta
    return (meta.cache_dir, meta.index_dir) != (str(Path(cache.cache_dir).resolve()), str(Path(index_dir).resolve()))


def write_rows(index_dir: Path, sources: list, meta: IndexMeta, config: IndexConfig,
               grown: VideoIndex | None) -> tuple[VideoIndex, str]:
    """faiss_index.write_index, with a failed write (disk full, I/O error) as one line: the index stays as it was."""
    try:
        return write_index(index_dir, sources, meta, config, grown)
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise write_failure(index_dir, err, "the index is as it was before; make room and run `vlpcache index` "
                                            "again") from None


def missing_from_cache(index: VideoIndex, cache: RegionCache) -> int:
    """Indexed items the cache does not hold now (unreadable or left-out shards, removed items): search
    cannot show them."""
    return sum(1 for item_id in index.ids if item_id not in cache)


def shards_read(index: VideoIndex, cache: RegionCache) -> list[str]:
    """The shards (name@commit time) the index has read, now with the cache's: those it read before stay, so that a
    shard unreadable during one update (moved out and back, a permission mended) is not taken for new when it
    is read again, its items for items extracted again. A key names one shard's content: an old one hides no new."""
    return sorted(set(index.meta.cache_shards or ()) | set(cache.read_shards))


def extracted_again(index: VideoIndex, cache: RegionCache) -> list[str]:
    """Indexed items the cache reads from a shard the index's last update did not read: their sources
    changed and extract redid them, so their vectors are of the old content. (An index from before shards
    were recorded: the items of shards committed after its last update.)"""
    if index.meta.cache_shards:
        unread = set(cache.read_shards) - set(index.meta.cache_shards)  # mostly none: nothing to look at
        return [item_id for item_id in cache.ids_in_shards(unread) if item_id in index]
    later = np.flatnonzero(np.asarray(cache.committed, np.float64) > index.meta.updated)
    return [cache.ids[r] for r in later if cache.ids[r] in index]


def failed_again(cache: RegionCache) -> dict[str, dict]:
    """Cached items whose source changed and then failed to extract: id -> the failure record (newer than the item's
    row, of another file than the row's stamp records). The cache reads their old rows: extract keeps them, and
    --prune drops only items whose files are gone."""
    return {item_id: record for item_id, record in cache.failures.items()
            if item_id in cache and record.get("source", "") != cache.sources[cache.index_of(item_id)]}


def coverage(index: VideoIndex, cache: RegionCache, with_again: bool = True) -> str:
    """What a user should know about items the index has and the cache lacks, or holds anew (unless not
    `with_again`: said with the new items), or holds as they were though their sources changed (the new file failed
    to extract: extract, not index, mends them); "" when there are none."""
    notes = []
    if missing := missing_from_cache(index, cache):
        shards = len(cache.unreadable_shards) + len(cache.ignored_shards)
        damaged = sum(1 for item_id in cache.damaged if item_id in index)
        why = "; ".join([*([f"{shards} shard(s) of the cache are unreadable or left out (reported above)"] if shards else []),
                         *([f"{damaged} found damaged, until extract redoes them"] if damaged else [])]
                        ) or "removed from the cache"
        notes.append(f"{len(index) - missing} of its {len(index)} items can be shown, {missing} not in the cache "
                     f"({why}); search leaves them out")
    if with_again and (again := extracted_again(index, cache)):
        notes.append(f"{len(again)} of its item(s) were extracted again since they were indexed (their sources changed): "
                     "found by their old content and shown without matched regions; run `vlpcache index` to index "
                     "them anew")
    if failed := [(item_id, record) for item_id, record in failed_again(cache).items() if item_id in index]:
        item_id, record = failed[0]
        notes.append(f"{len(failed)} of its item(s) changed at their source and the new file did not extract "
                     f"({printable(item_id)}: {printable(str(record.get('reason', 'it failed')))}"
                     f"{', ...' if len(failed) > 1 else ''}): found by their old content, which the cache still holds; "
                     "mend or replace those files and run `vlpcache extract` again (deleted, `extract --prune` drops them)")
    return "; ".join(notes)


def index_of_run(root: Path, run_dir: Path, cache: RegionCache) -> tuple[Path | None, VideoIndex | None]:
    """The index directory of the run's designated checkpoint over this cache, and its index when one is
    built there; read without torch. (None, None) when the run's checkpoint hash is not recorded."""
    run_sha = designated_checkpoint_sha256(run_dir)
    if run_sha is None:
        return None, None
    index_dir = index_dir_for(root, run_sha, cache.settings.to_json(), cache.cache_dir)
    try:
        return index_dir, (VideoIndex.load(index_dir) if (index_dir / META_FILE).exists() else None)
    except HalfWritten:  # being written now, or left so by a kill: a command that may write it builds it (update_index)
        if not may_write(index_dir):
            raise
        return index_dir, None


def new_index_line(run, root: Path, index_dir: Path) -> str:
    """What a command says before it builds the index of a run for the first time."""
    others = other_indexes(root, index_dir)
    line = (f"no index of run {run.run_dir} (epoch {run.epoch}, checkpoint {run.checkpoint_sha256[:12]}) over this cache "
            f"yet: building it in {index_dir} (first use only)")
    return line + (f"; the {len(others)} index(es) of other checkpoints or caches in {root} stay (`vlpcache index "
                   "--prune` removes those of checkpoints no run holds any more)" if others else "")


def export_for_search(run, index_dir: Path, say) -> None:
    """The run's query side as ONNX beside the index (fast search start), unless already there."""
    from vlpcache.index.query_graphs import export_query_model
    from vlpcache.index.query_model import query_export_sha

    if query_export_sha(index_dir) == run.checkpoint_sha256:
        return
    try:
        with encoding_threads():  # torch traces the model
            export_query_model(run, index_dir)
    except GraphTooNew as err:  # its file was in a temporary folder, gone now: the index is what the user knows
        say(f"note: no ONNX export of the query model of the index {index_dir}: this torch exports {err.why}; search "
            "will load it with torch")
    except Exception as err:  # search still works through torch, only slower to start
        if is_write_failure(err):  # a full disk is the user's to fix, not a note that --quiet hides
            raise write_failure(index_dir, err, "the index is kept, without its query model (ONNX), which makes search "
                                                "start several times slower; make room and run the same command again "
                                                "to write it") from None
        say(f"note: no ONNX export of the query model ({type(err).__name__}: {system_reason(err)[:120]}); "
            "search will load it with torch")


def run_index(run_dir=None, cache_dir=None, index_dir=None, factory=None, memory_budget_mb=DEFAULT_MEMORY_BUDGET_MB,
              rebuild=False, device=DEFAULT_DEVICE, batch_size=None, checkpoint=None, quiet=False, export=None,
              qbnorm=False, prune=False) -> VideoIndex:
    """The `vlpcache index` command."""
    from vlpcache.model.retrieval import default_batch_size
    from vlpcache.model.checkpoint import load_run

    if export:
        check_export_path(export)
    sources = resolve_sources(run_dir, cache_dir, index_dir)
    cache = open_cache(sources.cache_dir)
    device = resolve_device(device)
    run = load_run(sources.run_dir, device=device, checkpoint=checkpoint, model_when_used=True)  # none: up to date
    config = IndexConfig(factory=factory or None, memory_budget_mb=memory_budget_mb)
    if config.factory:  # a string FAISS cannot read fails now, not after every video is encoded
        new_faiss_index(config.factory, run.config.embed_dim)
    say = sayer(quiet)
    index_dir = index_dir_for(sources.index_dir, run.checkpoint_sha256, cache.settings.to_json(), cache.cache_dir)
    say(f"run {sources.run_dir} (epoch {run.epoch}, checkpoint {run.checkpoint_sha256[:12]}), cache {sources.cache_dir} "
        f"({len(cache)} items), device {device}")
    if line := being_trained_note(sources.run_dir, run.epoch, chosen=checkpoint is None):
        say(line)
    check_run_reads_cache(run, cache)  # before "building it": a cache it cannot read gets no index
    if not (index_dir / META_FILE).exists():
        say(new_index_line(run, sources.index_dir, index_dir))
    index = update_index(
        run, cache, index_dir, config, device=device,
        batch_size=batch_size or default_batch_size(device), rebuild=rebuild, progress=not quiet, say=say, qbnorm=qbnorm,
        warn=report.say,  # an item left out is said under --quiet too ("errors only")
    )
    if export:
        files = export_embeddings(index, cache, export)
        say(f"exported {len(index)} embeddings and ids to {', '.join(map(str, files))}")
    if prune:
        from vlpcache.index.prune import prune_indexes

        prune_indexes(sources.index_dir, index_dir, [sources.run_dir, *Workspace().runs_dir.glob("*")], say)
    return index
