"""The FAISS layer on real FAISS indexes over small random data."""

import json

import numpy as np
import pytest

from vlpcache.errors import UserError
from vlpcache.index.faiss_index import VideoIndex, choose_factory
from vlpcache.index.layout import IDS_FILE, IndexConfig, IndexMeta, check_same_source, read_meta

DIM = 32
SETTINGS = {"frames": 2, "regions": 4, "feature_dim": 16, "detector": "test"}


def clustered_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """L2-normalised points around 50 centres: structured like real embeddings, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids_for(n: int, start: int = 0) -> list[str]:
    return [f"video{i}" for i in range(start, start + n)]


def meta() -> IndexMeta:
    return IndexMeta(checkpoint_sha256="a" * 64, cache_settings=SETTINGS, embedding_dim=DIM, factory="")


def test_small_collection_gets_exact_inner_product_index():
    factory, reason = choose_factory(1000, 256)
    assert factory == "Flat"
    assert "exact" in reason


def test_large_collection_within_memory_budget_gets_hnsw():
    factory, _ = choose_factory(1_000_000, 256, IndexConfig(memory_budget_mb=2048))
    assert factory.startswith("HNSW")


def test_tight_memory_budget_gets_ivf_pq_with_refinement():
    factory, _ = choose_factory(1_000_000, 256, IndexConfig(memory_budget_mb=400))
    assert factory.startswith("IVF") and ",PQ32" in factory and "Refine" in factory


def test_factory_string_overrides_the_chooser():
    factory, reason = choose_factory(10, 256, IndexConfig(factory="HNSW16,Flat"))
    assert factory == "HNSW16,Flat" and "--factory" in reason


def test_invalid_factory_string_is_a_user_error():
    with pytest.raises(UserError, match="factory string"):
        VideoIndex.build(ids_for(50), clustered_vectors(50), meta(), IndexConfig(factory="NoSuchIndex7"))


def test_exact_index_returns_each_vector_as_its_own_best_match():
    x = clustered_vectors(300)
    index = VideoIndex.build(ids_for(300), x, meta())
    scores, rows = index.search(x[:20], 5)
    assert index.meta.factory == "Flat"
    assert list(rows[:, 0]) == list(range(20))
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_hnsw_search_parameters_are_tuned_to_the_target_recall():
    x = clustered_vectors(3000)
    index = VideoIndex.build(ids_for(3000), x, meta(), IndexConfig(exact_limit=100))
    assert index.meta.factory.startswith("HNSW")
    assert index.meta.search_params.startswith("efSearch=")
    assert index.meta.tuned_recall >= 0.95


def test_tight_budget_on_a_small_collection_still_chooses_ivf_pq():
    factory, _ = choose_factory(3000, DIM, IndexConfig(exact_limit=100, memory_budget_mb=0.5))
    assert factory == "IVF64,PQ4np,Refine(SQ8)"


def test_ivf_pq_index_is_trained_tuned_and_finds_near_neighbours():
    x = clustered_vectors(3000)
    # 4-bit codes: the chooser's 8-bit PQ trains 256 centroids per sub-space, too slow for a unit test
    index = VideoIndex.build(ids_for(3000), x, meta(), IndexConfig(factory="IVF64,PQ4x4,Refine(SQ8)"))
    assert "nprobe=" in index.meta.search_params
    assert index.meta.tuned_recall >= 0.95
    _, rows = index.search(x[:50], 10)
    assert np.mean([i in row for i, row in enumerate(rows)]) >= 0.95


def test_saved_index_loads_with_the_same_ids_metadata_and_answers(tmp_path):
    x = clustered_vectors(3000)
    built = VideoIndex.build(ids_for(3000), x, meta(), IndexConfig(exact_limit=100))
    built.save(tmp_path)
    loaded = VideoIndex.load(tmp_path)
    assert loaded.ids == built.ids
    assert loaded.meta == built.meta
    assert np.array_equal(loaded.embeddings, x)
    assert np.array_equal(loaded.search(x[:10], 5)[1], built.search(x[:10], 5)[1])
    assert json.loads((tmp_path / "index.json").read_text())["checkpoint_sha256"] == "a" * 64


def test_added_items_are_searchable_and_keep_earlier_rows():
    x = clustered_vectors(400)
    index = VideoIndex.build(ids_for(300), x[:300], meta())
    message = index.add(ids_for(100, start=300), x[300:])
    assert "100 new items" in message
    assert index.ids == ids_for(400)
    _, rows = index.search(x[350:351], 1)
    assert index.ids[rows[0, 0]] == "video350"


def test_adding_an_already_indexed_id_is_refused():
    x = clustered_vectors(20)
    index = VideoIndex.build(ids_for(10), x[:10], meta())
    with pytest.raises(ValueError, match="already indexed"):
        index.add(["video3"], x[10:11])


def test_growing_past_the_exact_limit_rebuilds_from_stored_embeddings():
    x = clustered_vectors(600)
    config = IndexConfig(exact_limit=400)
    index = VideoIndex.build(ids_for(300), x[:300], meta(), config)
    message = index.add(ids_for(300, start=300), x[300:], config)
    assert index.meta.factory.startswith("HNSW") and "rebuilt" in message
    assert index.index.ntotal == 600 and index.meta.count == 600


def test_a_factory_given_by_the_user_stays_when_items_are_added():
    x = clustered_vectors(600)
    index = VideoIndex.build(ids_for(300), x[:300], meta(), IndexConfig(factory="HNSW16,Flat"))
    index.add(ids_for(300, start=300), x[300:], IndexConfig())
    assert index.meta.factory == "HNSW16,Flat" and index.index.ntotal == 600


def test_k_larger_than_the_collection_returns_every_item():
    x = clustered_vectors(7)
    index = VideoIndex.build(ids_for(7), x, meta())
    scores, rows = index.search(x[:1], 50)
    assert rows.shape == (1, 7) and sorted(rows[0]) == list(range(7))


def test_index_files_that_disagree_are_refused(tmp_path):
    VideoIndex.build(ids_for(30), clustered_vectors(30), meta()).save(tmp_path)
    (tmp_path / IDS_FILE).write_text(json.dumps(ids_for(29)))
    with pytest.raises(UserError, match="disagree on the item count"):
        VideoIndex.load(tmp_path)


def test_missing_index_is_a_user_error_naming_the_command(tmp_path):
    with pytest.raises(UserError, match="vlpcache index"):
        read_meta(tmp_path / "nowhere")


def test_index_from_another_checkpoint_is_refused():
    with pytest.raises(UserError, match="built from another checkpoint or cache.*checkpoint aaaaaaaaaaaa, not bbbbbbbbbbbb"):
        check_same_source(meta(), "idx", "b" * 64, SETTINGS)


def test_index_from_a_cache_with_other_settings_is_refused():
    with pytest.raises(UserError, match="feature_dim"):
        check_same_source(meta(), "idx", "a" * 64, {**SETTINGS, "feature_dim": 32})


def test_each_checkpoint_and_cache_settings_has_its_own_index_folder_in_a_root(tmp_path):
    from vlpcache.index.layout import index_dir_for

    a = index_dir_for(tmp_path, "a" * 64, SETTINGS)
    assert a.parent == tmp_path and a != index_dir_for(tmp_path, "b" * 64, SETTINGS)
    assert a != index_dir_for(tmp_path, "a" * 64, {**SETTINGS, "frames": 4})
    assert index_dir_for(tmp_path, "a" * 64, dict(reversed(SETTINGS.items()))) == a
