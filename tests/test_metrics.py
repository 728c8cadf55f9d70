"""vlpcache.metrics on hand-built score matrices: every expected rank is worked out by hand in the
comments, so nothing here is computed by the function under test."""

import numpy as np
import pytest

from vlpcache.metrics import RERANK_CANDIDATES, reranked, retrieval_metrics, top_candidates


def test_ranks_recalls_median_and_mean_of_single_targets():
    similarity = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 0 is the best: rank 1
        [0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1],  # target 1: only 0.9 is higher, rank 2
        [0.7, 0.6, 0.1, 0.5, 0.4, 0.3, 0.9],  # target 2 (0.1): all six others higher, rank 7
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 3 (0.4): 0.5, 0.6, 0.7 higher, rank 4
    ])
    metrics = retrieval_metrics(similarity, [0, 1, 2, 3])
    # ranks 1, 2, 7, 4: R@1 = 1/4, R@5 = 3/4, R@10 = 4/4, median (2 + 4) / 2, mean 14 / 4
    assert metrics == {"R@1": 25.0, "R@5": 75.0, "R@10": 100.0, "MdR": 3.0, "MnR": 3.5, "queries": 4, "candidates": 7}


def test_a_similarity_that_is_not_a_number_is_no_match():
    """A model of NaN weights scores NaN everywhere: ranked last, not first (NaN compares False with all)."""
    nan = np.full((3, 3), np.nan)
    assert retrieval_metrics(nan, [0, 1, 2])["R@1"] == 0.0
    one = np.eye(3)
    one[1, 1] = np.nan  # query 1's own video NaN: last; the other queries unchanged
    both = [[0, 2], [1], [2]]
    for targets in ([0, 1, 2], both):
        metrics = retrieval_metrics(one, targets)
        assert metrics["R@1"] == pytest.approx(200 / 3) and metrics["MdR"] == 1.0


def test_rank_5_counts_and_rank_6_does_not():
    # target 0 behind exactly k-1 higher scores has rank k
    rows = [np.r_[0.0, np.linspace(0.9, 0.5, higher), np.full(11 - higher, -1.0)] for higher in (4, 5, 9, 10)]
    metrics = retrieval_metrics(np.array(rows), [0, 0, 0, 0])
    # ranks 5, 6, 10, 11
    assert (metrics["R@1"], metrics["R@5"], metrics["R@10"]) == (0.0, 25.0, 75.0)
    assert metrics["MdR"] == 8.0 and metrics["MnR"] == 8.0


def test_ties_count_against_the_query():
    tied = np.array([
        [0.5, 0.5, 0.5, 0.5],  # a constant scorer: the target ranks after the 3 others that equal it, rank 4
        [0.5, 0.7, 0.5, 0.1],  # one higher and one equal: rank 3
        [0.1, 0.1, 0.3, 0.2],  # target 2 strictly best: rank 1
    ])
    metrics = retrieval_metrics(tied, [0, 2, 2])
    assert (metrics["R@1"], metrics["MnR"]) == (pytest.approx(100 / 3), pytest.approx(8 / 3))
    assert metrics["MdR"] == 3.0
    assert retrieval_metrics(np.zeros((5, 20)), list(range(5)))["R@10"] == 0.0  # all tied at 20 candidates: rank 20


def test_several_correct_candidates_rank_by_the_best_of_them_and_never_count_each_other():
    similarity = np.array([
        [0.9, 0.8, 0.7, 0.1, 0.95],  # correct 1 and 2: the best is 0.8, beaten by 0.9 and 0.95 only: rank 3
        [0.2, 0.3, 0.4, 0.5, 0.6],  # correct 3 and 4: 0.6 beats everything else, rank 1 (0.5 does not count)
        [0.5, 0.5, 0.1, 0.1, 0.1],  # correct 0 and 1 tie: neither counts against the other, rank 1
        [0.5, 0.2, 0.5, 0.1, 0.5],  # correct 1 and 2: the best (0.5) ties with 0 and 4, which both count: rank 3
    ])
    metrics = retrieval_metrics(similarity, [[1, 2], [3, 4], [0, 1], [1, 2]])
    assert metrics["MnR"] == pytest.approx(8 / 4) and metrics["R@1"] == 50.0


