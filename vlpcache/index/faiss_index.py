"""The FAISS layer: choose an index type for a collection, build it, tune it, save and load it.

The index directory's files and index.json are described in layout.py. All vectors are
L2-normalised and compared by inner product (= cosine).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vlpcache.devices import ask_openmp_threads_to_sleep

ask_openmp_threads_to_sleep()  # before FAISS loads its OpenMP runtime, which reads the policy then

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from vlpcache.errors import UserError
from vlpcache.files import FileWrite, may_write, replace_together
from vlpcache.index.layout import (
    EMBEDDINGS_FILE,
    HNSW_NEIGHBOURS,
    IDS_FILE,
    INDEX_FILE,
    LOCK_FILE,
    META_FILE,
    REGION_OFFSETS_FILE,
    REGION_POSITIONS_FILE,
    REGIONS_FILE,
    IndexConfig,
    IndexMeta,
    read_meta,
)
from vlpcache.index.index_rows import IndexedRows, row_files
from vlpcache.index.parts import EncodedPart
from vlpcache.index.region_store import RegionStore
from vlpcache.locks import WriterLock
from vlpcache.records import json_file, read_json, read_optional_json


# ---------------------------------------------------------------- choosing the index type


def ivf_lists(n: int) -> int:
    """IVF list count: about sqrt(n), a power of two, with >= 39 training points per list.

    FAISS suggests 4*sqrt(n) to 16*sqrt(n); sqrt(n) keeps k-means training of a million vectors to
    about a minute on two cores, and the refinement step recovers the recall that coarser lists lose.
    """
    nlist = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    while nlist > 16 and n < 39 * nlist:
        nlist //= 2
    return int(min(max(nlist, 16), 65536))


def pq_subquantizers(dim: int) -> int:
    """PQ code size: one byte per 8 dimensions (32 bytes for 256-d), a divisor of dim."""
    m = max(dim // 8, 1)
    while dim % m:
        m -= 1
    return m


def estimated_bytes(factory: str, n: int, dim: int) -> int:
    """RAM of an index of n vectors, from the factory string's parts (the structure dominates)."""
    per_vector = 8.0  # ids in inverted lists / bookkeeping
    for part in factory.split(","):
        if part == "Flat" or part == "RFlat":
            per_vector += 4 * dim
        elif part.startswith("HNSW"):
            m = int(part[4:] or HNSW_NEIGHBOURS)
            per_vector += 2 * m * 4 * 1.1  # base-layer links plus the upper layers (~1/M of vectors)
        elif part.startswith("PQ"):
            per_vector += int(part[2:].removesuffix("np").split("x")[0])
        elif part == "Refine(SQ8)" or part == "SQ8":
            per_vector += dim
    return int(per_vector * n)


def choose_factory(n: int, dim: int, config: IndexConfig = IndexConfig()) -> tuple[str, str]:
    """The FAISS factory string for n vectors of dim, and a one-line reason for the choice.

    - up to `exact_limit` vectors: "Flat", exact inner product; fast enough and nothing to tune.
    - beyond, if it fits the memory budget: "HNSW32,Flat", graph search over full vectors; best
      recall per millisecond on CPU, ~1.3 KB per 256-d vector.
    - beyond the budget: "IVF{nlist},PQ{m},Refine(SQ8)", 32-byte PQ codes searched in nprobe
      lists, the top candidates re-scored with 8-bit scalar-quantised vectors (~0.3 KB per vector).
    - still beyond: "IVF{nlist},PQ{m}" alone (lower recall; the budget wins).
    """
    if config.factory:
        return config.factory, "given with --factory"
    if n <= config.exact_limit:
        return "Flat", f"{n} vectors <= {config.exact_limit}: exact search"
    budget = config.memory_budget_mb * 2**20
    approximate = candidate_factories(n, dim)[1:]
    for factory in approximate:
        need = estimated_bytes(factory, n, dim)
        if need <= budget:
            return factory, f"{n} vectors, ~{need / 2**20:.0f} MB fits the {config.memory_budget_mb:.0f} MB budget"
    return approximate[-1], f"{n} vectors: even the smallest index exceeds the {config.memory_budget_mb:.0f} MB budget"


def candidate_factories(n: int, dim: int) -> list[str]:
    """Every index type the chooser can pick for n vectors of dim, from most to least memory."""
    # "np": no polysemous training; it only serves Hamming-filtered search, and is 4x the training time
    ivf_pq = f"IVF{ivf_lists(n)},PQ{pq_subquantizers(dim)}np"
    return ["Flat", f"HNSW{HNSW_NEIGHBOURS},Flat", f"{ivf_pq},Refine(SQ8)", ivf_pq]


