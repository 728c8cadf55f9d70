"""The index directories, defined once and without FAISS or torch: where the index of a run lives, its
files, index.json (IndexMeta, what the index was built from) and IndexConfig (how its FAISS type is
chosen; the command line shows its defaults).

An index root (`.vlpcache/index`, or `index -o` / `search --index`) keeps one index per (checkpoint,
cache settings), so that a newer run gets an index of its own on first use and an earlier run's stays
usable:

    <root>/<checkpoint sha256[:16]>-<cache settings sha256[:8]>/    one index (the files below)

A root that holds the files below itself (an index made by vlpcache 0.1, or a folder named for one
index) is used as it is when it was built from the same checkpoint and cache settings. A `cp -r` copy of a
cache whose original is still where the index was last written from gets one of its own (cache_owner), its
key taking the copy's path too.

    index.lock             held (fcntl) by the process writing this index; others wait for it
    index.faiss            the FAISS index; its row r (FAISS label r) is the r-th item of ids.json
    ids.json               item ids in FAISS label order (labels are positions, so no IndexIDMap is needed)
    embeddings.npy         (V, E) float32 global video embeddings in the same order, so that the FAISS
                           index can be rebuilt with another type without re-encoding, and eval can
                           score video -> text exactly (memory-mapped by load; written, as the region
                           store, a chunk at a time: index_rows.py)
    regions.npy, region_offsets.npy, region_positions.npy
                           region embeddings of every video, for re-ranking (region_store.py)
    query/                 the run's query side as ONNX, for a search without torch (query_model.py)
    querybank.npz          QB-Norm state (querybank.py): a bank of the run's training captions, each
                           video's normaliser; made by `index --qbnorm` or the first `search --qbnorm`
    index.json             IndexMeta: checkpoint sha256, cache settings, embedding dim, factory string,
                           search parameters, item count
    encoding/              only while an index is being written, or after one was stopped: the videos
                           encoded so far, a part per chunk, so that running it again resumes (parts.py)
    thumbnails/            `vlpcache serve`'s thumbnail store (serve/thumbnails.py)

Every file is written under a temporary name, and only once all are written are they renamed into
place (files.replace_together), index.json last: a failed write (disk full) leaves the old index, and a
kill -9 among the renames one that `load` refuses as inconsistent (HalfWritten: `index`, or a search
that may write it, builds it again; never one whose ids and vectors disagree silently).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlpcache.cache.schema import MANIFEST_NAME, SETTING_DEFAULTS
from vlpcache.errors import UserError
from vlpcache.files import same_file
from vlpcache.records import JsonRecord, read_optional_json

INDEX_FORMAT = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "index.json"
REGIONS_FILE = "regions.npy"
REGION_OFFSETS_FILE = "region_offsets.npy"
REGION_POSITIONS_FILE = "region_positions.npy"
QUERY_DIR = "query"
QUERYBANK_FILE = "querybank.npz"
CALIBRATION_FILE = "calibration.json"  # how well the run's training captions match this index: what a weak match is;
# written last: an index without it was stopped while being built (build.calibrated)
LOCK_FILE = "index.lock"
PARTS_DIR = "encoding"
THUMBNAIL_DIR = "thumbnails"  # serve's thumbnail store (serve/thumbnails.py)
# what an index folder may hold (but the temporaries of files being replaced, files.TEMPORARY_GLOB)
INDEX_ENTRIES = frozenset({INDEX_FILE, IDS_FILE, EMBEDDINGS_FILE, META_FILE, REGIONS_FILE, REGION_OFFSETS_FILE,
                           REGION_POSITIONS_FILE, QUERY_DIR, QUERYBANK_FILE, CALIBRATION_FILE, LOCK_FILE, PARTS_DIR,
                           THUMBNAIL_DIR, f".{QUERY_DIR}.tmp"})  # (the last: an ONNX export being written)
INDEX_FOLDER_NAME = re.compile(r"[0-9a-f]{16}(-[0-9a-f]{8}){1,2}")  # index_key's (an older one's: no collection)

# Measured on this 2-core machine (bench/search_latency.py): one exact 256-d query over 50k vectors
# costs ~3 ms, so beyond that the exact index no longer meets a 5 ms budget per query.
EXACT_LIMIT = 50_000
DEFAULT_MEMORY_BUDGET_MB = 2048
HNSW_NEIGHBOURS = 32  # M: 2*M links per vector on the base layer
# tuned on indexed vectors as queries, which reach ~0.01 higher recall than unseen ones (measured on
# 1M vectors): 0.96 there gives >= 0.95 for new queries
TARGET_RECALL = 0.96
REBUILD_HINT = "rebuild with `vlpcache index --rebuild`"


@dataclass
class IndexConfig:
    """How faiss_index chooses and tunes the index; every field has a working default."""

    factory: str | None = None  # a FAISS factory string overrides the chooser, e.g. "HNSW32,Flat"
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB  # for the index structure in RAM
    exact_limit: int = EXACT_LIMIT  # collections up to this size get the exact index
    target_recall: float = TARGET_RECALL  # recall@10 the search parameters are tuned for
    tune_queries: int = 200  # indexed vectors used as tuning queries


@dataclass
class IndexMeta(JsonRecord):
    """index.json: what the index was built from, so that a mismatched model or cache is refused."""

    checkpoint_sha256: str
    cache_settings: dict
    embedding_dim: int
    factory: str
    search_params: str = ""  # FAISS ParameterSpace string, e.g. "efSearch=64"
    count: int = 0
    run_dir: str = ""
    checkpoint_path: str = ""
    cache_dir: str = ""  # the cache it was last written from: a copy of it elsewhere gets an index of its own (cache_owner)
    collection: str = ""  # the cache's collection (cache/manifest.collection_of): its copies and moves share it
    index_dir: str = ""  # where it was last written: found elsewhere, it was copied or moved with its cache (cache_owner)
    tuned_recall: float | None = None  # recall@10 measured when the parameters were tuned
    factory_given: bool = False  # the user chose the factory: keep it as the collection grows
    # the cache shards whose items the last update read (RegionCache.read_shards): an indexed item the cache
    # now reads from another shard was extracted again (its source changed), and is indexed anew; empty in
    # older indexes
    cache_shards: list = field(default_factory=list)
    # each other file's [size, mtime_ns] as its save wrote it (its temporary's, which the rename keeps): a load
    # that finds another there read a save that landed meanwhile (faiss_index.VideoIndex.load); empty in older indexes
    files: dict = field(default_factory=dict, compare=False)
    format: int = INDEX_FORMAT
    updated: float = field(default_factory=time.time)


def read_meta(index_dir: str | Path) -> IndexMeta:
    meta = IndexMeta.read(
        Path(index_dir) / META_FILE,
        missing=f"{index_dir}: no index here ({META_FILE} missing); build one with `vlpcache index`",
        what="index metadata",
        fix=REBUILD_HINT,
    )
    if meta.format != INDEX_FORMAT:
        raise UserError(f"{index_dir}: index format {meta.format}, this vlpcache reads {INDEX_FORMAT}; {REBUILD_HINT}")
    return meta


def check_same_source(meta: IndexMeta, index_dir, checkpoint_sha256: str, cache_settings: dict, run_dir="") -> None:
    """Refuse, in one line, an index built from another checkpoint or from a cache with other settings."""
    diffs = source_differences(meta.to_json(), checkpoint_sha256, cache_settings)
    if diffs:
        raise UserError(
            f"{index_dir}: index was built from another checkpoint or cache than {run_dir or 'this run'}'s "
            f"({'; '.join(diffs[:3])}); run `vlpcache index --rebuild` (or pass the matching --run and --cache)"
        )


def index_key(checkpoint_sha256: str, cache_settings: dict, collection: str) -> str:
    """The folder name, within an index root, of the index of a checkpoint over one cache: its settings
    and its collection (manifest.collection_of: two caches of the same settings are two collections)."""
    settings = hashlib.sha256(json.dumps(cache_settings, sort_keys=True).encode()).hexdigest()
    return f"{checkpoint_sha256[:16]}-{settings[:8]}-{hashlib.sha256(collection.encode()).hexdigest()[:8]}"


def index_dir_for(root: str | Path, checkpoint_sha256: str, cache_settings: dict, cache_dir: str | Path) -> Path:
    """Where the index of this checkpoint over this cache lives (or is to be built) under `root`: root
    itself or the folder below it whose index.json names them (one built before indexes recorded the
    cache's collection: by the cache's path), else root/index_key. Of the indexes of the cache's collection
    (cache_owner): the one built from this cache's path, else one whose cache was moved here; a copy
    (`cp -r`) whose original is still there gets one of its own, keyed by its path too, since the two
    grow apart."""
    from vlpcache.cache.manifest import collection_of

    root = Path(root)
    collection = collection_of(cache_dir)

    def other_source(meta: dict) -> list[str]:
        if diffs := source_differences(meta, checkpoint_sha256, cache_settings):
            return diffs
        if meta.get("collection") == collection or (
                not meta.get("collection") and meta.get("cache_dir") in (None, "", str(Path(cache_dir).resolve()))):
            return []
        return [f"cache {meta.get('cache_dir')}, not {Path(cache_dir).resolve()}"]

    root_meta = read_optional_json(root / META_FILE)
    if isinstance(root_meta, dict) and not other_source(root_meta):  # an index folder given itself: that one
        return root
    if isinstance(root_meta, dict):  # an index folder itself, of something else: never an index root
        raise UserError(f"{root} is the index of another checkpoint or cache ({'; '.join(other_source(root_meta)[:3])}); pass "
                        f"the folder that holds it, {root.parent}, where each checkpoint and cache gets an index of its "
                        "own, or the --run and --cache it was built from")
    found = {}  # folder -> whose it is (cache_owner), of the indexes of this checkpoint over the collection
    for folder in sorted(p.parent for p in root.glob(f"*/{META_FILE}")):
        meta = read_optional_json(folder / META_FILE)
        if isinstance(meta, dict) and not other_source(meta):
            found[folder] = cache_owner(meta, folder, cache_dir, collection)
    for owner in (THIS_CACHE, MOVED_HERE):
        if mine := [folder for folder, whose in found.items() if whose == owner]:
            return mine[0]
    # none, or only those of the copies this cache was copied from or to: its own, keyed by its path too
    return root / index_key(checkpoint_sha256, cache_settings,
                            f"{collection} at {Path(cache_dir).resolve()}" if found else collection)


THIS_CACHE, MOVED_HERE, A_COPYS = "this cache", "moved here", "another copy's"


def cache_owner(meta: dict, folder: Path, cache_dir: str | Path, collection: str) -> str:
    """Whose index of a collection `meta` (index.json) is, asked by the cache at cache_dir: THIS_CACHE where it was
    last written from its path; A_COPYS where it was written, in this folder, from another path that still holds a
    cache of the collection (cache_dir is a copy of that one, or that one of it: they grow apart); else MOVED_HERE
    (the cache it was written from is gone from there, or the index folder was copied or moved with it, a project
    copied whole: the original has its own)."""
    from vlpcache.cache.manifest import collection_of

    recorded = meta.get("cache_dir") or ""
    if not recorded or _same_folder(recorded, cache_dir):
        return THIS_CACHE
    written_in = meta.get("index_dir") or ""
    if written_in and not _same_folder(written_in, folder):
        return MOVED_HERE
    if (Path(recorded) / MANIFEST_NAME).is_file() and collection_of(Path(recorded)) == collection:
        return A_COPYS
    return MOVED_HERE


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve() or same_file(a, b)


def other_indexes(root: str | Path, index_dir: Path) -> list[Path]:
    """The indexes in `root` besides index_dir (those of other runs, checkpoints or cache settings)."""
    found = [p for p in Path(root).glob(f"*/{META_FILE}") if p.parent != Path(index_dir)]
    if (Path(root) / META_FILE).exists() and Path(root) != Path(index_dir):
        found.append(Path(root) / META_FILE)
    return sorted(p.parent for p in found)


def source_differences(meta: dict, checkpoint_sha256: str, cache_settings: dict) -> list[str]:
    """How the index described by `meta` (index.json's content) was built from another checkpoint or cache."""
    diffs = []
    if meta.get("checkpoint_sha256") != checkpoint_sha256:
        diffs.append(f"checkpoint {str(meta.get('checkpoint_sha256'))[:12]}, not {checkpoint_sha256[:12]}")
    theirs = meta.get("cache_settings") or {}
    # a setting added since the index was written (`attributes`) is its default there, not a difference
    diffs += [f"{k} {theirs.get(k)!r}, not {v!r}" for k, v in cache_settings.items()
              if theirs.get(k, SETTING_DEFAULTS.get(k)) != v]
    return diffs
