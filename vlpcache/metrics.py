"""Retrieval metrics: the one function that pretraining validation, `eval` and benchmarks all call."""

from __future__ import annotations

from typing import Sequence

import numpy as np

SELECTION_KEYS = ("R@1", "R@5", "R@10")  # summed, they choose a run's best epoch and re-rank weight on validation
SELECTION = " + ".join(SELECTION_KEYS)


def selection_score(metrics: dict) -> float:
    """What validation maximises: R@1 + R@5 + R@10."""
    return sum(metrics[key] for key in SELECTION_KEYS)


def retrieval_metrics(similarity: np.ndarray, targets: Sequence) -> dict[str, float]:
    """Recall@1/5/10 (percent), median and mean rank (1-based) of the best-ranked correct candidate.

    similarity: (Q, C) scores, higher is better. targets: for each query, the index of its correct
    candidate, or a sequence of indices where several candidates are correct (video -> all its
    captions). Ties count against the query: a correct candidate ranks after every candidate whose
    score is greater or equal, so a constant scorer never looks good.
    """
    return rank_metrics(query_ranks(similarity, targets), np.shape(similarity)[1])


def rank_metrics(ranks: np.ndarray, candidates: int) -> dict[str, float]:
    """retrieval_metrics of the queries' ranks (query_ranks, or block_ranks block by block) among `candidates`."""
    return {
        "R@1": 100.0 * float(np.mean(ranks <= 1)),
        "R@5": 100.0 * float(np.mean(ranks <= 5)),
        "R@10": 100.0 * float(np.mean(ranks <= 10)),
        "MdR": float(np.median(ranks)),
        "MnR": float(np.mean(ranks)),
        "queries": int(len(ranks)),
        "candidates": int(candidates),
    }


QUERY_BLOCK = 1024  # rows ranked at once: their copies and comparisons take (QUERY_BLOCK, C), never (Q, C)


def query_ranks(similarity: np.ndarray, targets: Sequence) -> np.ndarray:
    """(Q,) int64: each query's rank (1-based) of its best-ranked correct candidate, ties counting against
    it; what retrieval_metrics summarises (same arguments), QUERY_BLOCK rows at a time (block_ranks)."""
    similarity = np.asarray(similarity)
    if similarity.ndim != 2 or similarity.shape[0] != len(targets):
        raise ValueError(f"similarity {similarity.shape} does not match {len(targets)} queries")
    if similarity.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    ranks = np.empty(similarity.shape[0], dtype=np.int64)
    for start in range(0, len(ranks), QUERY_BLOCK):
        ranks[start : start + QUERY_BLOCK] = block_ranks(similarity[start : start + QUERY_BLOCK],
                                                         targets[start : start + QUERY_BLOCK])
    return ranks


def block_ranks(similarity: np.ndarray, targets: Sequence) -> np.ndarray:
    """(b, C) scores of b queries and their targets (as query_ranks takes them) -> (b,) int64 ranks.

    float16/32 scores are compared as they are: a comparison of theirs is exact, as in float64."""
    if similarity.dtype not in (np.float16, np.float32, np.float64):
        similarity = similarity.astype(np.float64)
    if np.isnan(similarity).any():  # a NaN is no match: as the lowest score (compared with it, everything is False)
        similarity = np.where(np.isnan(similarity), -np.inf, similarity)
    if all(np.ndim(t) == 0 for t in targets):  # one correct candidate per query
        target = np.asarray(targets, dtype=np.int64)
        best = similarity[np.arange(len(target)), target]  # (b,)
        return (similarity >= best[:, None]).sum(1)  # the correct one counts itself: rank = 1 + others
    correct = np.zeros(similarity.shape, dtype=bool)  # (b, C)
    for q, target in enumerate(targets):
        correct[q, np.asarray(target, dtype=np.int64)] = True
    if not correct.any(1).all():
        raise ValueError("a query without a correct candidate")
    best = np.where(correct, similarity, -np.inf).max(1)  # (b,)
    return 1 + np.count_nonzero((similarity >= best[:, None]) & ~correct, axis=1)


# ---------------------------------------------------------------- re-ranking protocol

RERANK_CANDIDATES = 32  # candidates per query, by global similarity, that the region-word score re-orders
_RERANKED_ON_TOP = 100.0  # re-ranked candidates are lifted above any global cosine, keeping their new order


def top_candidates(similarity: np.ndarray, candidates: int = RERANK_CANDIDATES) -> np.ndarray:
    """(Q, C) scores -> (Q, P) column indices of each row's P best (unordered), P = min(candidates, C)."""
    p = min(candidates, similarity.shape[1])
    return np.argpartition(-similarity, p - 1, axis=1)[:, :p].copy()  # not a view that keeps (Q, C) indices


def reranked(similarity: np.ndarray, top: np.ndarray, local: np.ndarray, weight: float) -> np.ndarray:
    """The scores a re-ranked search ranks by: each row's `top` candidates get global + weight · S_loc
    (local (Q, P), S_loc of those candidates) and stay above every other candidate, whose global order
    is kept. The one re-rank policy of search, eval and pretraining validation."""
    result = np.array(similarity, dtype=np.float64)  # (Q, C)
    rows = np.arange(len(top))[:, None]
    result[rows, top] = result[rows, top] + weight * local + _RERANKED_ON_TOP
    return result
