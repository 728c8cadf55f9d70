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
    ranks = query_ranks(similarity, targets)
    return {
        "R@1": 100.0 * float(np.mean(ranks <= 1)),
        "R@5": 100.0 * float(np.mean(ranks <= 5)),
        "R@10": 100.0 * float(np.mean(ranks <= 10)),
        "MdR": float(np.median(ranks)),
        "MnR": float(np.mean(ranks)),
        "queries": int(len(ranks)),
        "candidates": int(np.shape(similarity)[1]),
    }


def query_ranks(similarity: np.ndarray, targets: Sequence) -> np.ndarray:
    """(Q,) int64: each query's rank (1-based) of its best-ranked correct candidate, ties counting against
    it; what retrieval_metrics summarises (same arguments)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if np.isnan(similarity).any():  # a NaN is no match: as the lowest score (compared with it, everything is False)
        similarity = np.where(np.isnan(similarity), -np.inf, similarity)
    if similarity.ndim != 2 or similarity.shape[0] != len(targets):
        raise ValueError(f"similarity {similarity.shape} does not match {len(targets)} queries")
    if similarity.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    if all(np.ndim(t) == 0 for t in targets):  # one correct candidate per query: all rows at once
        target = np.asarray(targets, dtype=np.int64)
        best = similarity[np.arange(len(target)), target]  # (Q,)
        ranks = (similarity >= best[:, None]).sum(1)  # the correct one counts itself: rank = 1 + others
    else:
        ranks = np.empty(similarity.shape[0], dtype=np.int64)
        for q, target in enumerate(targets):
            correct = np.atleast_1d(np.asarray(target, dtype=np.int64))
            row = similarity[q]
            best = row[correct].max()
            others = np.ones(row.shape[0], dtype=bool)
            others[correct] = False
            ranks[q] = 1 + int(np.count_nonzero(row[others] >= best))
    return ranks


# ---------------------------------------------------------------- re-ranking protocol

RERANK_CANDIDATES = 32  # candidates per query, by global similarity, that the region-word score re-orders
_RERANKED_ON_TOP = 100.0  # re-ranked candidates are lifted above any global cosine, keeping their new order


def top_candidates(similarity: np.ndarray, candidates: int = RERANK_CANDIDATES) -> np.ndarray:
    """(Q, C) scores -> (Q, P) column indices of each row's P best (unordered), P = min(candidates, C)."""
    p = min(candidates, similarity.shape[1])
    return np.argpartition(-similarity, p - 1, axis=1)[:, :p]


def reranked(similarity: np.ndarray, top: np.ndarray, local: np.ndarray, weight: float) -> np.ndarray:
    """The scores a re-ranked search ranks by: each row's `top` candidates get global + weight · S_loc
    (local (Q, P), S_loc of those candidates) and stay above every other candidate, whose global order
    is kept. The one re-rank policy of search, eval and pretraining validation."""
    result = np.array(similarity, dtype=np.float64)  # (Q, C)
    rows = np.arange(len(top))[:, None]
    result[rows, top] = result[rows, top] + weight * local + _RERANKED_ON_TOP
    return result