# ---------------------------------------------------------------- building and tuning


def new_faiss_index(factory: str, dim: int) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "invalid"
        raise UserError(f"FAISS cannot build factory string {factory!r} for {dim}-d vectors ({first})") from None
    if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):  # takes vectors only with ids
        raise UserError(f"factory string {factory!r}: vlpcache keeps the ids of the index's rows itself (ids.json); "
                        f"leave out {factory.split(',')[0]}, e.g. {','.join(factory.split(',')[1:]) or 'Flat'!r}")
    return index


def _as_vectors(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


ADD_ROWS = 65536  # vectors added to a FAISS index (and compared with the tuning queries) at a time: 64 MB at 256-d


class Vectors:
    """An index's (n, E) vectors, read a block at a time: an array in memory, or rows streamed from files
    (index_rows.py), so that building a FAISS index holds the index and a block, never every vector twice."""

    def __init__(self, blocks: Callable[[], Iterable[np.ndarray]], count: int, dim: int):
        self._blocks = blocks  # a fresh pass over the vectors, in row order, in blocks of any size
        self.count = count
        self.dim = dim

    @classmethod
    def of(cls, vectors: "np.ndarray | Vectors") -> "Vectors":
        if isinstance(vectors, Vectors):
            return vectors
        vectors = np.asarray(vectors).reshape(len(vectors), -1)
        return cls(lambda: [vectors], len(vectors), vectors.shape[1])

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (<= ADD_ROWS, E) float32 block) in row order."""
        start, pending, held = 0, [], 0
        for block in self._blocks():
            for cut in range(0, len(block), ADD_ROWS):
                pending.append(block[cut : cut + ADD_ROWS])
                held += len(pending[-1])
                if held >= ADD_ROWS:
                    joined = np.concatenate(pending)
                    yield start, _as_vectors(joined[:ADD_ROWS])
                    start, pending, held = start + ADD_ROWS, [joined[ADD_ROWS:]], held - ADD_ROWS
        if held:
            yield start, _as_vectors(np.concatenate(pending))

    def add_to(self, index: faiss.Index) -> None:
        """Add every vector to `index`, a block at a time; but an HNSW graph takes them in one call, as it holds them
        anyway: built block by block its graph is another, of lower recall (recall@10 0.953, not 0.976, at efSearch
        16 on 80k vectors of a run)."""
        if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            index.add(self.rows(np.arange(len(self))))
            return
        for _, block in self:
            index.add(block)

    def rows(self, wanted: np.ndarray) -> np.ndarray:
        """The vectors of rows `wanted`, in that order (one pass): (len(wanted), E) float32."""
        wanted = np.asarray(wanted, np.int64)
        out = np.zeros((len(wanted), self.dim), np.float32)
        order = np.argsort(wanted, kind="stable")
        for start, block in self:
            lo, hi = np.searchsorted(wanted[order], [start, start + len(block)])
            out[order[lo:hi]] = block[wanted[order[lo:hi]] - start]
        return out


def train_and_add(index: faiss.Index, vectors: "np.ndarray | Vectors", factory: str) -> None:
    vectors = Vectors.of(vectors)
    if not index.is_trained:
        if len(vectors) < 2:
            raise UserError(f"index type {factory!r} needs training vectors; the collection has {len(vectors)}")
        # k-means cost grows with training points; 128 per list (and per PQ centroid) is plenty
        limit = 128 * max(ivf_lists(len(vectors)), 256)
        chosen = np.arange(len(vectors))
        if len(vectors) > limit:
            chosen = np.random.default_rng(0).choice(len(vectors), limit, replace=False)
        try:
            index.train(vectors.rows(chosen))
        except RuntimeError as err:  # FAISS's own check: fewer vectors than its k-means clusters
            reason = str(err).strip().split("failed: ")[-1].splitlines()[-1] if str(err).strip() else "failed"
            raise UserError(f"index type {factory!r} cannot be trained on the collection's {len(vectors)} vectors "
                            f"({reason}); pass a smaller one, or leave --factory out to have one chosen") from None
    vectors.add_to(index)


def tuning_ladder(index: faiss.Index) -> list[str]:
    """Search-parameter settings from fastest to most accurate, for the index's kind."""
    names = _parameter_names(index)
    if "efSearch" in names:
        return [f"efSearch={ef}" for ef in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)]
    if "nprobe" in names:
        # re-scoring 32x k candidates with 8-bit vectors costs microseconds; with 8x, PQ's ranking
        # errors capped recall@10 at 0.93 on 1M vectors whatever nprobe (bench/search_latency.py)
        refine = ",k_factor_rf=32" if "k_factor_rf" in names else ""
        nlist = faiss.extract_index_ivf(index).nlist
        return [f"nprobe={p}{refine}" for p in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if p <= nlist]
    return []


