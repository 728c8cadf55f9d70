"""`vlpcache search TEXT`: text -> embedding -> FAISS top candidates -> region-word re-rank -> results
with the best-matching time and the regions that matched the query words.

Several queries (--queries FILE, or - for stdin) share one process: the model, index and cache open
once, and candidate videos encoded for one query are reused by the next.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlpcache.errors import UserError
from vlpcache.index.build import open_cache, resolve_sources, update_index
from vlpcache.index.encode import encode_texts, encode_video_rows, resolve_device
from vlpcache.index.faiss_index import META_FILE, IndexConfig, VideoIndex, check_same_source, read_meta
from vlpcache.index.rerank import RERANK_CANDIDATES, align, rerank_scores


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
    """A run's model, the cache and its index, open for any number of queries."""

    def __init__(self, run, cache, index: VideoIndex, device, rerank_candidates: int = RERANK_CANDIDATES):
        self.run, self.cache, self.index, self.device = run, cache, index, device
        self.rerank_candidates = rerank_candidates
        self._videos: dict[int, tuple] = {}  # cache row -> (global (E,), regions (R, E), region_mask (R,))

    def _encoded(self, cache_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        missing = [r for r in dict.fromkeys(cache_rows) if r not in self._videos]
        if missing:
            video = encode_video_rows(self.run, self.cache, missing, self.device, 64, regions=True, progress=False)
            for i, r in enumerate(missing):
                self._videos[r] = (video.global_[i], video.regions[i], video.region_mask[i])
        parts = [self._videos[r] for r in cache_rows]
        longest = max(p[1].shape[0] for p in parts)  # items of caches with other T*N: pad regions
        regions = torch.zeros((len(parts), longest, parts[0][1].shape[1]), dtype=parts[0][1].dtype)
        mask = torch.zeros((len(parts), longest), dtype=torch.bool)
        for i, (_, r, m) in enumerate(parts):
            regions[i, : len(r)], mask[i, : len(m)] = r, m
        return torch.stack([p[0] for p in parts]), regions, mask

    def search(self, query: str, k: int, rerank: bool = True) -> list[Hit]:
        """The top k of the index for one query, best first."""
        config = self.run.config
        encoded = encode_texts(self.run, [query], self.device)
        text = encoded.embedding
        pool = max(k, self.rerank_candidates) if rerank else k
        faiss_scores, faiss_rows = self.index.search(text.global_.numpy(), pool)
        found = [(float(s), int(r)) for s, r in zip(faiss_scores[0], faiss_rows[0]) if r >= 0]
        # candidates no longer in the cache (it was rebuilt without them) cannot be shown
        found = [(s, self.index.ids[r]) for s, r in found if self.index.ids[r] in self.cache]
        if not found:
            return []
        cache_rows = [self.cache.index_of(item_id) for _, item_id in found]
        video_global, regions, region_mask = self._encoded(cache_rows)
        scored = rerank_scores(config, text.words, text.word_mask, text.global_, regions, region_mask, video_global)
        if rerank:
            order = torch.argsort(scored.score[0], descending=True, stable=True)[:k].tolist()
        else:
            order = list(range(min(k, len(found))))
        tokens = self.run.tokenizer.convert_ids_to_tokens(encoded.input_ids[0].tolist())
        hits = []
        for rank, j in enumerate(order, 1):
            item = self.cache[cache_rows[j]]
            T, N = item["labels"].shape
            alignment = align(config, text.words[0], text.word_mask[0], regions[j, : T * N], region_mask[j, : T * N], tokens, N)
            regions_hit = []
            for match in alignment.words:
                t, n = divmod(match.region, N)
                regions_hit.append(RegionHit(
                    match.word, label_name(int(item["labels"][t, n])), [round(float(v), 3) for v in item["boxes"][t, n]],
                    round(float(item["timestamps"][t]), 2), round(match.weight, 3),
                ))
            hits.append(Hit(
                rank=rank, id=found[j][1], path=item["path"],
                score=float(scored.score[0, j] if rerank else found[j][0]),
                global_score=float(scored.global_[0, j]),
                local_score=float(scored.local[0, j]) if rerank else None,
                time=round(float(item["timestamps"][alignment.best_frame]), 2),
                regions=regions_hit,
            ))
        return hits


def label_name(label: int) -> str:
    from vlpcache.extract.regions import label_name as coco_name

    return coco_name(label)


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


def open_searcher(run_dir=None, cache_dir=None, index_dir=None, device="auto", say=print) -> Searcher:
    """The Searcher for the options and workspace defaults; builds the index on first use."""
    from vlpcache.model.checkpoint import load_run

    sources = resolve_sources(run_dir, cache_dir, index_dir)
    cache = open_cache(sources.cache_dir)
    device = resolve_device(device)
    if (sources.index_dir / META_FILE).exists():  # refuse a mismatch before paying for the model
        meta = read_meta(sources.index_dir)
        run = load_run(sources.run_dir, device=device)
        check_same_source(meta, sources.index_dir, run.checkpoint_sha256, cache.settings.to_json(), sources.run_dir)
        index = VideoIndex.load(sources.index_dir)
        unindexed = sum(1 for item_id in cache.ids if item_id not in index)
        if unindexed:
            say(f"note: {unindexed} cached items are not in the index yet; run `vlpcache index` to add them")
    else:
        run = load_run(sources.run_dir, device=device)
        say(f"no index at {sources.index_dir} yet: building it from run {sources.run_dir} (first use only)")
        index = update_index(run, cache, sources.index_dir, IndexConfig(), device=device, batch_size=64,
                             progress=True, say=say)
    return Searcher(run, cache, index, device)


def run_search(text=None, queries_file=None, run_dir=None, cache_dir=None, index_dir=None, k=10,
               as_json=False, no_rerank=False, device="auto") -> None:
    """The `vlpcache search` command."""
    queries = read_queries(text, queries_file)

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    searcher = open_searcher(run_dir, cache_dir, index_dir, device, say)
    rerank = not no_rerank
    if rerank and not searcher.run.config.rwa:
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