def test_a_similarity_that_does_not_match_the_targets_is_refused():
    with pytest.raises(ValueError, match="does not match 3 queries"):
        retrieval_metrics(np.zeros((2, 4)), [0, 1, 2])
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics(np.zeros((0, 4)), [])


def test_top_candidates_are_each_rows_best_p_columns():
    similarity = np.array([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.4, 0.3, 0.2, 0.1]])
    assert [sorted(row) for row in top_candidates(similarity, 2)] == [[1, 3], [0, 1]]
    assert top_candidates(similarity, 50).shape == (2, 5)  # never more than there are
    assert RERANK_CANDIDATES == 32


def test_reranked_adds_the_weighted_local_score_to_the_top_and_keeps_the_rest_below_in_global_order():
    similarity = np.array([[0.9, 0.8, 0.7, 0.6, 0.65]])
    top = np.array([[0, 1, 2]])  # the three best by global score
    local = np.array([[0.0, 0.5, 2.0]])
    scores = reranked(similarity, top, local, 0.25)
    # re-ranked: 0.9 + 0, 0.8 + 0.125, 0.7 + 0.5 -> order 2, 1, 0; then the others by global: 4 (0.65), 3 (0.6)
    assert list(np.argsort(-scores[0], kind="stable")) == [2, 1, 0, 4, 3]
    np.testing.assert_allclose(scores[0, [0, 1, 2]] - scores[0, 0] + 0.9, [0.9, 0.925, 1.2])
    assert list(np.argsort(-reranked(similarity, top, local, 0.0)[0], kind="stable")) == [0, 1, 2, 4, 3]
    # a local score so low that its candidate falls below every global score still stays above the rest
    sunk = reranked(similarity, top, np.array([[0.0, 0.0, -2.0]]), 1.0)
    assert sunk[0, 2] > sunk[0, 4] and list(np.argsort(-sunk[0], kind="stable")) == [0, 1, 2, 4, 3]
    assert similarity[0, 0] == 0.9  # the input is left as it was


def test_reranked_metrics_follow_the_new_order_of_each_query():
    similarity = np.array([[0.9, 0.8, 0.1], [0.2, 0.9, 0.8]])
    top = np.array([[0, 1], [1, 2]])
    local = np.array([[0.0, 1.0], [0.0, 1.0]])  # each query's second candidate gets +w
    # query 0 (target 1): rank 2 by global, rank 1 once w > 0.1; query 1 (target 1): rank 1 until w > 0.1
    assert retrieval_metrics(reranked(similarity, top, local, 0.05), [1, 1])["MnR"] == 1.5
    assert retrieval_metrics(reranked(similarity, top, local, 0.5), [1, 1])["MnR"] == 1.5
    assert retrieval_metrics(reranked(similarity, top, local, 0.5), [1, 2])["R@1"] == 100.0


def _ranks_of_the_whole_matrix(similarity, targets):
    """The ranks as the metric defines them, row by row on the whole matrix (float64, NaN the lowest)."""
    similarity = np.where(np.isnan(similarity), -np.inf, similarity.astype(np.float64))
    ranks = []
    for row, target in zip(similarity, targets):
        correct = np.zeros(len(row), bool)
        correct[np.atleast_1d(target)] = True
        best = row[correct].max()
        ranks.append(1 + int(np.count_nonzero(row[~correct] >= best)))
    return np.array(ranks)


@pytest.mark.parametrize("several", [False, True])
def test_ranks_found_a_few_rows_at_a_time_are_those_of_the_whole_matrix_ties_and_nan_included(monkeypatch, several):
    import vlpcache.metrics as metrics

    rng = np.random.default_rng(0)
    similarity = np.round(rng.standard_normal((101, 37)), 1).astype(np.float32)  # one decimal: many ties
    similarity[rng.random(similarity.shape) < 0.05] = np.nan
    targets = ([list(rng.integers(0, 37, rng.integers(1, 4))) for _ in range(101)] if several
               else list(rng.integers(0, 37, 101)))
    expected = _ranks_of_the_whole_matrix(similarity, targets)
    monkeypatch.setattr(metrics, "QUERY_BLOCK", 2)
    assert np.array_equal(metrics.query_ranks(similarity, targets), expected)
    assert np.array_equal(metrics.query_ranks(similarity.astype(np.float16), targets), expected)  # exact in float16
