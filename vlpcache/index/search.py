"""`vlpcache search TEXT`: text -> embedding -> FAISS top candidates -> region-word re-rank -> results
with the best-matching time and the regions that matched the query words.

The query model is the ONNX export that `vlpcache index` leaves in the index directory
(query_model.py): a search then never imports torch or transformers, and starts in about a second.
An index without it falls back to the run loaded with torch. Candidate regions come from the index's
region store, so no video is encoded at query time. Several queries (--queries FILE, or - for stdin)
share one process.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlpcache.devices import DEFAULT_DEVICE, resolve_device
from vlpcache.errors import UserError
from vlpcache.cache.labels import label_name
from vlpcache.index.build import open_cache, resolve_sources, update_index
from vlpcache.index.faiss_index import VideoIndex
from vlpcache.index.layout import META_FILE, IndexConfig, check_same_source, read_meta
from vlpcache.index.query_model import OnnxQueryModel, query_export_sha
from vlpcache.index.rerank import align
from vlpcache.metrics import RERANK_CANDIDATES
from vlpcache.model.run_layout import designated_checkpoint_sha256
from vlpcache.report import Say, say


@dataclass
class RegionHit:
    word: str  # the query word
    label: str  # detector class of the region it attends to ("frame" = the whole-frame region)
    box: list[float]  # normalised x1, y1, x2, y2
    time: float  # seconds: timestamp of the region's frame
    weight: float  # the word's attention on this region


@dataclass
class Hit:
    rank: int
    id: str
    path: str
    score: float  # what the ranking used: global + weight * S_loc after re-rank, else global cosine
    global_score: float
    local_score: float | None  # S_loc; None without re-rank
    time: float | None  # best-matching timestamp in seconds
    regions: list[RegionHit] = field(default_factory=list)


class Searcher:
    """A query model, the cache and its index, open for any number of queries."""

    def __init__(self, query_model, cache, index: VideoIndex, rerank_candidates: int = RERANK_CANDIDATES):
        self.query_model, self.cache, self.index = query_model, cache, index
        self.rerank_candidates = rerank_candidates

    def search(self, query: str, k: int, rerank: bool = True) -> list[Hit]:
        """The top k of the index for one query, best first."""
        text_global, words, word_mask, tokens = self.query_model.encode(query)  # (1, E), (1, L, E), (1, L)
        pool = max(k, self.rerank_candidates) if rerank else k
        faiss_scores, faiss_rows = self.index.search(text_global, pool)  # (1, pool) each
        # candidates no longer in the cache (it was rebuilt without them) cannot be shown
        found = [(float(s), int(r)) for s, r in zip(faiss_scores[0], faiss_rows[0])
                 if r >= 0 and self.index.ids[r] in self.cache]
        if not found:
            return []
        rows = [r for _, r in found]
        regions, region_mask, positions = self.index.regions.gather(rows)  # (P, K, E), (P, K), (P, K)
        score, global_, local, attention = self.query_model.rescore(  # (1, P) x 3, (1, P, L, K)
            words, word_mask, text_global, regions, region_mask, self.index.embeddings[rows])
        if rerank:
            order = np.argsort(-score[0], kind="stable")[:k]  # (k,) candidate positions, best first
        else:
            order = np.arange(min(k, len(found)))
        hits = []
        for rank, j in enumerate(order, 1):
            item_id = self.index.ids[rows[j]]
            item = self.cache.get(item_id)
            N = item["labels"].shape[1]
            alignment = align(attention[0, j], word_mask[0], tokens, positions[j], N)
            matched = []
            for match in alignment.words:
                t, n = divmod(match.region, N)
                matched.append(RegionHit(
                    match.word, label_name(int(item["labels"][t, n])), [round(float(v), 3) for v in item["boxes"][t, n]],
                    round(float(item["timestamps"][t]), 2), round(match.weight, 3),
                ))
            hits.append(Hit(
                rank=rank, id=item_id, path=item["path"],
                score=float(score[0, j] if rerank else found[j][0]),
                global_score=float(global_[0, j]),
                local_score=float(local[0, j]) if rerank else None,
                time=round(float(item["timestamps"][alignment.best_frame]), 2),
                regions=matched,
            ))
        return hits


# ---------------------------------------------------------------- output


def hits_json(query: str, hits: list[Hit]) -> dict:
    return {"query": query, "results": [asdict(h) for h in hits]}


def format_hits(query: str, hits: list[Hit]) -> str:
    lines = [f"query: {query}"]
    if not hits:
        lines.append("  (no results)")
    for h in hits:
        path = f"  {h.path}" if h.path and h.path != h.id else ""
        when = f"  @ {h.time:.2f} s" if h.time is not None else ""
        lines.append(f"{h.rank:3d}  {h.score:7.4f}  {h.id}{path}{when}")
        if h.regions:
            parts = [f"{r.word} -> {r.label} [{', '.join(f'{v:.2f}' for v in r.box)}] @ {r.time:.2f} s" for r in h.regions]
            lines.append("       " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def read_queries(text: str | None, queries_file: str | None) -> list[str]:
    queries = []
    if text is not None:
        if not text.strip():
            raise UserError('empty query; give words to search for, e.g. vlpcache search "person cuts onion"')
        queries.append(text.strip())
    if queries_file:
        if queries_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                lines = Path(queries_file).read_text(encoding="utf-8").splitlines()
            except OSError as err:
                raise UserError(f"--queries {queries_file}: cannot read it ({err.strerror})") from None
        queries += [line.strip() for line in lines if line.strip()]
        if not queries:
            raise UserError(f"--queries {queries_file}: no queries in it (one query per line)")
    if not queries:
        raise UserError('no query; give TEXT (vlpcache search "person cuts onion") or --queries FILE')
    return queries


def open_searcher(run_dir=None, cache_dir=None, index_dir=None, device=DEFAULT_DEVICE, say: Say = say) -> Searcher:
    """The Searcher for the options and workspace defaults; builds the index on first use.

    With an up-to-date ONNX export in the index, neither torch nor the run's weights are loaded.
    """
    sources = resolve_sources(run_dir, cache_dir, index_dir)
    cache = open_cache(sources.cache_dir)
    index_dir = sources.index_dir
    run_sha = designated_checkpoint_sha256(sources.run_dir)
    if (index_dir / META_FILE).exists() and run_sha is not None:
        # refuse a mismatch before paying for anything
        check_same_source(read_meta(index_dir), index_dir, run_sha, cache.settings.to_json(), sources.run_dir)
    index = VideoIndex.load(index_dir) if (index_dir / META_FILE).exists() else None
    if index is not None and index.regions is not None and run_sha is not None and query_export_sha(index_dir) == run_sha:
        query_model = OnnxQueryModel(index_dir)
    else:
        from vlpcache.model.retrieval import default_batch_size
        from vlpcache.index.query_graphs import TorchQueryModel
        from vlpcache.model.checkpoint import load_run

        device = resolve_device(device)
        run = load_run(sources.run_dir, device=device)
        if index is None:
            say(f"no index at {index_dir} yet: building it from run {sources.run_dir} (first use only)")
        else:
            check_same_source(index.meta, index_dir, run.checkpoint_sha256, cache.settings.to_json(), sources.run_dir)
        if index is None or index.regions is None:
            index = update_index(run, cache, index_dir, IndexConfig(), device=device,
                                 batch_size=default_batch_size(device), say=say)
        query_model = TorchQueryModel(run)
    unindexed = sum(1 for item_id in cache.ids if item_id not in index)
    if unindexed:
        say(f"note: {unindexed} cached items are not in the index yet; run `vlpcache index` to add them")
    return Searcher(query_model, cache, index)


def run_search(text=None, queries_file=None, *, k: int, run_dir=None, cache_dir=None, index_dir=None,
               as_json=False, no_rerank=False, device=DEFAULT_DEVICE) -> None:
    """The `vlpcache search` command."""
    queries = read_queries(text, queries_file)
    searcher = open_searcher(run_dir, cache_dir, index_dir, device)
    rerank = not no_rerank
    if rerank and not searcher.query_model.rwa:
        say("note: the run was trained without region-word alignment; results are not re-ranked")
        rerank = False
    if k > len(searcher.index):
        say(f"note: -k {k} is more than the {len(searcher.index)} indexed items; showing all of them")
    for n, query in enumerate(queries):
        hits = searcher.search(query, k, rerank=rerank)
        if as_json:
            print(json.dumps(hits_json(query, hits), ensure_ascii=False), flush=True)
        else:
            print(("\n" if n else "") + format_hits(query, hits), flush=True)