def _parameter_names(index: faiss.Index) -> set[str]:
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        names.add("efSearch")
    return names


def apply_search_params(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def tune_search_params(index: faiss.Index, vectors: "np.ndarray | Vectors", config: IndexConfig, k: int = 10) -> tuple[str, float | None]:
    """The fastest setting of the ladder that reaches config.target_recall on indexed vectors used as
    queries; where even the most accurate setting falls short (codes too coarse: PQ without
    refinement), the fastest within 0.002 of what that setting reaches.

    The ceiling is measured first, so no single step that happens to gain little stops the walk
    short of the target (a rule that stopped at the first flat step left HNSW at efSearch 24, recall
    0.93, on 1M vectors where 128 reached 0.96). Each tuning query is an indexed vector; it finds
    itself trivially, so its own label is removed from both the exact and the approximate answer
    before recall is counted.
    """
    ladder = tuning_ladder(index)
    if not ladder:
        return "", None
    vectors = Vectors.of(vectors)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(vectors), min(config.tune_queries, len(vectors)), replace=False)
    queries = vectors.rows(rows)
    truth = _drop_self(exact_neighbours(queries, vectors, k + 1), rows, k)

    def recall_with(params: str) -> float:
        apply_search_params(index, params)
        _, found = index.search(queries, k + 1)
        return recall_at(_drop_self(found, rows, k), truth)

    ceiling = recall_with(ladder[-1])
    goal = config.target_recall if ceiling >= config.target_recall else ceiling - 0.002
    for params in ladder[:-1]:
        if (recall := recall_with(params)) >= goal:
            return params, recall
    apply_search_params(index, ladder[-1])
    return ladder[-1], ceiling


def exact_neighbours(queries: np.ndarray, vectors: Vectors, k: int) -> np.ndarray:
    """The rows of each query's k nearest vectors by inner product (Q, k), a block of vectors at a time."""
    scores, labels = [], []
    for start, block in vectors:
        found_scores, found = faiss.knn(queries, block, k, metric=faiss.METRIC_INNER_PRODUCT)  # -1: fewer than k
        scores.append(found_scores)
        labels.append(np.where(found >= 0, found + start, -1))
    scores, labels = np.concatenate(scores, 1), np.concatenate(labels, 1)  # (Q, k * blocks)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(labels, best, 1)


