"""`vlpcache index`: encode every cached video with a run's checkpoint into a FAISS index.

Indexing again adds only the items the index lacks (the cache grew since); the checkpoint and the
cache settings recorded in index.json must match, or the command refuses and names --rebuild.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlpcache.cache.reader import RegionCache
from vlpcache.devices import DEFAULT_DEVICE, resolve_device
from vlpcache.errors import UserError
from vlpcache.index.export import export_embeddings
from vlpcache.index.faiss_index import VideoIndex, choose_factory
from vlpcache.index.layout import DEFAULT_MEMORY_BUDGET_MB, META_FILE, QUERYBANK_FILE, IndexConfig, IndexMeta, check_same_source, read_meta
from vlpcache.model.run_layout import latest_run
from vlpcache.querybank import BANK_SIZE, BETA, TOP_K, QueryBank, bank_captions
from vlpcache.report import Say, say, sayer
from vlpcache.workspace import Workspace

ENCODE_CHUNK = 1024  # videos encoded between two appends to the region store


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
        raise UserError(f"no cache at {cache_dir}; run `vlpcache extract` first or pass --cache DIR")
    run_dir = Path(run_dir) if run_dir else latest_run(workspace.runs_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such run directory")
    return Sources(run_dir, cache_dir, Path(index_dir) if index_dir else workspace.index_dir)


def open_cache(cache_dir: Path) -> RegionCache:
    cache = RegionCache(cache_dir)
    if len(cache) == 0:
        raise UserError(f"cache {cache_dir} holds no items yet; run `vlpcache extract` first")
    return cache


def check_run_reads_cache(run, cache: RegionCache) -> None:
    """Refuse a cache whose region features are not the kind the run was trained on."""
    diffs = cache.settings.feature_differences(run.cache_settings or {})
    if diffs:
        raise UserError(
            f"cache {cache.cache_dir} has other region features than run {run.run_dir} was trained on "
            f"({'; '.join(diffs[:2])}); pass the matching --cache or --run"
        )


def update_index(run, cache: RegionCache, index_dir: Path, config: IndexConfig, *, device, batch_size: int,
                 rebuild: bool = False, progress: bool = True, say: Say = say, qbnorm: bool = False) -> VideoIndex:
    """The index of `cache` under `run` in index_dir: built, or brought up to date by encoding only new
    items; its query bank too (made when `qbnorm` asks, kept up to date once it exists)."""
    from vlpcache.model.retrieval import as_numpy, encode_videos
    from vlpcache.index.region_store import RegionStore

    check_run_reads_cache(run, cache)
    settings = cache.settings.to_json()
    exists = (index_dir / META_FILE).exists()
    index = None
    if exists and not rebuild:
        check_same_source(read_meta(index_dir), index_dir, run.checkpoint_sha256, settings, run.run_dir)
        index = VideoIndex.load(index_dir)
        if config.factory and config.factory != index.meta.factory:
            raise UserError(
                f"{index_dir}: index is {index.meta.factory}, not {config.factory}; add --rebuild to change its type"
            )
    rows = [r for r, item_id in enumerate(cache.ids) if index is None or item_id not in index]
    if index is not None and index.regions is None:  # made by an older vlpcache: re-rank needs regions
        rows, index = list(range(len(cache))), None
    if index is not None and not rows:
        export_for_search(run, index_dir, say)
        update_query_bank(run, index, index_dir, np.zeros((0, index.embeddings.shape[1]), np.float32), qbnorm,
                          device, batch_size, progress, say)
        say(f"index {index_dir} is up to date: {len(index)} items ({index.meta.factory})")
        return index
    if index is None:
        (index_dir / QUERYBANK_FILE).unlink(missing_ok=True)  # it described the old rows
    started = time.monotonic()
    regions = RegionStore.empty(run.config.embed_dim)
    parts = []
    for start in range(0, len(rows), ENCODE_CHUNK):  # bounded memory: region tokens are (B, T*N, E)
        video = encode_videos(run.model, cache, rows[start : start + ENCODE_CHUNK], device, batch_size, regions=True,
                                  progress=progress, desc=f"encoding videos {start + 1}-{min(start + ENCODE_CHUNK, len(rows))} of {len(rows)}")
        parts.append(as_numpy(video.global_))
        regions.append(video.regions.numpy(), video.region_mask.numpy())
    embeddings = np.concatenate(parts) if parts else np.zeros((0, run.config.embed_dim), np.float32)  # (V_new, E)
    ids = [cache.ids[r] for r in rows]
    encoded = f"encoded {len(rows)} videos in {time.monotonic() - started:.1f} s"
    if index is None:
        factory, reason = choose_factory(len(ids), embeddings.shape[1], config)
        meta = IndexMeta(
            checkpoint_sha256=run.checkpoint_sha256,
            cache_settings=settings,
            embedding_dim=embeddings.shape[1],
            factory=factory,
            run_dir=str(Path(run.run_dir).resolve()),
            checkpoint_path=str(Path(run.checkpoint_path).resolve()),
            cache_dir=str(Path(cache.cache_dir).resolve()),
        )
        index = VideoIndex.build(ids, embeddings, meta, config)
        index.regions = regions
        how = f"built {factory} ({reason})"
    else:
        how = index.add(ids, embeddings, config)
        index.regions.append_store(regions)
    if index.meta.search_params:
        how += f", search {index.meta.search_params} (recall@10 {index.meta.tuned_recall:.3f} on indexed vectors)"
    index.save(index_dir)
    export_for_search(run, index_dir, say)
    update_query_bank(run, index, index_dir, embeddings, qbnorm, device, batch_size, progress, say)
    say(f"index {index_dir}: {len(index)} items; {encoded}; {how}")
    return index


def update_query_bank(run, index: VideoIndex, index_dir: Path, added: np.ndarray, wanted: bool, device,
                      batch_size: int, progress: bool, say: Say) -> None:
    """Extend an existing query bank by the videos just `added`; make one when `wanted` and missing."""
    path = index_dir / QUERYBANK_FILE
    bank = QueryBank.load(path) if path.exists() else None
    if bank is not None and len(bank.log_norm) + len(added) == len(index):
        if len(added):
            bank.extended(added).save(path)
        return
    if not (wanted or bank is not None):
        return
    say(f"query bank: encoding up to {BANK_SIZE} training captions of run {run.run_dir} (QB-Norm)")
    bank = run_query_bank(run, index.embeddings, device, batch_size, progress=progress, say=say)
    if bank is None:
        say("note: no training caption of the run can be read; no query bank, search --qbnorm is not available")
        return
    bank.save(path)


def run_query_bank(run, videos: np.ndarray, device, batch_size: int, beta: float = BETA, k: int = TOP_K,
                   progress: bool = True, say: Say = say) -> QueryBank | None:
    """QB-Norm state of `videos` (C, E) with a bank of the run's own training captions (the files its
    config names, held-out splits left out), encoded by the run; None when none of them can be read."""
    from vlpcache.captions import read_captions
    from vlpcache.model.data import held_out
    from vlpcache.model.retrieval import encode_texts
    from vlpcache.model.run_layout import read_run_config

    captions = []
    for path in read_run_config(run.run_dir).get("train", {}).get("captions", []):
        try:
            training, _ = held_out(read_captions(path), keep_held_out=False)
        except UserError as err:
            say(f"note: query bank: {err}; left out")
            continue
        captions += [c for texts in training.by_id.values() for c in texts]
    if not captions:
        return None
    bank = encode_texts(run.model, run.tokenizer, bank_captions(captions), device, batch_size, progress=progress)
    return QueryBank.build(bank.global_.numpy(), videos, beta, k)


def export_for_search(run, index_dir: Path, say) -> None:
    """The run's query side as ONNX beside the index (fast search start), unless already there."""
    from vlpcache.index.query_graphs import export_query_model
    from vlpcache.index.query_model import query_export_sha

    if query_export_sha(index_dir) == run.checkpoint_sha256:
        return
    try:
        export_query_model(run, index_dir)
    except Exception as err:  # search still works through torch, only slower to start
        say(f"note: no ONNX export of the query model ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "search will load it with torch")


def run_index(run_dir=None, cache_dir=None, index_dir=None, factory=None, memory_budget_mb=DEFAULT_MEMORY_BUDGET_MB,
              rebuild=False, device=DEFAULT_DEVICE, batch_size=None, checkpoint=None, quiet=False, export=None,
              qbnorm=False) -> VideoIndex:
    """The `vlpcache index` command."""
    from vlpcache.model.retrieval import default_batch_size
    from vlpcache.model.checkpoint import load_run

    sources = resolve_sources(run_dir, cache_dir, index_dir)
    cache = open_cache(sources.cache_dir)
    device = resolve_device(device)
    run = load_run(sources.run_dir, device=device, checkpoint=checkpoint)
    config = IndexConfig(factory=factory or None, memory_budget_mb=memory_budget_mb)
    say = sayer(quiet)
    say(f"run {sources.run_dir} (epoch {run.epoch}, checkpoint {run.checkpoint_sha256[:12]}), cache {sources.cache_dir} "
        f"({len(cache)} items), device {device}")
    index = update_index(
        run, cache, sources.index_dir, config, device=device,
        batch_size=batch_size or default_batch_size(device), rebuild=rebuild, progress=not quiet, say=say, qbnorm=qbnorm,
    )
    if export:
        files = export_embeddings(index, cache, export)
        say(f"exported {len(index)} embeddings and ids to {', '.join(map(str, files))}")
    return index

