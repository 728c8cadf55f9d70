"""Query-bank normalisation: the inverted softmax, the hub rule, incremental state, dual softmax."""

import numpy as np

from vlpcache.querybank import QueryBank, bank_captions, dual_softmax


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_log_norm_is_the_log_of_the_banks_summed_exponentials_and_hubs_are_top_videos():
    rng = np.random.default_rng(0)
    bank, videos = unit(rng.standard_normal((30, 8))), unit(rng.standard_normal((12, 8)))
    qb = QueryBank.build(bank, videos, beta=5.0, k=2)
    expected = np.log(np.exp(5.0 * bank @ videos.T).sum(0))
    np.testing.assert_allclose(qb.log_norm, expected, rtol=1e-5)
    top2 = np.argsort(-(bank @ videos.T), axis=1)[:, :2]
    assert qb.hubs.tolist() == np.isin(np.arange(12), top2).tolist()


def test_adding_videos_later_gives_the_state_of_building_at_once():
    rng = np.random.default_rng(1)
    bank, videos = unit(rng.standard_normal((50, 8))), unit(rng.standard_normal((20, 8)))
    whole = QueryBank.build(bank, videos, beta=10.0, k=2)
    grown = QueryBank.build(bank, videos[:7], beta=10.0, k=2).extended(videos[7:])
    np.testing.assert_allclose(grown.log_norm, whole.log_norm, rtol=1e-6)
    np.testing.assert_array_equal(grown.top_videos, whole.top_videos)
    assert grown.hubs.tolist() == whole.hubs.tolist()


def test_only_queries_whose_best_video_is_a_hub_are_normalised():
    videos = unit(np.eye(3))
    bank = unit([[1, 0.1, 0], [1, 0, 0.1], [0.9, 0.2, 0]])  # every bank query's best is video 0: the hub
    qb = QueryBank.build(bank, videos, beta=10.0, k=1)
    assert qb.hubs.tolist() == [True, False, False]
    similarity = np.array([[0.9, 0.85, 0.0],   # best is the hub: normalised, and the hub drops below video 1
                           [0.1, 0.8, 0.7]])   # best is no hub: untouched
    ranked = qb.normalise(similarity)
    assert ranked[0].argmax() == 1 and np.array_equal(ranked[1], similarity[1])
    # the same on a subset of columns (an index's candidates)
    subset = qb.normalise(similarity[:, [1, 0]], columns=np.array([[1, 0], [1, 0]]))
    assert subset[0].argmax() == 0


def test_bank_is_a_seeded_sample_of_distinct_captions():
    captions = [f"c{i % 40}" for i in range(100)]
    assert bank_captions(captions, size=50) == sorted(set(captions))
    sample = bank_captions(captions, size=10)
    assert len(sample) == 10 == len(set(sample)) and sample == bank_captions(captions, size=10)


def test_dual_softmax_down_weights_a_video_that_every_query_likes():
    similarity = np.array([[0.9, 0.8], [0.9, 0.2]])  # video 0 is everyone's favourite
    assert similarity[0].argmax() == 0 and dual_softmax(similarity, 20.0)[0].argmax() == 1


def test_dual_softmax_of_blocks_of_queries_is_that_of_the_whole_matrix_to_the_last_bit():
    from vlpcache.querybank import DualSoftmax

    similarity = np.random.default_rng(1).uniform(-1, 1, (1000, 40)).astype(np.float32)  # (Q, C)
    blocks = [similarity[start : start + 64] for start in range(0, len(similarity), 64)]
    dual = DualSoftmax()
    for block in blocks:
        dual.add_maxima(block)
    for block in blocks:
        dual.add_sums(block)
    assert np.array_equal(np.concatenate([dual.scores(block) for block in blocks]), dual_softmax(similarity))
