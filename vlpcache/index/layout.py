"""The index directory, defined once and without FAISS or torch: its files, index.json (IndexMeta, what
the index was built from) and IndexConfig (how its FAISS type is chosen; the command line shows its
defaults).

    index.faiss            the FAISS index; its row r (FAISS label r) is the r-th item of ids.json
    ids.json               item ids in FAISS label order (labels are positions, so no IndexIDMap is needed)
    embeddings.npy         (V, E) float32 global video embeddings in the same order, so that the FAISS
                           index can be rebuilt with another type without re-encoding, and eval can
                           score video -> text exactly
    regions.npy, region_offsets.npy, region_positions.npy
                           region embeddings of every video, for re-ranking (region_store.py)
    query/                 the run's query side as ONNX, for a search without torch (query_model.py)
    querybank.npz          QB-Norm state (querybank.py): a bank of the run's training captions, each
                           video's normaliser; made by `index --qbnorm` or the first `search --qbnorm`
    index.json             IndexMeta: checkpoint sha256, cache settings, embedding dim, factory string,
                           search parameters, item count

Every file is written under a temporary name and renamed into place; index.json goes last and
records the count, so a crash mid-save leaves either the old index or one that `load` refuses as
inconsistent (never one whose ids and vectors disagree silently).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.records import JsonRecord

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
    cache_dir: str = ""
    tuned_recall: float | None = None  # recall@10 measured when the parameters were tuned
    factory_given: bool = False  # the user chose the factory: keep it as the collection grows
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
    if meta.checkpoint_sha256 != checkpoint_sha256:
        raise UserError(
            f"{index_dir}: index was built from checkpoint {meta.checkpoint_sha256[:12]} ({meta.run_dir or '?'}), "
            f"not from {checkpoint_sha256[:12]} ({run_dir or 'this run'}); "
            f"run `vlpcache index --rebuild` (or pass the matching --run)"
        )
    diffs = [f"{k}: {meta.cache_settings.get(k)!r} != {v!r}" for k, v in cache_settings.items() if meta.cache_settings.get(k) != v]
    if diffs:
        raise UserError(
            f"{index_dir}: index was built from a cache with other settings ({'; '.join(diffs[:3])}); "
            "run `vlpcache index --rebuild` (or pass the matching --cache)"
        )