def _drop_self(labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    return np.stack([[x for x in row if x != r][:k] for row, r in zip(labels, rows)])


# ---------------------------------------------------------------- the index directory


class VideoIndex:
    """A FAISS index of global video embeddings with its id map and metadata, in one directory."""

    def __init__(self, index: faiss.Index, ids: list[str], embeddings: np.ndarray, meta: IndexMeta,
                 regions: RegionStore | None = None):
        self.index = index
        self.ids = ids
        self.embeddings = embeddings  # (V, E) float32, row r = FAISS label r
        self.meta = meta
        self.regions = regions  # region embeddings per row, for re-ranking (see region_store.py)
        self._row_of = {item_id: r for r, item_id in enumerate(ids)}
        self.folder: Path | None = None  # where its files are (load), read from there when written anew

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row_of

    def row_of(self, item_id: str) -> int:
        return self._row_of[item_id]

    # -- building

    @classmethod
    def build(cls, ids: list[str], embeddings: np.ndarray, meta: IndexMeta, config: IndexConfig = IndexConfig()) -> "VideoIndex":
        """A new index over embeddings (V, E); meta.factory and search_params are filled in here."""
        embeddings = _as_vectors(embeddings).reshape(len(ids), -1)
        index, factory, params, recall = _faiss_for(Vectors.of(embeddings), config)
        meta = dataclasses.replace(
            meta, factory=factory, search_params=params, tuned_recall=recall, factory_given=bool(config.factory),
            count=len(ids), embedding_dim=embeddings.shape[1], updated=time.time(),
        )
        return cls(index, list(ids), embeddings, meta)

    def add(self, ids: list[str], embeddings: np.ndarray, config: IndexConfig = IndexConfig()) -> str:
        """Append new items (ids not yet indexed), in memory. Returns what was done, in one line.

        When the grown collection calls for another index type (say it crossed the exact limit), the
        FAISS index is rebuilt from the stored embeddings; nothing is re-encoded.
        """
        if not ids:
            return "nothing new to add"
        _refuse_indexed(self, ids)
        embeddings = _as_vectors(embeddings).reshape(len(ids), -1)
        self.embeddings = np.concatenate([self.embeddings, embeddings]) if len(self.embeddings) else embeddings
        for item_id in ids:
            self._row_of[item_id] = len(self.ids)
            self.ids.append(item_id)
        self.index, self.meta, how = _grown(self, Vectors.of(embeddings), Vectors.of(self.embeddings), config)
        return how

    def kept_rows(self, leaving: set[str] = frozenset()) -> IndexedRows:
        """Its rows less those of `leaving`, as the first source of an index written anew (write_index)."""
        rows = np.array([r for r, item_id in enumerate(self.ids) if item_id not in leaving], np.int64)
        return IndexedRows(self.embeddings, self.regions, rows, [self.ids[r] for r in rows], self.folder)

    # -- searching

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Q, k) float32, rows (Q, k) int64) for L2-normalised queries (Q, E); -1 = none."""
        k = min(k, len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        queries = _as_vectors(queries)
        if len(queries) > 1:
            return self.index.search(queries, k)
        # one query has nothing to split over threads; OpenMP start-up alone costs more than it saves
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(threads)

    # -- files

    def save(self, index_dir: str | os.PathLike) -> None:
        """Every file of the index, or none (files.replace_together): a failed write leaves the index as it was."""
        rows = EncodedPart(self.ids, self.embeddings, self.regions, [""] * len(self.ids))
        _write_files(Path(index_dir), [rows], self.index, self.meta)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, locked: bool = False) -> "VideoIndex":
        """The index in index_dir; HalfWritten where its files disagree (a kill among the renames of its save).
        A save whose renames land while it reads (search, serve's refresh beside `vlpcache index`) is read
        again: index.json, renamed last, records the other files as written (IndexMeta.files), and a file
        there now that is not the one recorded may have been read from the other save (same count, rows
        moved: ids paired with other items' vectors). One that is the one recorded now was so since before
        index.json was read (a save's file, once replaced, never comes back), hence when it was read. `locked`: the
        caller holds the index's lock (`vlpcache index`)."""
        index_dir = Path(index_dir)
        refuse_unreadable_files(index_dir)
        before = None
        for attempt in range(LOAD_TRIES):
            if attempt:
                time.sleep(LOAD_RETRY_SECONDS)
            loaded = cls._read(index_dir)
            changed = _not_as_recorded(index_dir, loaded.meta)
            if not changed or changed == before:  # as recorded, or as before: no save landing now
                break
            before = changed
        counts = {META_FILE: loaded.meta.count, IDS_FILE: len(loaded.ids), EMBEDDINGS_FILE: len(loaded.embeddings),
                  INDEX_FILE: loaded.index.ntotal}
        if loaded.regions is not None:
            counts[REGION_OFFSETS_FILE] = len(loaded.regions)
        if len(set(counts.values())) != 1:
            raise HalfWritten(f"{index_dir}: index files disagree on the item count ({counts}); {HALF_WRITTEN_FIX}")
        # of the same size, only its time another: a copy that did not keep times (cp -r), read as before
        if other := [name for name, stamp in changed.items() if stamp is None or stamp[0] != loaded.meta.files[name][0]]:
            raise HalfWritten(f"{index_dir}: {', '.join(other)} not the one(s) {META_FILE} records (files of two saves); "
                              f"{HALF_WRITTEN_FIX}")
        apply_search_params(loaded.index, loaded.meta.search_params)
        if changed:  # of the sizes recorded, other times: a copy that did not keep them (cp -r, rsync without -t)
            loaded.meta = _restamped(index_dir, loaded.meta, changed, locked)
        return loaded

    @classmethod
    def _read(cls, index_dir: Path) -> "VideoIndex":
        meta = read_meta(index_dir)  # first: it names the files of its save
        rebuild = f"rebuild it with `vlpcache index -o {index_dir} --rebuild`"
        if not (index_dir / IDS_FILE).exists():
            raise HalfWritten(f"{index_dir}: incomplete index (no {IDS_FILE}); {HALF_WRITTEN_FIX}")
        try:
            ids = read_json(index_dir / IDS_FILE, missing=f"{index_dir}: incomplete index (no {IDS_FILE}); {rebuild}",
                            what="id list", fix=rebuild)
            # memory-mapped: search reads the rows of its candidates; FAISS holds the vectors it searches itself
            embeddings = np.load(index_dir / EMBEDDINGS_FILE, mmap_mode="r")
            index = faiss.read_index(str(index_dir / INDEX_FILE))
            regions = RegionStore.load(index_dir) if RegionStore.exists(index_dir) else None
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"{index_dir}: incomplete or unreadable index ({type(err).__name__}); {rebuild}") from None
        loaded = cls(index, ids, embeddings, meta, regions)
        loaded.folder = index_dir
        return loaded


LOAD_TRIES = 5  # reads of an index whose files are not those its index.json records, while they change: a
LOAD_RETRY_SECONDS = 0.2  # save's renames take milliseconds


def _not_as_recorded(index_dir: Path, meta: IndexMeta) -> dict[str, list[int] | None]:
    """The stamps of the files in index_dir that are not as `meta` records them, by name."""
    now = {name: _stamp(index_dir / name) for name in meta.files}
    return {name: stamp for name, stamp in now.items() if stamp != meta.files[name]}


def _restamped(index_dir: Path, meta: IndexMeta, changed: dict[str, list[int]], locked: bool) -> IndexMeta:
    """`meta` with the stamps in `changed` (files of the sizes it records, found so by two reads), recorded in
    index.json where this user may write it, so that later loads read once rather than twice with LOAD_RETRY_SECONDS
    between. Only under the index's lock (no save under way) and where no save was stopped midway (its index.json's
    temporary is there until its rename: files of two saves may share sizes), while index.json and the files are
    still as this load found them; otherwise `meta` as it was, and nothing written. `locked`: the caller holds it."""
    if not may_write(index_dir) or (lock := nullcontext() if locked else WriterLock.take(index_dir / LOCK_FILE)) is None:
        return meta
    with lock:
        recorded = read_optional_json(index_dir / META_FILE)  # as written: keys of a later vlpcache stay
        if (any(index_dir.glob(f".{META_FILE}.*.tmp*")) or _not_as_recorded(index_dir, meta) != changed
                or not isinstance(recorded, dict) or IndexMeta.from_json(recorded).to_json() != meta.to_json()):
            return meta
        files = {**meta.files, **changed}
        try:
            replace_together([json_file(index_dir / META_FILE, {**recorded, "files": files})])
        except OSError:  # a full disk: read twice, as before
            return meta
    return dataclasses.replace(meta, files=files)


def _stamp(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file (None: gone), as IndexMeta.files records it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


# an index whose files a kill left from two saves: `vlpcache index` (and a search that builds its index) makes it again
HALF_WRITTEN_FIX = "it was being written when its writer was stopped: run `vlpcache index` to build it again"


class HalfWritten(UserError):
    """An index whose files disagree: a kill came among the renames of its save (files.replace_together)."""


def keep_factory(config: IndexConfig, meta: IndexMeta) -> IndexConfig:
    """A factory string the user gave once stays in force when items are added later, or the index is built
    again because every item it held was extracted again or dropped."""
    if config.factory or not meta.factory_given:
        return config
    return dataclasses.replace(config, factory=meta.factory)


def _faiss_for(vectors: Vectors, config: IndexConfig) -> tuple[faiss.Index, str, str, float | None]:
    factory, _ = choose_factory(len(vectors), vectors.dim, config)
    index = new_faiss_index(factory, vectors.dim)
    train_and_add(index, vectors, factory)
    params, recall = tune_search_params(index, vectors, config)
    apply_search_params(index, params)
    return index, factory, params, recall


def _grown(index: VideoIndex, added: Vectors, every: Vectors, config: IndexConfig,
           left: int = 0) -> tuple[faiss.Index, IndexMeta, str]:
    """The FAISS index and meta of `index` grown by the vectors `added` (of `every`: the rows it keeps, less `left`
    that leave it, then theirs), and what was done: added to its FAISS index, or one of the type the grown collection
    calls for built from `every` (also where rows left: FAISS cannot take them out of every index type)."""
    wanted, _ = choose_factory(len(every), every.dim, keep_factory(config, index.meta))
    if wanted != index.meta.factory or left:
        faiss_index, factory, params, recall = _faiss_for(every, dataclasses.replace(config, factory=wanted))
        how = (f"rebuilt as {factory} ({index.meta.factory} no longer suits {len(every)} vectors)" if wanted != index.meta.factory
               else f"added to the {factory} index (built again without the {left} rows that left it)")
        meta = dataclasses.replace(index.meta, factory=factory, search_params=params, tuned_recall=recall)
    else:
        faiss_index, meta = index.index, index.meta
        added.add_to(faiss_index)
        how = f"added to the {index.meta.factory} index"
    return faiss_index, dataclasses.replace(meta, count=len(every), updated=time.time()), f"{len(added)} new items {how}"


def _refuse_indexed(index: VideoIndex, ids: list[str]) -> None:
    if clash := [i for i in ids if i in index]:
        raise ValueError(f"{len(clash)} ids are already indexed, e.g. {clash[0]!r}")


def write_index(index_dir: Path, sources: list, meta: IndexMeta, config: IndexConfig,
                grown: VideoIndex | None = None) -> tuple[VideoIndex, str]:
    """Write the index of the rows of `sources` (index_rows.RowSource: the rows kept of the index there, then kept
    parts) with `meta` (its factory, search parameters and count filled in here) into index_dir, a chunk at a time,
    and load it; returns it and what was done. `grown`: the index there, whose rows sources[0] keeps: its FAISS index
    is extended by the others' rather than built again, where its type still suits and none of its rows left. Every file or none is replaced (files.replace_together): a failed write leaves the index as it
    was, a kill -9 one that load refuses as HalfWritten, or the old one."""
    ids = [item_id for source in sources for item_id in source.ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{len(ids) - len(set(ids))} ids come twice among the rows to index")
    dim = meta.embedding_dim
    every = Vectors(lambda: (block for s in sources for block in s.embedding_blocks()), len(ids), dim)
    if grown is not None:
        kept = len(sources[0].ids)  # of grown's rows
        added = Vectors(lambda: (block for s in sources[1:] for block in s.embedding_blocks()), len(ids) - kept, dim)
        grown.meta = meta  # what the caller brought up to date (its cache's shards); factory and count follow
        index, meta, how = _grown(grown, added, every, config, left=len(grown) - kept)
    else:
        index, factory, params, recall = _faiss_for(every, config)
        meta = dataclasses.replace(meta, factory=factory, search_params=params, tuned_recall=recall,
                                   factory_given=bool(config.factory), count=len(ids), updated=time.time())
        how = f"built {factory} ({choose_factory(len(ids), dim, config)[1]})"
    _write_files(Path(index_dir), sources, index, meta, ids)
    return VideoIndex.load(index_dir), how


def _write_files(index_dir: Path, sources: list, index: faiss.Index, meta: IndexMeta, ids: list[str] | None = None) -> None:
    index_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[int]] = {}  # each file's stamp as written (IndexMeta.files)
    replace_together([
        _stamped(row_files(index_dir, sources, meta.embedding_dim, regions=all(_has_regions(s) for s in sources)), written),
        _stamped(json_file(index_dir / IDS_FILE, ids if ids is not None else [i for s in sources for i in s.ids]), written),
        _stamped((index_dir / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)), ""), written),
        # last: it records the count and the files the others must have
        (index_dir / META_FILE, lambda tmp: json_file(tmp, dataclasses.replace(meta, files=written).to_json())[1](tmp), ""),
    ])


def _stamped(files: FileWrite, written: dict[str, list[int]]) -> FileWrite:
    """`files` (files.replace_together's) whose write also records each file's stamp in `written`, by name."""
    paths, write, suffix = files

    def write_and_stamp(tmps):
        write(tmps)
        for path, tmp in zip(*((paths, tmps) if isinstance(paths, list) else ([paths], [tmps]))):
            written[Path(path).name] = _stamp(tmp)

    return paths, write_and_stamp, suffix


def _has_regions(source) -> bool:
    return getattr(source, "regions", True) is not None


def refuse_unreadable_files(index_dir: Path) -> None:
    """One line naming an index file this user may not read (another user's index, made with umask 077),
    rather than the advice to rebuild an index that is whole."""
    for name in (META_FILE, IDS_FILE, EMBEDDINGS_FILE, INDEX_FILE, REGIONS_FILE, REGION_OFFSETS_FILE, REGION_POSITIONS_FILE):
        path = index_dir / name
        if os.path.exists(path) and not os.access(path, os.R_OK):
            raise UserError(f"{path}: this user may not read it (Permission denied (EACCES)); another user's index? its "
                            f"owner can make it readable (chmod -R a+rX {index_dir}), or build one of your own with "
                            "`vlpcache index -o DIR` (then search and serve take --index DIR)")
