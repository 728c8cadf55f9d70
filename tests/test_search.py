"""`vlpcache index` and `vlpcache search` end to end: a real HDF5 cache, a tiny run trained by the
model package's own pretraining code, real FAISS indexes, the CLI entry point in-process."""

import dataclasses
import json
import os
import re
import shutil
import sys
import time
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_model import build_tiny_text_model
from test_pretrain import write_cache, write_captions
from broken_media import damage_chunk
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.writer import ShardWriter
from vlpcache.cli import main
from vlpcache.errors import UserError
from vlpcache.index.faiss_index import VideoIndex
from vlpcache.index.layout import read_meta
from vlpcache.index.rerank import query_words
from vlpcache.model.checkpoint import load_run
from vlpcache.model.train import run_pretrain
from vlpcache.workspace import Workspace
from waiting import HANG_GUARD_S, wait_until

ITEMS = 24


def build_tiny_workspace(root: Path) -> Path:
    """root/ws: cache (ITEMS videos), runs/run-001 (one epoch of a tiny model); captions beside it."""
    ws = root / "ws"
    if not (ws / "runs" / "run-001" / "best.json").exists():
        ids = write_cache(ws / "cache", ITEMS)
        write_captions(root / "train.jsonl", ids[:16])
        write_captions(root / "val.jsonl", ids[16:])
        text = build_tiny_text_model(root / "tiny-bert")
        run_pretrain(
            cache_dirs=[ws / "cache"], captions=[root / "train.jsonl"], val_captions=root / "val.jsonl",
            run_dir=ws / "runs" / "run-001", text_model=str(text), width=16, layers=1, batch_size=8, epochs=1,
            workers=0, quiet=True, device="cpu",
        )
    return ws


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_tiny_workspace(tmp_path_factory.mktemp("search"))


@pytest.fixture
def ws(template, tmp_path, monkeypatch) -> Path:
    """A private copy of the workspace (tests add items, build indexes), set as the current workspace."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(ws))
    return ws


def the_index(ws: Path, run: Path | None = None, root: Path | None = None, cache: Path | None = None) -> Path:
    """The index directory of a run (default run-001) over a cache (default the workspace's), in an index root
    (default the workspace's)."""
    from vlpcache.cache.manifest import read_manifest
    from vlpcache.index.layout import index_dir_for
    from vlpcache.model.run_layout import designated_checkpoint_sha256

    sha = designated_checkpoint_sha256(run or ws / "runs" / "run-001")
    cache = cache or ws / "cache"
    return index_dir_for(root or ws / "index", sha, read_manifest(cache).to_json(), cache)


def vlpcache(monkeypatch, capsys, *args, stdin=None) -> tuple[int, str, str]:
    """Run the CLI entry point in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vlpcache", *map(str, args)])
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin if isinstance(stdin, bytes) else stdin.encode())))
    code = 0
    try:
        main()
    except SystemExit as exit:
        code = exit.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def search_json(monkeypatch, capsys, *args) -> list[dict]:
    code, out, err = vlpcache(monkeypatch, capsys, "search", *args, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_first_search_builds_the_workspace_index_and_says_so(ws, monkeypatch, capsys):
    code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "3")
    assert code == 0, err
    assert "building it" in err
    assert read_meta(the_index(ws)).count == ITEMS
    assert out.splitlines()[0] == "query: a dog"


def test_search_prints_rank_score_id_path_time_and_matched_regions(ws, monkeypatch, capsys):
    code, out, _ = vlpcache(monkeypatch, capsys, "search", "the dog here", "-k", "2")
    lines = out.splitlines()
    assert code == 0
    rank, score, item_id, path, at, seconds, unit = lines[1].split()
    assert (rank, at, unit) == ("1", "@", "s") and item_id.startswith("v") and path == f"{item_id}.mp4"
    float(score), float(seconds)
    assert "dog -> person [" in lines[2]  # the cache's labels are all 0 (COCO "person")


def test_a_hit_says_where_its_frame_sits_in_the_terms_of_what_it_was_extracted_from():
    """Seconds of a video (minutes and seconds past a minute); a frames folder's image by its place (1 for the first: time counts from 0); a
    photo's one frame nothing at all, rather than "@ 0.00 s"."""
    from vlpcache.index.search import Hit, RegionHit, format_hits

    def hit(kind, time):
        regions = [RegionHit("dog", "dog", [0.1, 0.2, 0.3, 0.4], time, 0.5, 1), RegionHit("ball", "ball", [0, 0, 1, 1], 0.0, 0.5, 0)]
        return Hit(rank=1, id="x", path="", score=0.5, global_score=0.5, local_score=None, time=time, regions=regions,
                   frame=1, kind=kind)

    assert format_hits("q", [hit("video", 2.5)]).splitlines()[1:] == [
        "  1   0.5000  x  @ 2.50 s", "       dog -> dog [0.10, 0.20, 0.30, 0.40] @ 2.50 s; ball -> ball [0.00, 0.00, 1.00, 1.00] @ 0.00 s"]
    assert format_hits("q", [hit("video", 2475.64)]).splitlines()[1] == "  1   0.5000  x  @ 41:15.64"  # not 2475.64 s
    assert format_hits("q", [hit("video", 3723.5)]).splitlines()[1] == "  1   0.5000  x  @ 1:02:03.50"
    assert format_hits("q", [hit("frames", 83.0)]).splitlines()[1:] == [
        "  1   0.5000  x  @ image 84", "       dog -> dog [0.10, 0.20, 0.30, 0.40] @ image 84; ball -> ball [0.00, 0.00, 1.00, 1.00] @ image 1"]
    assert format_hits("q", [hit("image", 0.0)]).splitlines()[1:] == [
        "  1   0.5000  x", "       dog -> dog [0.10, 0.20, 0.30, 0.40]; ball -> ball [0.00, 0.00, 1.00, 1.00]"]


def test_words_the_text_model_does_not_know_are_said_in_text_json_and_by_the_searcher(ws, monkeypatch, capsys):
    code, out, err = vlpcache(monkeypatch, capsys, "search", "猫 🐶", "-k", "2")
    assert code == 0 and err.splitlines()[-1] == (
        'note: the text model knows none of the words of "猫 🐶" ("猫", "🐶": each read as one unknown token, or '
        "spelled out letter by letter): this ranking says nothing about them; its vocabulary is English words"), err
    [result] = search_json(monkeypatch, capsys, "a dog with a 猫", "-k", "2")
    assert result["unknown"] == ["猫"] and result["reads_nothing"] is False
    [result] = search_json(monkeypatch, capsys, "猫 🐶", "-k", "2")
    assert result["unknown"] == ["猫", "🐶"] and result["reads_nothing"] is True
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog with a 猫", "-k", "2")
    assert err.splitlines()[-1] == ('note: the text model does not know "猫" (read as one unknown token, the same for '
                                    "anything outside its vocabulary, or spelled out letter by letter): the results "
                                    "follow the rest of the query")
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2")
    assert "unknown" not in err
    assert search_json(monkeypatch, capsys, "a dog", "-k", "2")[0]["unknown"] == []


def test_index_says_what_a_weak_match_is_and_search_says_when_a_query_finds_only_weak_ones(ws, monkeypatch, capsys):
    """A query the collection holds nothing like ranks its videos all the same: the best match of 99 in 100
    of the run's training captions (calibration.json) is what tells it is weak."""
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    path = the_index(ws) / "calibration.json"
    calibration = json.loads(path.read_text())
    assert calibration["videos"] == len(VideoIndex.load(the_index(ws))) and calibration["percentile"] == 1
    assert calibration["captions"] > 0 and -1 <= calibration["weak_below"] <= 1
    # the 1st percentile of each distinct training caption's best global match, as search finds them
    from vlpcache.index.build import run_training_captions
    from vlpcache.index.search import Searcher

    captions = sorted(set(run_training_captions(load_run(ws / "runs" / "run-001"), "test", False, print)))
    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache", index=the_index(ws), say=lambda line: None)
    best = np.array([searcher.search(c, 1, rerank=False)[0].global_score for c in captions])
    assert calibration["captions"] == len(captions)
    assert calibration["weak_below"] == pytest.approx(np.percentile(best, 1), abs=1e-3)
    for weak_below, weak in ((2.0, True), (-2.0, False)):  # every match weak; none
        path.write_text(json.dumps({**calibration, "weak_below": weak_below}))
        code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog on the grass", "-k", "3")
        assert code == 0 and ('note: a weak match for "a dog on the grass": its best global score, ' in err) == weak, err
        assert search_json(monkeypatch, capsys, "a dog on the grass", "-k", "3")[0]["weak"] == weak


@pytest.mark.parametrize("again", ["Searcher", "search", "index"])
def test_an_index_build_stopped_in_its_calibration_is_finished_by_the_next_searcher_search_or_index(ws, monkeypatch,
                                                                                                     capsys, again):
    """A Searcher's first-use build interrupted (Ctrl-C in a notebook) after index.json and the query export were
    written, while the weak-match calibration ran: every later Searcher, search and serve took the index as complete,
    and no match was said weak for good."""
    import vlpcache.index.build as build
    from vlpcache.index.query_model import QUERY_DIR
    from vlpcache.index.search import Searcher

    captions = build.run_training_captions

    def stopped(run, what, progress, say):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "run_training_captions", stopped)
    with pytest.raises(KeyboardInterrupt):
        Searcher(say=lambda line: None)
    index_dir = the_index(ws)
    assert (index_dir / "index.json").exists() and (index_dir / QUERY_DIR).is_dir()
    assert not (index_dir / "calibration.json").exists()
    monkeypatch.setattr(build, "run_training_captions", captions)
    if again == "Searcher":
        weak_below = Searcher(say=lambda line: None).weak_below
    else:
        assert vlpcache(monkeypatch, capsys, again, *(["a dog"] if again == "search" else []))[0] == 0
        weak_below = Searcher(say=lambda line: None).weak_below
    calibration = json.loads((index_dir / "calibration.json").read_text())
    assert calibration["captions"] > 0 and weak_below == calibration["weak_below"] is not None


def test_an_index_whose_run_has_no_readable_training_caption_is_complete_without_a_weak_match(ws, monkeypatch, capsys):
    """calibration.json records that none reads ("weak_below": null): search then takes the ONNX export, no torch."""
    import vlpcache.index.build as build
    from vlpcache.index.search import open_parts
    from vlpcache.index.query_model import OnnxQueryModel

    monkeypatch.setattr(build, "run_training_captions", lambda run, what, progress, say: [])  # its files moved away
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    calibration = json.loads((the_index(ws) / "calibration.json").read_text())
    assert calibration["captions"] == 0 and calibration["weak_below"] is None
    assert isinstance(open_parts(say=lambda line: None)[0], OnnxQueryModel)


def test_json_results_carry_scores_times_and_regions_of_real_frames(ws, monkeypatch, capsys):
    [result] = search_json(monkeypatch, capsys, "a cat", "-k", "5")
    assert result["query"] == "a cat" and [h["rank"] for h in result["results"]] == [1, 2, 3, 4, 5]
    for hit in result["results"]:
        assert hit["time"] in (0.0, 1.0)  # write_cache stamps frames 0 s and 1 s
        words = [r["word"] for r in hit["regions"]]
        assert words == ["cat"]  # "a" is a real word to the model, but says nothing about a region
        assert all(0 <= v <= 1 for r in hit["regions"] for v in r["box"])


def test_an_item_kept_despite_damage_carries_its_extract_note_in_text_and_json(ws, monkeypatch, capsys):
    truncated = "video data ends at 1.9 s of 8.1 s (truncated file?)"
    write_cache(ws / "cache", 3, prefix="w", seed=5, notes={1: truncated})
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", str(ITEMS + 3))
    assert {h["id"]: h["note"] for h in result["results"] if h["note"]} == {"w1": truncated}
    code, out, _ = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", str(ITEMS + 3))
    lines = out.splitlines()
    [at] = [i for i, line in enumerate(lines) if "kept with a note" in line]
    assert lines[at] == f"       kept with a note: {truncated}"
    owner = max(i for i in range(at) if not lines[i].startswith(" " * 7))  # the hit line it belongs to
    assert lines[owner].split()[2] == "w1"


def test_rerank_orders_by_global_plus_weighted_region_word_score(ws, monkeypatch, capsys):
    [result] = search_json(monkeypatch, capsys, "a horse", "-k", "8")
    weight = load_run(ws / "runs" / "run-001").config.rerank_weight
    hits = result["results"]
    for h in hits:
        assert h["score"] == pytest.approx(h["global_score"] + weight * h["local_score"], abs=1e-5)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_the_first_hits_are_the_same_whatever_k_in_every_ranking(ws, monkeypatch, capsys):
    """The re-ranked (and QB-Norm's) candidates were max(k, 32): `-k 100` re-ordered a pool `-k 10` never saw, so
    its top 10 was not `-k 10`'s, and the page's 48 results reordered its first 12. Now the first 32 candidates
    are re-ordered whatever k, and those after them follow by global similarity, as eval ranks them; QB-Norm
    ranks every item by its own score (test_search_qbnorm_ranks_every_hit_...)."""
    from vlpcache import Searcher

    assert vlpcache(monkeypatch, capsys, "index", "--qbnorm", "--quiet")[0] == 0
    searcher = Searcher(ws / "runs" / "run-001", ws / "cache")
    searcher.rerank_candidates = 6  # a head of 6 of the 24 items: what 32 of a larger collection is
    for query in ("a horse", "a dog on grass", "the red car", "two people talk"):
        for options in ({}, {"rerank": False}, {"qbnorm": True}):
            every = searcher.search(query, k=ITEMS, **options)
            assert [h.id for h in searcher.search(query, k=4, **options)] == [h.id for h in every[:4]], (query, options)
            if options.get("qbnorm"):
                continue
            tail = [h.global_score for h in every[6:]]
            assert tail == sorted(tail, reverse=True) and [h.score for h in every[6:]] == pytest.approx(tail, abs=1e-6)
            assert min(h.global_score for h in every[:6]) >= max(tail) - 1e-6  # the head: the 6 best by global
    weight = load_run(ws / "runs" / "run-001").config.rerank_weight
    head = searcher.search("a horse", k=ITEMS)[:6]
    assert [h.score for h in head] == sorted(h.score for h in head)[::-1]
    assert [h.score for h in head] == pytest.approx([h.global_score + weight * h.local_score for h in head], abs=1e-5)


def test_an_approximate_factory_only_chooses_the_candidates_their_order_is_the_exact_cosine(ws, monkeypatch, capsys):
    # a PCA index's inner products are biased (centred projections): --no-rerank ranked and printed them as the score
    assert vlpcache(monkeypatch, capsys, "index", "--factory", "PCA8,Flat", "--rebuild", "--quiet")[0] == 0
    for options in (["--no-rerank"], ["--qbnorm"], []):
        [result] = search_json(monkeypatch, capsys, "a horse", "-k", "8", *options)
        hits = result["results"]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        if options == ["--no-rerank"]:
            assert [h["score"] for h in hits] == pytest.approx([h["global_score"] for h in hits], abs=1e-5)


def hand_local_score(words: np.ndarray, regions: np.ndarray, lam: float) -> float:
    """S_loc of one text's real words (L, E) and one video's real regions (R, E), by the formula of
    docs/design.md written out word by word and region by region, contexts materialised."""
    words = words / np.linalg.norm(words, axis=1, keepdims=True)
    regions = regions / np.linalg.norm(regions, axis=1, keepdims=True)
    a = words @ regions.T  # (L, R) cosines
    a = np.where(a > 0, a, 0.1 * a)  # LeakyReLU 0.1

    def attend(queries, keys, scores):  # scores (Q, K): each query attends over the keys
        scores = scores / np.linalg.norm(scores, axis=0, keepdims=True)  # normalised over the queries
        total = 0.0
        for q, row in zip(queries, scores):
            weights = np.exp(lam * row - (lam * row).max())
            weights /= weights.sum()
            weights = weights * ((weights > 1 / len(keys)) | (weights >= weights.max()))  # focal
            context = (weights / weights.sum()) @ keys
            total += q @ context / np.linalg.norm(context)
        return total / len(queries)

    return attend(words, regions, a) + attend(regions, words, a.T)


def model_embeddings(run, cache, item_id: str, query: str):
    """The run's own encoding of the query (real words) and of the cached item (real regions, float16 as the
    index stores them), and both global embeddings."""
    from vlpcache.model.batch import tokenize, video_batch

    with torch.inference_mode():
        text = run.model.encode_text(*tokenize(run.tokenizer, [query], run.config.max_words))
        video = run.model.encode_video(**video_batch([cache.get(item_id)]))
    words = text.words[0][text.word_mask[0]].numpy()
    regions = video.regions[0][video.region_mask[0]].half().float().numpy()
    return words, regions, text.global_[0].numpy(), video.global_[0].numpy()


def test_each_hit_is_rescored_on_its_own_regions_as_the_formula_says(ws, monkeypatch, capsys):
    from vlpcache.cache.reader import RegionCache

    [result] = search_json(monkeypatch, capsys, "the horse here", "-k", "8")
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    for hit in result["results"]:
        words, regions, text_global, video_global = model_embeddings(run, cache, hit["id"], "the horse here")
        assert hit["local_score"] == pytest.approx(hand_local_score(words, regions, run.config.rwa_lambda), abs=2e-4), hit["id"]
        assert hit["global_score"] == pytest.approx(float(text_global @ video_global), abs=1e-4), hit["id"]


def test_no_rerank_orders_by_global_similarity_alone(ws, monkeypatch, capsys):
    [result] = search_json(monkeypatch, capsys, "a horse", "-k", "8", "--no-rerank")
    hits = result["results"]
    assert all(h["local_score"] is None for h in hits)
    assert [h["score"] for h in hits] == pytest.approx([h["global_score"] for h in hits], abs=1e-5)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_a_query_longer_than_the_model_reads_says_what_was_left_out(ws, monkeypatch, capsys):
    query = ("a man in a red shirt walks his brown dog along the beach at sunset while children play football on "
             "the sand and a woman reads a book under an umbrella")  # 31 words of a token each: one past 30
    code, out, err = vlpcache(monkeypatch, capsys, "search", query, "-k", "2", "--json")
    assert code == 0 and json.loads(out)["unread"] == "umbrella"
    assert ('note: the model reads the first 32 tokens of a query; the end of "a man in a red shirt walks his brown '
            'dog..." was left out: "umbrella"') in err.splitlines()
    code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2", "--json")
    assert code == 0 and json.loads(out)["unread"] == "" and "left out" not in err
    # a file of many long queries: a line for each of the first three, then one count
    queries = [f"{query} number {i}" for i in range(5)] + ["a dog"]
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--queries", "-", "-k", "1", "--json",
                              stdin="\n".join(queries))
    assert code == 0 and [json.loads(line)["unread"] for line in out.splitlines()] == [f"umbrella number {i}"
                                                                                      for i in range(5)] + [""]
    assert sum("was left out" in line for line in err.splitlines()) == 3
    assert err.splitlines()[-1] == ("note: 5 of the 6 queries were longer than the 32 tokens the model reads and cut "
                                    'there (the first 3 said so above; --json gives each one\'s "unread" end)')


def test_several_queries_from_a_file_are_answered_in_one_process(ws, tmp_path, monkeypatch, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("a dog\n\nthe beach here\na man\n")
    results = search_json(monkeypatch, capsys, "--queries", queries, "-k", "2")
    assert [r["query"] for r in results] == ["a dog", "the beach here", "a man"]
    # as Windows PowerShell's `>` saves it: UTF-16 with its byte-order mark, CRLF
    queries.write_bytes("\ufeffa dog\r\n\r\nthe beach here\r\na man\r\n".encode("utf-16-le"))
    again = search_json(monkeypatch, capsys, "--queries", queries, "-k", "2")
    assert [r["query"] for r in again] == ["a dog", "the beach here", "a man"] and all(len(r["results"]) == 2 for r in again)
    # comment lines, blank ones of spaces and tabs, a byte-order mark where two files were joined: none is a
    # query; a hashtag is one
    queries.write_text("# my queries\n#\n \t \na dog\n\ufeffthe beach here\n  # the next one\n#beach\n", encoding="utf-8")
    assert [r["query"] for r in search_json(monkeypatch, capsys, "--queries", queries, "-k", "1")] == [
        "a dog", "the beach here", "#beach"]


def test_a_zero_width_space_next_line_or_html_between_two_words_of_a_query_parts_them(ws, monkeypatch, capsys):
    # BERT's tokenizer drops U+200B, U+0085 and U+FEFF, joining "dog" and "here" into one word: a space instead
    def scores(*queries):
        code, out, err = vlpcache(monkeypatch, capsys, "search", *queries, "--json")
        assert code == 0, err
        return [[(h["id"], round(h["score"], 5)) for h in json.loads(line)["results"]] for line in out.split("\n") if line]

    spaced = scores("the dog here", "-k", "3")[0]
    assert scores("the dog\u200bhere", "-k", "3") == scores("the dog\x85here", "-k", "3") == [spaced]
    queries = Path(ws / "queries.txt")
    queries.write_text("the dog\ufeffhere\nthe dog\x85here\n", encoding="utf-8")  # str.splitlines ends a line at U+0085
    assert scores("--queries", queries, "-k", "3") == [spaced, spaced]
    assert scores("the <b>dog</b>&nbsp;here", "-k", "3") == [spaced]  # HTML pasted: its tags and references as read


def test_queries_are_read_from_stdin_with_a_dash(ws, monkeypatch, capsys):
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--queries", "-", "-k", "1", "--json", stdin="a car\na ball\n")
    assert code == 0, err
    assert [json.loads(line)["query"] for line in out.splitlines()] == ["a car", "a ball"]


def test_k_larger_than_the_collection_shows_every_item_with_a_note(ws, monkeypatch, capsys):
    code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "500", "--json")
    assert code == 0
    assert "more than the 24 indexed items" in err
    assert len(json.loads(out)["results"]) == ITEMS


def test_empty_query_is_one_line_error(ws, monkeypatch, capsys):
    code, out, err = vlpcache(monkeypatch, capsys, "search", "   ")
    assert code == 2 and err.startswith("error: empty query") and err.count("\n") == 1


def test_a_query_that_is_not_utf8_is_one_line_error_not_a_tokenizer_traceback(ws, monkeypatch, capsys):
    # a Latin-1 terminal's "café": Python hands the byte \xe9 over as the stand-in "\udce9"
    code, out, err = vlpcache(monkeypatch, capsys, "search", "caf\udce9", "--json")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == ('error: the query "caf\\xe9" is not UTF-8 text (the byte \\xe9: a terminal or file '
                                    "in another encoding, e.g. Latin-1); give it in UTF-8 (e.g. a terminal with LANG=C.UTF-8)")


def test_missing_run_is_one_line_error(ws, monkeypatch, capsys):
    shutil.rmtree(ws / "runs")
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog")
    assert code == 2 and err.startswith("error: no pretraining run") and err.count("\n") == 1


def test_missing_cache_is_one_line_error(ws, monkeypatch, capsys):
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--cache", ws / "nowhere")
    assert code == 2 and err.startswith("error: no cache at") and err.count("\n") == 1


def test_without_the_workspace_cache_index_names_the_caches_the_run_was_trained_on(ws, template, tmp_path, monkeypatch,
                                                                                   capsys):
    # a Slurm array's caches, one per task, trained on together: `vlpcache index` said only "no cache at
    # .vlpcache/cache; run `vlpcache extract` first"
    caches = [tmp_path / "part0", tmp_path / "part1"]
    ids = write_cache(caches[0], 8, prefix="v") + write_cache(caches[1], 8, prefix="w", seed=1)
    write_captions(tmp_path / "parts.jsonl", ids)
    run_pretrain(cache_dirs=caches, captions=[tmp_path / "parts.jsonl"], run_dir=ws / "runs" / "run-002",
                 text_model=str(template.parent / "tiny-bert"), width=16, layers=1, batch_size=8, epochs=1,
                 workers=0, quiet=True, device="cpu")
    shutil.rmtree(ws / "cache")
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 2 and err == (f"error: no cache at {ws / 'cache'}; run-002 was trained on 2 caches ({caches[0]}, "
                                 f"{caches[1]}): pass one of them with --cache (index, search, serve and eval read one "
                                 "cache at a time)\n")
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--run", ws / "runs" / "run-001")
    assert code == 2 and err.endswith(f"; run-001 was trained on {template / 'cache'}: pass --cache {template / 'cache'}\n")
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--cache", caches[1])
    assert code == 0, err


def retrained(ws: Path, name: str = "run-002") -> Path:
    """A newer run: run-001's checkpoint with its weights nudged (another sha256), modified last."""
    run = ws / "runs" / name
    shutil.copytree(ws / "runs" / "run-001", run)
    nudge_weights(run)
    for folder in (run, *(run / "checkpoints").iterdir()):  # the latest run: it saved a checkpoint last
        os.utime(folder, (time.time() + 10, time.time() + 10))
    return run


def nudge_weights(run: Path, by: float = 0.01) -> None:
    """The run's designated checkpoint replaced by other weights, as re-training it would (another sha256)."""
    from safetensors.torch import load_file, save_file

    from vlpcache.files import file_sha256
    from vlpcache.model.run_layout import META_NAME, WEIGHTS_NAME, resolve_checkpoint

    checkpoint = resolve_checkpoint(run)
    weights = load_file(checkpoint / WEIGHTS_NAME)
    save_file({k: v + by if v.is_floating_point() else v for k, v in weights.items()}, checkpoint / WEIGHTS_NAME)
    meta = json.loads((checkpoint / META_NAME).read_text())
    (checkpoint / META_NAME).write_text(json.dumps({**meta, "sha256": file_sha256(checkpoint / WEIGHTS_NAME)}))


def test_a_newer_run_gets_an_index_of_its_own_on_first_search_and_the_earlier_one_stays(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    first = the_index(ws)
    newer = retrained(ws)
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog")
    second = the_index(ws, newer)
    assert code == 0 and second != first and second.parent == first.parent
    assert f"no index of run {newer} (epoch 1" in err and f"building it in {second}" in err
    assert f"the 1 index(es) of other checkpoints or caches in {ws / 'index'} stay" in err
    assert read_meta(second).checkpoint_sha256 == load_run(newer).checkpoint_sha256
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--run", ws / "runs" / "run-001")
    assert code == 0 and "building" not in err  # the earlier run's index is still there


def test_a_newer_run_trained_on_other_features_is_passed_for_the_latest_trained_on_the_caches_kind(ws, monkeypatch,
                                                                                                    capsys):
    # the latest run answered whatever it was trained on: one of another cache's kind (another detector) stopped every
    # search of the workspace's cache with "other region features" until --run was given
    from vlpcache.model.run_layout import CONFIG_NAME

    newer = retrained(ws)
    config = json.loads((newer / CONFIG_NAME).read_text())
    config["cache_settings"] = {**config["cache_settings"], "feature_dim": 2 * config["cache_settings"]["feature_dim"]}
    (newer / CONFIG_NAME).write_text(json.dumps(config))
    code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2", "--json")
    assert code == 0, err
    assert (f"note: {newer.name}, the latest run, was trained on other region features than the cache {ws / 'cache'} "
            "holds; run-001, the latest trained on features of its kind, answers (--run chooses)") in err.splitlines()
    assert read_meta(the_index(ws)).checkpoint_sha256 == load_run(ws / "runs" / "run-001").checkpoint_sha256
    code, listed, _ = vlpcache(monkeypatch, capsys, "inspect", "--runs")
    assert [line for line in listed.splitlines() if line.endswith("by default")][0].startswith("run-001 ")


def test_a_run_cache_and_index_from_a_newer_vlpcache_with_settings_unknown_here_still_load(ws, monkeypatch, capsys):
    # a later version writes settings this one does not know: they are dropped on reading, nothing is refused
    from vlpcache.cache.schema import MANIFEST_NAME
    from vlpcache.index.layout import META_FILE
    from vlpcache.model.run_layout import CONFIG_NAME

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    code, before, _ = vlpcache(monkeypatch, capsys, "search", "a dog", "--json")
    assert code == 0
    config = ws / "runs" / "run-001" / CONFIG_NAME
    stored = json.loads(config.read_text())
    config.write_text(json.dumps({**stored, "model": {**stored["model"], "a_later_setting": 1},
                                  "train": {**stored["train"], "a_later_setting": 2}}))
    for path in (ws / "cache" / MANIFEST_NAME, the_index(ws) / META_FILE):
        path.write_text(json.dumps({**json.loads(path.read_text()), "a_later_setting": [3]}))
    code, after, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--json")
    assert code == 0 and json.loads(after) == json.loads(before) and "building" not in err, err


def test_a_newest_run_without_an_index_another_user_may_not_write_is_passed_for_the_newest_indexed(ws, monkeypatch,
                                                                                                   capsys):
    # a lab member searching the owner's workspace: each new run of the owner's stopped their search at
    # "cannot write" until the owner indexed it; root writes anywhere, so the system's answer is planted
    from vlpcache.index import search

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    newer = retrained(ws)
    monkeypatch.setattr(search.os, "access", lambda path, mode: mode != os.W_OK)
    code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2")
    assert code == 0 and out and err.splitlines()[0] == (
        f"note: {newer.name}, the newest run, has no index over this cache and this user may not write one in "
        f"{ws / 'index'}: searching with run-001, the newest run indexed (`vlpcache index -o DIR` indexes "
        f"{newer.name} where you can write, then --index DIR)")
    assert not the_index(ws, newer).exists()  # nothing written


def test_items_cached_since_an_index_another_user_may_not_write_are_said_with_a_way_they_can_take(ws, monkeypatch,
                                                                                                  capsys):
    from vlpcache.index import search

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    write_cache(ws / "cache", 2, prefix="w", seed=5)  # the owner extracted more, and has not indexed them yet
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2")
    assert code == 0 and "note: 2 cached item(s) are not in the index yet; run `vlpcache index` to add them" in err
    monkeypatch.setattr(search.os, "access", lambda path, mode: mode != os.W_OK)  # a lab member, reading (root writes)
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2")
    assert code == 0 and "run `vlpcache index` to add them" not in err
    assert (f"note: 2 cached item(s) are not in the index yet; this user may not write {the_index(ws)}: its owner's "
            "`vlpcache index` adds them (or `vlpcache index -o DIR` indexes them where you can write, then --index DIR)") in err


def test_items_cached_and_extracted_again_since_the_index_are_one_note_counting_each(ws, monkeypatch, capsys):
    # two notes, each saying to run `vlpcache index`, the first counting the new items alone
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    write_cache(ws / "cache", 2, prefix="w", seed=5)  # new
    write_cache(ws / "cache", 3, prefix="v", seed=9)  # v0-v2 extracted again (their sources changed)
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2")
    assert code == 0
    assert [line for line in err.splitlines() if "vlpcache index" in line] == [
        "note: 2 cached item(s) are not in the index yet, and 3 indexed item(s) were extracted again since (their "
        "sources changed): found by their old content and shown without matched regions; run `vlpcache index` to add "
        "them and index those anew"]


def test_index_of_a_read_only_index_root_says_up_to_date_and_with_items_to_add_one_line(ws, monkeypatch, capsys,
                                                                                          read_only):
    # a shared, finished workspace: `vlpcache index` failed at the index's lock even where it had nothing to do
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    files = sorted((p.relative_to(ws / "index"), p.stat().st_mtime_ns) for p in (ws / "index").rglob("*"))
    read_only(ws / "index")
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and err.splitlines()[-1] == f"index {the_index(ws)}: up to date: {ITEMS} items (Flat)", err
    write_cache(ws / "cache", 2, prefix="w", seed=5)  # the owner extracted more, and has not indexed them yet
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet")
    reason = "Read-only file system (EROFS)" if os.geteuid() == 0 else "Permission denied (EACCES)"  # (read_only's ways)
    assert code == 2 and err == (f"error: index {the_index(ws)}: the index is read-only ({reason}) and has 2 cached "
                                 "item(s) to add; nothing was written; build the index where you can write (`vlpcache "
                                 "index -o DIR`, then search and serve take --index DIR), or ask its owner to run "
                                 "`vlpcache index`\n"), err
    assert sorted((p.relative_to(ws / "index"), p.stat().st_mtime_ns) for p in (ws / "index").rglob("*")) == files


def test_index_up_to_date_makes_no_model_and_with_items_to_add_makes_it(ws, monkeypatch, capsys):
    # `vlpcache index` with nothing to do built the run's text model (transformers' code and weights) only to say so:
    # 8 s of CPU, 40 s under load, where `search` takes 0.6 s
    from vlpcache.model import model

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    made = []
    monkeypatch.setattr(model, "load_text_backbone", lambda *a, _real=model.load_text_backbone, **k: made.append(1) or
                        _real(*a, **k))
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and err.splitlines()[-1] == f"index {the_index(ws)}: up to date: {ITEMS} items (Flat)", err
    assert made == []
    write_cache(ws / "cache", 2, prefix="w", seed=5)
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and f"index {the_index(ws)}: {ITEMS + 2} items; encoded 2 " in err, err
    assert made == [1]
    code, out, _ = vlpcache(monkeypatch, capsys, "search", "--json", "-k", str(ITEMS + 2), "a dog")
    assert code == 0 and len(json.loads(out)["results"]) == ITEMS + 2


def test_index_up_to_date_records_the_times_of_its_files_copied_without_them(ws, monkeypatch, capsys):
    # restored with cp -r: `vlpcache index` had nothing to write, and every load then read the index twice until a save
    from vlpcache.index.faiss_index import _not_as_recorded

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    shutil.copytree(ws / "index", ws / "index.copy", copy_function=shutil.copyfile)  # contents, not times
    shutil.rmtree(ws / "index")
    (ws / "index.copy").rename(ws / "index")
    assert _not_as_recorded(the_index(ws), read_meta(the_index(ws)))  # as copied
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and err.splitlines()[-1] == f"index {the_index(ws)}: up to date: {ITEMS} items (Flat)", err
    assert _not_as_recorded(the_index(ws), read_meta(the_index(ws))) == {}


def test_prune_removes_the_indexes_of_checkpoints_no_run_holds_and_keeps_the_rest(ws, tmp_path, monkeypatch, capsys):
    from vlpcache.locks import WriterLock

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    old = the_index(ws)
    outside = tmp_path / "elsewhere" / "run"  # a run kept outside the workspace: its index records it
    shutil.move(retrained(ws), outside)
    assert vlpcache(monkeypatch, capsys, "index", "--quiet", "--run", outside)[0] == 0
    kept = the_index(ws, outside)
    nudge_weights(ws / "runs" / "run-001", by=0.02)  # run-001 trained again: its old best checkpoint is gone
    (ws / "index" / ".pruned-0123").mkdir()  # what a prune killed halfway leaves
    (ws / "index" / ".pruned-0123" / "embeddings.npy").write_bytes(b"x" * 100)
    new = the_index(ws)
    stopped = {name: ws / "index" / name / "encoding" for name in  # first builds stopped: kept parts, no index.json
               ("0123456789abcdef-00000000", new.name.split("-")[0] + "-00000000")}  # no run holds the first
    for parts in stopped.values():
        parts.mkdir(parents=True)
        (parts / "part-000000.npz").write_bytes(b"x" * 100)

    code, _, err = vlpcache(monkeypatch, capsys, "index", "--prune")
    assert code == 0 and new != old and "prune: removed 2 index(es) of checkpoints no run holds any more" in err
    assert old.name in err.splitlines()[-1] and "0123456789abcdef-00000000" in err.splitlines()[-1] and not old.exists()
    held = new.name.split("-")[0] + "-00000000"
    assert sorted(p.name for p in (ws / "index").iterdir()) == sorted([new.name, kept.name, held])
    shutil.rmtree(ws / "index" / held)
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--run", outside)
    assert code == 0 and "building" not in err  # the outside run's index stayed

    shutil.rmtree(outside)  # now nothing holds its checkpoint, but another process is writing that index
    with WriterLock.take(kept / "index.lock"):
        code, _, err = vlpcache(monkeypatch, capsys, "index", "--prune")
        assert code == 0 and f"prune: {kept} is being written by another process; left as it is" in err and kept.exists()
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--prune")
    assert code == 0 and "removed 1 index(es)" in err and [p.name for p in (ws / "index").iterdir()] == [new.name]
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--prune")
    assert code == 0 and "prune: nothing to remove" in err and new.exists()


def test_prune_removes_an_index_folder_left_without_its_index_and_no_folder_that_is_not_an_indexs(ws, monkeypatch,
                                                                                                    capsys):
    """A `serve` of an index `index --prune` removed made its thumbnails' folder again there: an index folder without
    index.json, which prunes then passed over for good. Such folders go where no run holds their checkpoint."""
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    root, served = ws / "index", the_index(ws)
    left = root / "0123456789abcdef-00000000-11111111"  # what the serve left: thumbnails only
    (left / "thumbnails" / "ab").mkdir(parents=True)
    (left / "thumbnails" / "ab" / "ab12.jpg").write_bytes(b"x" * 100)
    held = root / (served.name.split("-")[0] + "-00000000-11111111")  # run-001's checkpoint: its index may come back
    (held / "thumbnails").mkdir(parents=True)
    users = root / "fedcba9876543210-00000000-11111111"  # named like one, holding a file no index has
    (users / "thumbnails").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    (root / "photos" / "thumbnails").mkdir(parents=True)  # not named as an index
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--prune")
    assert code == 0 and "prune: removed 1 index(es) of checkpoints no run holds any more" in err and left.name in err
    assert sorted(p.name for p in root.iterdir()) == sorted([served.name, held.name, users.name, "photos"])
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--prune")
    assert code == 0 and "prune: nothing to remove" in err


def test_an_index_whose_record_names_another_checkpoint_is_refused_in_one_line(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    meta_path = the_index(ws) / "index.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "checkpoint_sha256": "f" * 64}))
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 2 and "checkpoint ffffffffffff, not" in err and "--rebuild" in err
    assert err.splitlines()[-1].startswith("error: ")
    assert vlpcache(monkeypatch, capsys, "index", "--rebuild", "--quiet")[0] == 0
    assert read_meta(the_index(ws)).checkpoint_sha256 == load_run(ws / "runs" / "run-001").checkpoint_sha256


def test_an_index_kept_in_the_root_itself_is_used_when_it_matches(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    root = ws / "old-layout"
    shutil.copytree(the_index(ws), root)  # as vlpcache 0.1 left it: the files in the folder itself
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--index", root)
    assert code == 0 and "building" not in err and not [p for p in root.iterdir() if p.is_dir() and p.name != "query"]
    # written before a cache setting existed (`attributes`, 2026-12-02): its default there, not another cache
    meta = json.loads((root / "index.json").read_text())
    del meta["cache_settings"]["attributes"]
    (root / "index.json").write_text(json.dumps(meta))
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--index", root)
    assert code == 0 and "building" not in err, err


def test_an_index_folder_of_another_checkpoint_given_as_the_index_root_is_refused_not_built_into(ws, monkeypatch, capsys):
    """`--index` given one of the folders the tool printed, `index .../8dfd...: 5 items`, of another run:
    one line naming the folder that holds it, rather than a new index built inside that index."""
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    other = ws / "elsewhere" / the_index(ws).name
    shutil.copytree(the_index(ws), other)
    meta = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps({**meta, "checkpoint_sha256": "f" * 64}))
    for command in (("search", "a dog", "--index", other), ("index", "-o", other)):
        code, _, err = vlpcache(monkeypatch, capsys, *command)
        assert code == 2 and err.strip().splitlines()[-1].startswith(
            f"error: {other} is the index of another checkpoint or cache (checkpoint ffffffffffff, not "), err
        assert f"pass the folder that holds it, {other.parent}, " in err
        assert sorted(p.name for p in other.iterdir() if p.is_dir()) == sorted(
            p.name for p in the_index(ws).iterdir() if p.is_dir())  # nothing built inside it


def test_a_searcher_takes_up_the_videos_that_index_adds_while_it_is_open(ws, monkeypatch, capsys):
    """A server started before `vlpcache index` added new videos finds them at its next search, without
    a restart (they were never shown, and the page kept counting the old number)."""
    from vlpcache.index.search import Searcher

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    searcher = Searcher()
    before = len(searcher)
    assert searcher.refresh() is False  # nothing new: nothing loaded again
    write_cache(ws / "cache", 3, prefix="w", seed=5)  # extracted meanwhile
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    hits = searcher.search("a dog", k=before + 3, rerank=False)
    assert len(searcher) == before + 3 and {"w0", "w1", "w2"} <= {hit.id for hit in hits}
    assert searcher.item("w1")["id"] == "w1"


def test_a_searcher_takes_up_a_calibration_written_after_the_index_it_took_up(ws, monkeypatch, capsys):
    """`vlpcache index` replaces index.json, then writes calibration.json: a server asked in between took up the new
    index and kept the old weak-match threshold until the next index change, marking queries weak otherwise than
    `vlpcache search` did."""
    from vlpcache.index.search import Searcher
    from vlpcache.records import write_json

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    searcher = Searcher(say=lambda line: None)
    path = the_index(ws) / "calibration.json"
    calibration = json.loads(path.read_text())
    assert searcher.weak_below == calibration["weak_below"]
    write_json(path, {**calibration, "weak_below": 2.0})  # what index writes after index.json: every match weak
    assert searcher.weak(searcher.search("a dog on the grass", k=3)) is True and searcher.weak_below == 2.0
    path.unlink()  # no training caption reads any more: no calibration, no match said weak
    assert searcher.weak(searcher.search("a dog on the grass", k=3)) is False and searcher.weak_below is None


def test_an_index_stopped_midway_resumes_and_encodes_only_what_no_kept_part_holds(ws, monkeypatch, capsys):
    import vlpcache.index.build as build
    import vlpcache.model.retrieval as retrieval
    from vlpcache import report

    monkeypatch.setattr(build, "ENCODE_CHUNK", 10)  # the 24 videos in chunks of 10, 10 and 4
    monkeypatch.setattr(report, "LOGGED_BAR_S", 0)  # a bar not on a terminal writes a line a redraw (not one in 30 s)
    encode, calls, stop = retrieval.encode_videos, [], [True]

    def stopped_at_the_second_chunk(model, cache, rows, *args, **kwargs):
        calls.append(len(rows))
        if len(calls) == 2 and stop[0]:
            raise KeyboardInterrupt  # Ctrl-C while the second chunk is encoded
        return encode(model, cache, rows, *args, **kwargs)

    monkeypatch.setattr(retrieval, "encode_videos", stopped_at_the_second_chunk)
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet")
    index_dir = the_index(ws)
    assert code == 130 and "interrupted" in err
    assert not (index_dir / "index.json").exists() and len(list((index_dir / "encoding").glob("part-*.npz"))) == 1
    (index_dir / "encoding" / ".part-000001.npz.99.tmp.npz").write_bytes(b"PK")  # what a kill -9 mid-write leaves
    (index_dir / "encoding" / "part-000007.npz").write_bytes(b"not a zip")  # unreadable: its videos are encoded again

    calls.clear()
    stop[0] = False
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0, err
    assert "resuming: 10 of the 24 videos to index were encoded by a run that did not finish" in err
    assert "encoded 24 videos in " in err and "; 10 of them kept from the run that did not finish; built Flat" in err
    assert calls == [10, 4] and not (index_dir / "encoding").exists()
    # one bar over the chunks, begun at what was kept (not one bar each, "encoding videos 11-20 of 24")
    assert "encoding videos:  42%" in err and "| 10/24 [" in err and "of 24" not in err
    resumed = VideoIndex.load(index_dir)

    monkeypatch.setattr(retrieval, "encode_videos", encode)
    assert vlpcache(monkeypatch, capsys, "index", "-o", ws / "whole", "--quiet")[0] == 0
    whole = VideoIndex.load(the_index(ws, root=ws / "whole"))
    assert sorted(resumed.ids) == sorted(whole.ids) and len(set(resumed.ids)) == ITEMS  # nothing missing or twice
    order = [resumed.ids.index(i) for i in whole.ids]
    np.testing.assert_allclose(resumed.embeddings[order], whole.embeddings, atol=1e-6)
    for ours, theirs in zip(resumed.regions.gather(order), whole.regions.gather(list(range(ITEMS)))):
        np.testing.assert_array_equal(ours, theirs)


def test_indexing_again_encodes_only_the_new_videos(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index")[0] == 0
    before = VideoIndex.load(the_index(ws))
    write_cache(ws / "cache", 3, prefix="w", seed=5)  # a second writer's shard: w0, w1, w2
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    after = VideoIndex.load(the_index(ws))
    assert code == 0 and "encoded 3 videos" in err and "3 new items" in err
    assert after.ids == before.ids + ["w0", "w1", "w2"]
    assert np.array_equal(after.embeddings[:ITEMS], before.embeddings)
    # every row's stored regions, old and new, are the real regions of its own item in grid order
    from vlpcache.cache.reader import RegionCache
    from vlpcache.model.batch import video_batch

    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([cache.get(i) for i in after.ids]))
    for row, item_id in enumerate(after.ids):
        regions, mask, positions = after.regions.gather([row])
        real = video.region_mask[row].numpy()
        assert mask[0].sum() == real.sum() and positions[0][mask[0]].tolist() == np.flatnonzero(real).tolist(), item_id
        np.testing.assert_allclose(regions[0][mask[0]], video.regions[row][real].numpy(), atol=2e-3, err_msg=item_id)


def test_a_cache_with_other_settings_gets_an_index_of_its_own(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    write_cache(ws / "other", 4, frames=3)
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--cache", ws / "other")
    assert code == 0 and "building it in" in err
    indexes = sorted(p.parent for p in (ws / "index").glob("*/index.json"))
    assert len(indexes) == 2 and the_index(ws) in indexes
    assert sorted(len(VideoIndex.load(p)) for p in indexes) == [4, ITEMS]


def test_a_second_cache_of_the_same_settings_gets_an_index_of_its_own_and_a_move_keeps_it(ws, tmp_path, monkeypatch,
                                                                                             capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    mine = write_cache(ws / "mine", 4, prefix="mine")  # the same settings: one's own videos after training on a dataset
    [result] = search_json(monkeypatch, capsys, "a dog", "--cache", ws / "mine", "-k", "10")
    assert sorted(hit["id"] for hit in result["results"]) == sorted(mine)
    indexes = sorted(p.parent for p in (ws / "index").glob("*/index.json"))
    assert len(indexes) == 2 and sorted(len(VideoIndex.load(p)) for p in indexes) == [4, ITEMS]
    assert len(search_json(monkeypatch, capsys, "a dog", "-k", "30")[0]["results"]) == ITEMS  # the first one's as it was
    shutil.move(ws / "cache", tmp_path / "moved")  # a move is the same collection, whose index serves it
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--cache", tmp_path / "moved")
    assert code == 0 and "building" not in err and len(list((ws / "index").glob("*/index.json"))) == 2


def test_a_copy_of_a_cache_whose_original_is_still_there_gets_an_index_of_its_own_as_they_grow_apart(ws, tmp_path,
                                                                                                   monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    original, copy = ws / "cache", tmp_path / "copy"
    before = VideoIndex.load(the_index(ws))
    v0 = before.embeddings[before.row_of("v0")].copy()
    shutil.copytree(original, copy)  # `cp -r`: the same collection id, then each is extracted into differently
    write_cache(copy, 1, seed=7)  # v0 extracted again in the copy, from other content
    write_cache(original, 2, prefix="w", seed=3)  # the original grows
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--cache", copy)
    assert code == 0 and "building it in" in err
    assert vlpcache(monkeypatch, capsys, "index")[0] == 0
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "up to date" in err
    ours, theirs = VideoIndex.load(the_index(ws)), VideoIndex.load(the_index(ws, cache=copy))
    assert the_index(ws) != the_index(ws, cache=copy) and len(list((ws / "index").glob("*/index.json"))) == 2
    assert sorted(ours.ids) == sorted(RegionCache(original).ids) and sorted(theirs.ids) == sorted(RegionCache(copy).ids)
    assert np.allclose(ours.embeddings[ours.row_of("v0")], v0)  # the original's own content, not the copy's
    assert not np.allclose(theirs.embeddings[theirs.row_of("v0")], v0)
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", "30")
    assert sorted(hit["id"] for hit in result["results"]) == sorted(ours.ids)  # none "removed from the cache"
    assert not [hit for hit in result["results"] if "extracted again" in hit["outdated"]]


def test_a_project_copied_whole_keeps_its_index_while_the_original_keeps_its_own(ws, tmp_path, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    project = tmp_path / "project"
    shutil.copytree(ws, project)  # cache, runs and index together: the index was copied with its cache
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(project))
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog")
    assert code == 0 and "building" not in err
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "up to date" in err and len(list((project / "index").glob("*/index.json"))) == 1
    assert read_meta(the_index(ws, root=project / "index", cache=project / "cache")).cache_dir == str(
        (project / "cache").resolve())  # recorded: a copy of the copy's cache is now told apart
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(ws))
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "up to date" in err


def test_a_hit_whose_source_was_replaced_by_a_file_that_failed_to_extract_is_outdated_with_the_reason(ws, tmp_path,
                                                                                                      monkeypatch, capsys):
    from vlpcache import Searcher
    from vlpcache.extract.stamps import source_stamp
    from vlpcache.index.search import FAILED_AGAIN_HIT

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"old" * 1000)
    write_cache(ws / "cache", 1, prefix="x", sources=[(clip, "video")])  # x0, a dog, cached from clip
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    searcher = Searcher(say=lambda line: None)

    def x0() -> dict:
        return next(dataclasses.asdict(hit) for hit in searcher.search("a dog", k=30) if hit.id == "x0")

    assert x0()["outdated"] == "" and x0()["regions"]
    clip.write_bytes(b"cut short" * 10)  # replaced by a download cut short: extract redoes it, and it fails
    with ShardWriter(ws / "cache", RegionCache(ws / "cache").settings) as writer:  # what that extract records
        writer.record_failure("x0", str(clip), "cannot open video: invalid data", source=source_stamp(clip))
    hit = x0()  # a Searcher already open (serve's) takes the failure up
    assert hit["outdated"].startswith(FAILED_AGAIN_HIT) and "invalid data" in hit["outdated"] and hit["regions"]
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", "30")
    assert [h["outdated"] for h in result["results"] if h["id"] == "x0"] == [hit["outdated"]]
    code, out, _ = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "30")
    assert code == 0 and FAILED_AGAIN_HIT in out
    clip.write_bytes(b"old" * 1000)  # the old file back: the next extract clears the failure
    with ShardWriter(ws / "cache", RegionCache(ws / "cache").settings) as writer:
        writer.clear_failure("x0", str(clip))
    assert x0()["outdated"] == ""


def test_like_of_an_item_whose_source_failed_again_says_so_and_index_does_not_call_it_up_to_date(ws, tmp_path,
                                                                                                  monkeypatch, capsys):
    # search hits of such an item were marked outdated with the failure's reason, but `--like x0` said nothing of it
    # (its old content answers) and `vlpcache index` said "up to date"
    from vlpcache.extract.stamps import source_stamp
    from vlpcache.index.search import FAILED_AGAIN_HIT

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"old" * 1000)
    write_cache(ws / "cache", 1, prefix="x", sources=[(clip, "video")])
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    clip.write_bytes(b"cut short" * 10)  # replaced by a download cut short: extract redoes it, and it fails
    with ShardWriter(ws / "cache", RegionCache(ws / "cache").settings) as writer:
        writer.record_failure("x0", str(clip), "cannot open video: invalid data", source=source_stamp(clip))
    said = f"x0: {FAILED_AGAIN_HIT} (cannot open video: invalid data): these are the items most like its old content"
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", "x0", "-k", "3")
    assert code == 0 and f"note: {said}" in err and out.startswith("like: x0")
    [liked] = search_json(monkeypatch, capsys, "--like", "x0", "-k", "3")
    assert liked["note"].startswith(said) and "--prune" in liked["note"]
    assert "note" not in search_json(monkeypatch, capsys, "--like", "v1", "-k", "3")[0]
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "up to date" not in err
    assert "1 of its item(s) changed at their source and the new file did not extract (x0: cannot open video" in err


def test_indexed_embeddings_equal_the_models_own_encoding(ws, monkeypatch, capsys):
    from vlpcache.cache.reader import RegionCache
    from vlpcache.model.batch import video_batch

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    index = VideoIndex.load(the_index(ws))
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    with torch.inference_mode():
        direct = run.model.encode_video(**video_batch([cache.get(i) for i in index.ids[:5]])).global_
    assert np.allclose(index.embeddings[:5], direct.numpy(), atol=1e-5)


def test_factory_string_needs_rebuild_to_change_an_existing_index(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--factory", "HNSW16,Flat")
    assert code == 2 and "--rebuild" in err
    assert vlpcache(monkeypatch, capsys, "index", "--factory", "HNSW16,Flat", "--rebuild", "--quiet")[0] == 0
    assert read_meta(the_index(ws)).factory == "HNSW16,Flat"
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", "3")
    assert len(result["results"]) == 3
    write_cache(ws / "cache", ITEMS, prefix="v", seed=9)  # every item extracted again: the index is made anew
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and f"{ITEMS} indexed item(s) were extracted again" in err, err
    assert read_meta(the_index(ws)).factory == "HNSW16,Flat"  # the one given, not one chosen for the count


def test_wordpiece_continuations_join_the_word_before():
    tokens = ["[CLS]", "person", "cuts", "on", "##ion", "[SEP]", "[PAD]"]
    mask = np.array([False, True, True, True, True, False, False])
    assert query_words(tokens, mask) == [("person", [1]), ("cuts", [2]), ("onion", [3, 4])]


def test_best_frame_is_where_the_matched_words_find_their_regions_not_the_function_words():
    from vlpcache.index.rerank import align

    tokens = ["[CLS]", "a", "dog", "on", "the", "grass", "[SEP]"]
    mask = np.array([False, True, True, True, True, True, False])
    positions = np.array([0, 1, 4, 5, 6, 7])  # N = 4: two regions on frame 0, four on frame 1
    attention = np.zeros((7, 6))
    attention[[1, 3, 4]] = [0.05, 0.05, 0.225, 0.225, 0.225, 0.225]  # function words: spread, mostly frame 1
    attention[[2, 5]] = [0.6, 0.1, 0.1, 0.1, 0.05, 0.05]  # "dog", "grass": frame 0
    alignment = align(attention, mask, tokens, positions, 4)
    assert [(m.word, m.frame) for m in alignment.words] == [("dog", 0), ("grass", 0)]
    assert alignment.best_frame == 0
    # one word: the frame of its region, not the frame of most attention in all (there: 3 weak regions)
    positions = np.array([0, 1, 2, 4, -1])  # three regions on frame 0, one on frame 1, padding
    attention = np.zeros((3, 5))
    attention[1] = [0.2, 0.2, 0.2, 0.4, 0.0]
    alignment = align(attention, np.array([False, True, False]), ["[CLS]", "cup", "[SEP]"], positions, 4)
    assert [(m.word, m.frame) for m in alignment.words] == [("cup", 1)] and alignment.best_frame == 1
    # two words whose best regions are on frames 0 and 2, each nearly as strong on frame 1: the frame shown
    # holds a matched region (frame 1 would have the most attention summed, and no box of theirs)
    attention = np.zeros((4, 3))
    attention[1], attention[2] = [0.5, 0.45, 0.05], [0.1, 0.45, 0.45 + 0.001]
    alignment = align(attention, np.array([False, True, True, False]), ["[CLS]", "man", "guitar", "[SEP]"],
                      np.array([0, 4, 8]), 4)  # N = 4: one region on each of frames 0, 1, 2
    assert [(m.word, m.frame) for m in alignment.words] == [("man", 0), ("guitar", 2)] and alignment.best_frame == 0
    # between frames that hold as many matched regions, each word's best region there counts, not all its
    # attention: frame 0's four regions hold more of it in all, frame 2's one region is stronger for both words
    attention = np.zeros((4, 5))
    attention[1], attention[2] = [0.4, 0.15, 0.15, 0.15, 0.15], [0.1, 0.1, 0.1, 0.1, 0.6]
    alignment = align(attention, np.array([False, True, True, False]), ["[CLS]", "man", "guitar", "[SEP]"],
                      np.array([0, 1, 2, 3, 8]), 4)  # N = 4: four regions on frame 0, one on frame 2
    assert [(m.word, m.frame) for m in alignment.words] == [("man", 0), ("guitar", 2)] and alignment.best_frame == 2
    # punctuation is a token the model reads, but names no region: "dog's ball, red-car"
    tokens = ["[CLS]", "dog", "'", "s", "ball", ",", "red", "-", "car", "[SEP]"]
    mask = np.array([False] + [True] * 8 + [False])
    alignment = align(np.full((10, 5), 0.2), mask, tokens, positions, 4)
    assert [m.word for m in alignment.words] == ["dog", "s", "ball", "red", "car"]


def test_index_leaves_an_onnx_query_model_that_matches_the_torch_one(ws, monkeypatch, capsys):
    from vlpcache.index.query_graphs import TorchQueryModel
    from vlpcache.index.query_model import OnnxQueryModel

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    onnx, torch_model = OnnxQueryModel(the_index(ws)), TorchQueryModel(load_run(ws / "runs" / "run-001"))
    long_query = " ".join(["a dog runs on the beach with a ball"] * 10)  # beyond max_words: truncated alike
    for query in ["a dog", "the woman in the kitchen cuts an onion", long_query]:
        a, b = onnx.encode(query), torch_model.encode(query)
        assert a[3] == b[3] and np.array_equal(a[2], b[2])  # tokens, word mask
        assert np.allclose(a[0], b[0], atol=1e-4) and np.allclose(a[1], b[1], atol=1e-4)
    # both say alike what of a query they leave unread: past 30 words and [CLS], [SEP] (max_words 32)
    words = long_query.split()
    for query, unread in [("a dog", ""), (" ".join(words[:30]), ""), (" ".join(words[:31]), words[30]),
                          (long_query, " ".join(words[30:]))]:
        assert onnx.unread(query) == torch_model.unread(query) == unread
    # and what of it they do not know: each part read as [UNK], once, and how many tokens they know
    # or as letters: an English vocabulary spells out another script ("человек": ч ##е ##л ##ов ##е ##к)
    for query, unknown in [("a dog", ([], 2)), ("猫", (["猫"], 0)), ("a dog 🐶 and 猫 猫!", (["🐶", "猫"], 4)),
                           ("человек играет", (["человек", "играет"], 0)), ("a man مطبخ cooks", (["مطبخ"], 3)),
                           ("gravy with prawns", ([], 7))]:  # English words split in short pieces: gr ##av ##y
        assert onnx.unknown(query) == torch_model.unknown(query) == unknown
    index = VideoIndex.load(the_index(ws))
    regions, mask, _ = index.regions.gather([0, 3, 7])
    text_global, words, word_mask, _ = torch_model.encode("a horse on the street")
    inputs = (words, word_mask, text_global, regions, mask, index.embeddings[[0, 3, 7]])
    for x, y in zip(onnx.rescore(*inputs), torch_model.rescore(*inputs)):
        assert np.allclose(x, y, atol=1e-4)


def test_an_export_that_embeds_other_lengths_otherwise_than_the_model_is_dropped_and_search_uses_torch(
        ws, monkeypatch, capsys):
    """A text model whose forward turns the traced query length into a constant: the graph matches the
    model on the traced query only. The index says so in one line and keeps no export."""
    from vlpcache.index import query_graphs
    from vlpcache.index.query_model import QUERY_DIR

    class LengthBakedIn(query_graphs.TextGraph):
        def forward(self, input_ids, attention_mask):
            global_, words = super().forward(input_ids, attention_mask)
            return global_ + 0.01 * input_ids.shape[1], words  # a Python number when traced

    monkeypatch.setattr(query_graphs, "TextGraph", LengthBakedIn)
    code, out, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0
    assert "note: no ONNX export of the query model (ValueError: the exported text graph embeds 'dog' otherwise" in out + err
    assert not (the_index(ws) / QUERY_DIR).exists() and not list(the_index(ws).glob(f".{QUERY_DIR}*"))
    monkeypatch.setattr(query_graphs, "TextGraph", LengthBakedIn.__mro__[1])
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", "2")  # through torch
    assert len(result["results"]) == 2

def test_a_query_export_this_onnxruntime_cannot_read_is_a_note_naming_the_index_not_its_temporary_folder(
        ws, monkeypatch, capsys):
    # the self-check's note named the export's temporary folder (.../.query.tmp/text_encoder.onnx), gone as it was read
    from test_weights import stamped_newer
    from vlpcache.index.query_model import QUERY_DIR

    export = torch.onnx.export

    def export_stamped_newer(model, args, path, **options):  # as a newer torch's export, read by an older onnxruntime
        export(model, args, path, **options)
        Path(path).write_bytes(stamped_newer(Path(path).read_bytes(), "ir_version"))

    monkeypatch.setattr(torch.onnx, "export", export_stamped_newer)
    code, out, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "Traceback" not in err
    [note] = [line for line in (out + err).splitlines() if "no ONNX export" in line]
    assert f".{QUERY_DIR}.tmp" not in note and str(the_index(ws)) in note, note
    assert "ONNX IR version " in note and note.endswith("; search will load it with torch"), note
    assert not (the_index(ws) / QUERY_DIR).exists() and not list(the_index(ws).glob(f".{QUERY_DIR}*"))


def test_a_full_disk_while_exporting_the_query_model_is_an_error_and_the_next_index_run_writes_it(
        ws, monkeypatch, capsys):
    """The index itself is kept; the query model, without which search starts several times slower, is
    a one-line error (exit 2, even with --quiet), not a note; the same command again writes it."""
    import errno

    from vlpcache.index import query_graphs
    from vlpcache.index.query_model import QUERY_DIR

    export = query_graphs.export_query_model

    def disk_full(run, index_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(index_dir / QUERY_DIR / "text.onnx"))

    monkeypatch.setattr(query_graphs, "export_query_model", disk_full)
    code, out, err = vlpcache(monkeypatch, capsys, "index", "--rebuild", "--quiet")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: {the_index(ws)}: cannot write (No space left on device (ENOSPC)); the index is kept, without its query "
        "model (ONNX), which makes search start several times slower; make room and run the same command again to "
        "write it"]
    assert (the_index(ws) / "index.json").exists() and not (the_index(ws) / QUERY_DIR).exists()
    monkeypatch.setattr(query_graphs, "export_query_model", export)
    code, out, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and (the_index(ws) / QUERY_DIR).is_dir()


def test_search_with_an_exported_index_never_imports_torch(ws, monkeypatch, capsys):
    import subprocess

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    probe = ("import sys; from vlpcache.cli import main; sys.argv = ['vlpcache', 'search', 'a dog', '-k', '2']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"
    assert "query: a dog" in result.stdout



# ---------------------------------------------------------------- the Python API


def test_searcher_from_the_package_gives_typed_hits_equal_to_the_cli_json(ws, monkeypatch, capsys):
    from vlpcache import Hit, RegionHit, Searcher

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0  # both then run the ONNX export
    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache")
    hits = searcher.search("person cuts onion", k=4)
    assert isinstance(hits, list) and len(hits) == 4 and all(isinstance(h, Hit) for h in hits)
    assert all(isinstance(r, RegionHit) for h in hits for r in h.regions)
    first = hits[0]
    assert first.rank == 1 and first.path == f"{first.id}.mp4" and first.time in (0.0, 1.0)
    assert first.frame in (0, 1) and all(r.time == float(r.frame) for r in first.regions)  # frames stamped 0 s, 1 s
    [result] = search_json(monkeypatch, capsys, "person cuts onion", "-k", "4")
    assert result["results"] == json.loads(json.dumps([dataclasses.asdict(h) for h in hits]))


def test_searcher_builds_its_index_where_it_is_told(ws, tmp_path):
    from vlpcache import Searcher

    lines = []
    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache", index=tmp_path / "elsewhere", say=lines.append)
    assert read_meta(the_index(ws, root=tmp_path / "elsewhere")).count == ITEMS == len(searcher)
    assert any("building it" in line for line in lines)
    assert not (ws / "index").exists()


def test_searcher_refuses_an_empty_query_and_k_below_one(ws):
    from vlpcache import Searcher

    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache")
    with pytest.raises(UserError, match="empty query"):
        searcher.search("  ")
    with pytest.raises(UserError, match=r'"\\u200b" holds no words the text model reads'):  # what it drops: nothing
        searcher.search("\u200b")
    with pytest.raises(UserError, match=r"not UTF-8 text \(half of a UTF-16 pair: half an emoji"):
        searcher.search("a dog \ud83d")  # json.loads('"\\ud83d"') gives that
    with pytest.raises(UserError, match="at least one"):
        searcher.search("a dog", k=0)


def test_searchers_made_at_once_in_threads_of_a_new_process_build_one_index_and_all_answer(ws, tmp_path):
    """Each thread's Searcher loads the run's text model (its index is new) as the first import of transformers in the
    process: its lazy module failed the imports of two threads at once ("cannot import name 'AutoConfig'"). The index
    lock leaves one index."""
    import subprocess

    probe = ("import json, threading\nfrom vlpcache import Searcher\nout = {}\n"
             "def build(n):\n    try:\n"
             f"        searcher = Searcher(index={str(tmp_path / 'indexes')!r}, say=lambda line: None)\n"
             "        out[n] = [h.id for h in searcher.search('a dog', k=2)]\n"
             "    except Exception as err:\n        out[n] = f'{type(err).__name__}: {err}'\n"
             "threads = [threading.Thread(target=build, args=(n,)) for n in range(3)]\n"
             "[t.start() for t in threads]\n[t.join() for t in threads]\nprint(json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.splitlines()[-1])
    assert len(answers) == 3 and all(isinstance(ids, list) and len(ids) == 2 for ids in answers.values()), answers
    assert len({tuple(ids) for ids in answers.values()}) == 1
    assert [p.parent for p in (tmp_path / "indexes").rglob("index.json")] == [the_index(ws, root=tmp_path / "indexes")]
    assert read_meta(the_index(ws, root=tmp_path / "indexes")).count == ITEMS


@pytest.mark.parametrize("first", ["torch", "vlpcache"])
def test_torch_imported_before_vlpcache_encodes_with_a_core_left_while_its_threads_spin(ws, tmp_path, first):
    """OMP_WAIT_POLICY=PASSIVE, which vlpcache sets as FAISS loads, is read by torch's OpenMP only as torch loads: after
    a notebook's `import torch` its threads spin while idle, and an index's calibration took 100 s instead of 7.5 s on
    2 busy cores. Then the encoding (videos, captions, queries) runs with one core left; after vlpcache, as set."""
    import subprocess

    probe = ("import json, sys\n"
             + ("import torch\n" if first == "torch" else "from vlpcache.index import faiss_index\nimport torch\n")
             + "from vlpcache.devices import usable_cores\nthreads = usable_cores() + 1\ntorch.set_num_threads(threads)\n"
             "import vlpcache.model.retrieval as retrieval, vlpcache.index.query_graphs as graphs\n"
             "from vlpcache import Searcher\nseen = {}\n"
             "def watched(name, encode):\n"
             "    def encoding(*args, **kwargs):\n"
             "        seen.setdefault(name, set()).add(torch.get_num_threads())\n"
             "        return encode(*args, **kwargs)\n"
             "    return encoding\n"
             "retrieval.encode_texts = watched('captions', retrieval.encode_texts)\n"
             "retrieval.encode_videos = watched('videos', retrieval.encode_videos)\n"
             "graphs.TextGraph.forward = watched('query', graphs.TextGraph.forward)\n"
             f"Searcher(index={str(tmp_path / 'indexes')!r}, say=lambda line: None).search('a dog', k=2)\n"
             "print(json.dumps({'seen': {k: sorted(v) for k, v in seen.items()}, 'after': torch.get_num_threads(), "
             "'threads': threads, 'cores': usable_cores()}))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    encoding = max(1, got["cores"] - 1) if first == "torch" else got["threads"]
    assert got["seen"] == {"captions": [encoding], "videos": [encoding], "query": [encoding]}, got
    assert got["after"] == got["threads"]  # as the user set it, once the encoding is done
def test_bad_input_to_the_api_is_one_user_error_line_and_say_none_is_stderr(ws, tmp_path, capsys):
    # unread(None), unknown(None) and like_file(s, None) were TypeErrors, like_item of an id its cache does not
    # hold a bare KeyError, a missing file "names no item of the index", and say=None a TypeError at the first line
    import vlpcache
    from vlpcache import Searcher

    searcher = Searcher(run=ws / "runs" / "run-001", cache=ws / "cache", index=tmp_path / "index", say=None)
    assert "building it" in capsys.readouterr().err
    for call in (searcher.unread, searcher.unknown, lambda query: searcher.search(query)):
        with pytest.raises(UserError, match=r"^a query is text \(str\), not NoneType$"):
            call(None)
    with pytest.raises(UserError, match=r"^like_file takes the path of a video, photo or frames folder \(str or "
                                        r"Path\), not NoneType$"):
        vlpcache.like_file(searcher, None)
    for path in (tmp_path / "nope.mp4", "nope"):  # a file of no folder or extension too: like_file takes files
        with pytest.raises(UserError, match=f"^{re.escape(str(path))}: no such file or folder, and "):
            vlpcache.like_file(searcher, path)
    with pytest.raises(UserError, match=f'^"nope" is not an item of the cache {re.escape(str(ws / "cache"))}$'):
        searcher.like_item(RegionCache(ws / "cache"), "nope")


def test_exported_npy_and_ids_are_the_index_embeddings_in_order(ws, tmp_path):
    from vlpcache import Searcher

    searcher = Searcher(cache=ws / "cache")
    out = tmp_path / "out"
    out.mkdir()
    files = searcher.export(out / "videos.npy")
    assert files == [out / "videos.npy", out / "videos.ids.json"]
    index = VideoIndex.load(the_index(ws))
    assert np.array_equal(np.load(files[0]), index.embeddings)
    assert json.loads(files[1].read_text()) == index.ids
    assert sorted(p.name for p in out.iterdir()) == ["videos.ids.json", "videos.npy"]  # no temporaries left


def test_the_readmes_python_example_runs_as_written_in_a_workspace(template, tmp_path, monkeypatch, capsys):
    # the README's one Python block, run as it is printed there, from a folder whose workspace is .vlpcache
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [example] = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    shutil.copytree(template, tmp_path / ".vlpcache")
    monkeypatch.delenv("VLPCACHE_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    hits = [line for line in lines if not line.startswith("    ")]
    assert len(hits) == 10 and [int(line.split()[0]) for line in hits] == list(range(1, 11))
    assert any(line.startswith("    ") and " -> " in line for line in lines)  # a matched region under a hit
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "videos.parquet").num_rows == ITEMS


def test_exported_parquet_holds_id_path_and_embedding(ws, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq  # of the test extra (and the parquet one)
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--export", tmp_path / "videos.parquet")
    assert code == 0 and f"exported {ITEMS} embeddings" in err
    table = pq.read_table(tmp_path / "videos.parquet").to_pydict()
    index = VideoIndex.load(the_index(ws))
    assert table["id"] == index.ids and table["path"] == [f"{i}.mp4" for i in index.ids]
    assert np.allclose(np.array(table["embedding"], np.float32), index.embeddings)
    damage_chunk(sorted((ws / "cache" / "shards").glob("*.h5"))[0], "boxes", 3)
    from vlpcache.index.search import Searcher

    Searcher().search("a dog", ITEMS)  # a reader finds v3's row damaged, and records it
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--export", tmp_path / "again.parquet")
    again = pq.read_table(tmp_path / "again.parquet").to_pydict()  # v3's path was "": its embedding is of its file
    assert code == 0 and again["id"] == index.ids and again["path"] == [f"{i}.mp4" for i in index.ids], err


def test_export_to_another_file_type_is_one_line_error_before_any_video_is_encoded(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vlpcache.model.retrieval.encode_videos", lambda *a, **k: pytest.fail("videos were encoded"))
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet", "--export", tmp_path / "videos.csv")
    assert code == 2 and err.startswith("error: ") and ".npy" in err and ".parquet" in err and err.count("\n") == 1
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet", "--export", tmp_path / "no folder" / "videos.npy")
    assert code == 2 and err == f"error: {tmp_path / 'no folder' / 'videos.npy'}: no such folder {tmp_path / 'no folder'}; create it first\n"
    assert not list((ws / "index").glob("*/index.json"))


def test_a_factory_faiss_cannot_read_or_train_on_the_collection_is_one_line_error(ws, monkeypatch, capsys):
    with monkeypatch.context() as patch:  # refused before any video is encoded
        patch.setattr("vlpcache.model.retrieval.encode_videos", lambda *a, **k: pytest.fail("videos were encoded"))
        code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet", "--factory", "Bogus")
    assert code == 2 and err.startswith("error: FAISS cannot build factory string 'Bogus'") and err.count("\n") == 1
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet", "--factory", "IVF1024,Flat")
    assert code == 2 and err == (f"error: index type 'IVF1024,Flat' cannot be trained on the collection's {ITEMS} vectors "
                                 f"(Number of training points ({ITEMS}) should be at least as large as number of clusters "
                                 "(1024)); pass a smaller one, or leave --factory out to have one chosen\n")
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--quiet", "--factory", "IDMap2,Flat")  # was a traceback
    assert code == 2 and err == ("error: factory string 'IDMap2,Flat': vlpcache keeps the ids of the index's rows itself "
                                 "(ids.json); leave out IDMap2, e.g. 'Flat'\n")


def test_importing_vlpcache_loads_neither_faiss_nor_onnxruntime():
    import subprocess

    probe = "import sys, vlpcache; print(sorted(m for m in ('faiss', 'onnxruntime', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.stdout.strip() == "[]", result.stderr


def test_index_reports_unreadable_shards_instead_of_up_to_date_and_search_says_what_it_cannot_show(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    shard = sorted((ws / "cache" / "shards").glob("*.h5"))[0]  # 16 of the 24 items
    shard.write_bytes(shard.read_bytes()[:1000])  # broken after indexing
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "up to date" not in err
    assert f"{shard}: unreadable shard" in err
    assert f"8 of its {ITEMS} items can be shown, 16 not in the cache (1 shard(s) of the cache are unreadable" in err
    code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", ITEMS)
    assert code == 0 and f"-k {ITEMS} is more than the 8 indexed items in the cache" in err
    assert len([line for line in out.splitlines() if line[:3].strip().isdigit()]) == 8
    for rerank in ("--rerank", "--no-rerank"):  # the k best of those it can show, however many it cannot
        [result] = search_json(monkeypatch, capsys, "a dog", "-k", 4, *([rerank] if rerank != "--rerank" else []))
        assert len(result["results"]) == 4, rerank
    from vlpcache import Searcher

    searcher = Searcher(ws / "runs" / "run-001", ws / "cache")
    searcher.rerank_candidates = 4  # a pool of 4 of the 24 (of 32 in a larger collection): those it cannot show, asked again
    for options in ({}, {"rerank": False}):
        assert len(searcher.search("a dog", k=4, **options)) == 4, options


def test_index_leaves_out_a_video_found_damaged_says_it_once_and_adds_it_once_extracted_again(ws, monkeypatch, capsys):
    from vlpcache.cache.reader import RegionCache
    from vlpcache.model.batch import video_batch

    shard = sorted((ws / "cache" / "shards").glob("*.h5"))[0]
    clean = RegionCache(ws / "cache").get("v3")
    damage_chunk(shard, "features", 3)
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "cannot be read" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{shard}: item 'v3' cannot be read (") and lines[0].endswith(
        "the next `vlpcache extract` extracts it again; the index leaves it out until then (`vlpcache index` after "
        "that extract adds it)")
    assert f"index {the_index(ws)}: {ITEMS - 1} items; encoded {ITEMS} videos in " in err
    assert " s; 1 left out, found damaged (said above); built " in err
    index = VideoIndex.load(the_index(ws))
    assert "v3" not in index.ids and len(index.ids) == ITEMS - 1
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    with torch.inference_mode():  # the rows after it are their own items' (not shifted by the one left out)
        direct = run.model.encode_video(**video_batch([cache.get(i) for i in index.ids])).global_
    assert np.allclose(index.embeddings, direct.numpy(), atol=1e-5)

    with ShardWriter(ws / "cache", cache.settings, writer_name="s0of2") as writer:  # as extract redoes it
        writer.add("v3", cache.paths[0].replace("v0", "v3"), "video", {k: clean[k] for k in cache._array_names})
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "cannot be read" not in err and f"{ITEMS} items; encoded 1 videos" in err
    assert VideoIndex.load(the_index(ws)).ids[-1] == "v3"


def test_index_quiet_still_says_a_video_it_leaves_out_found_damaged(ws, monkeypatch, capsys):
    shard = sorted((ws / "cache" / "shards").glob("*.h5"))[0]
    damage_chunk(shard, "features", 3)
    code, out, err = vlpcache(monkeypatch, capsys, "index", "--quiet")  # "errors only": not a word of it was said
    assert code == 0 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"{shard}: item 'v3' cannot be read (") and "the index leaves it out until then" in err
    assert "v3" not in VideoIndex.load(the_index(ws)).ids


def test_a_hit_found_damaged_is_shown_without_boxes_and_then_left_out_until_extracted_again(ws, monkeypatch, capsys):
    from vlpcache.index.search import UNREADABLE_HIT, Searcher

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    damage_chunk(sorted((ws / "cache" / "shards").glob("*.h5"))[0], "boxes", 3)
    searcher = Searcher()  # as the page's server: a search, then the frames of a hit
    hits = searcher.search("a dog", ITEMS)
    [hit] = [hit for hit in hits if hit.id == "v3"]
    assert hit.outdated == UNREADABLE_HIT and hit.note == "" and hit.regions == [] and hit.path.endswith("v3.mp4")
    assert all(h.regions for h in hits if h.id != "v3")
    item = searcher.item("v3")
    assert item["unreadable"] == UNREADABLE_HIT and not item["frame_mask"].any() and item["path"] == hit.path
    records = [line for log in (ws / "cache" / "damaged").glob("*.jsonl") for line in log.read_text().splitlines()]
    assert len(records) == 1  # found once, not read (and recorded) again
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and (f"{ITEMS - 1} of its {ITEMS} items can be shown, 1 not in the cache (1 found damaged, until "
                          "extract redoes them); search leaves them out") in err
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", ITEMS)
    assert "v3" not in [hit["id"] for hit in result["results"]] and len(result["results"]) == ITEMS - 1


@pytest.mark.parametrize("then", ["index", "search"])
def test_an_index_whose_save_a_kill_cut_among_its_renames_is_built_again_by_the_next_index_or_search(
        ws, monkeypatch, capsys, then):
    # the files of two saves (a kill among replace_together's renames): every later index and search stopped with
    # "index files disagree ...; rebuild it with --rebuild", the index and the page down until a user rebuilt it
    from vlpcache.index.layout import IDS_FILE

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    before = VideoIndex.load(the_index(ws))
    write_cache(ws / "cache", 2, prefix="w", seed=3)
    kept = (the_index(ws) / IDS_FILE).read_bytes()
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    (the_index(ws) / IDS_FILE).write_bytes(kept)  # the ids of the save before: as a kill after the first rename leaves
    code, out, err = vlpcache(monkeypatch, capsys, *(["index"] if then == "index" else ["search", "a dog", "--json"]))
    assert code == 0 and "index files disagree on the item count" in err and (
        "it was being written when its writer was stopped; building it again") in err, err
    assert "no index of run" not in err  # there is one: half-written
    after = VideoIndex.load(the_index(ws))
    assert len(after) == ITEMS + 2 and after.ids[:ITEMS] == before.ids
    np.testing.assert_allclose(after.embeddings[:ITEMS], before.embeddings, atol=1e-6)


def test_an_index_that_waited_for_another_takes_up_what_extract_dropped_meanwhile(ws, monkeypatch, capsys):
    # an `index` waiting for the lock read the cache before it waited: it added back the items `extract --prune`
    # dropped meanwhile (and another `index` had dropped from the index)
    from vlpcache.cache.reader import RegionCache
    from vlpcache.index.build import update_index
    from vlpcache.index.layout import LOCK_FILE, IndexConfig
    from vlpcache.locks import WriterLock
    from vlpcache.model.checkpoint import load_run

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    index_dir, cache, said = the_index(ws), RegionCache(ws / "cache"), []
    held = WriterLock.take(index_dir / LOCK_FILE)  # another `index` writing
    waiting = threading.Thread(target=update_index, args=(load_run(ws / "runs" / "run-001"), cache, index_dir,
                                                          IndexConfig()),
                               kwargs=dict(device="cpu", batch_size=8, progress=False, say=said.append))
    waiting.start()
    assert wait_until(lambda: any(line.startswith("waiting for ") for line in said))
    with ShardWriter(ws / "cache", cache.settings, writer_name="s0of2") as writer:  # extract --prune, meanwhile
        writer.record_removals([("v3", cache.row_of("v3"), cache.paths[cache.index_of("v3")], "gone")])
    held.release()
    waiting.join(HANG_GUARD_S)
    assert "v3" not in VideoIndex.load(index_dir).ids and len(VideoIndex.load(index_dir)) == ITEMS - 1, said


def test_items_pruned_from_the_cache_leave_the_index_on_the_next_index_run(ws, monkeypatch, capsys):
    from vlpcache.cache.reader import RegionCache

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    before = VideoIndex.load(the_index(ws))
    cache = RegionCache(ws / "cache")
    with ShardWriter(ws / "cache", cache.settings, writer_name="s0of2") as writer:  # as extract --prune records it
        for item_id in ("v3", "v20"):
            writer.record_removals([(item_id, cache.row_of(item_id), cache.paths[cache.index_of(item_id)], "gone")])
    # before the index is run again, --like of one is told as dropped, as text search leaves it out (it answered)
    code, _, err = vlpcache(monkeypatch, capsys, "search", "--like", "v3")
    assert code == 2 and "error: 'v3' was dropped from the cache " in err and "by `vlpcache extract --prune`" in err
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "2 indexed item(s) were dropped from the cache (extract --prune); dropping them" in err
    assert f"up to date: {ITEMS - 2} items" in err and "not in the cache" not in err
    after = VideoIndex.load(the_index(ws))
    assert after.ids == [i for i in before.ids if i not in ("v3", "v20")]
    kept = [before.ids.index(i) for i in after.ids]
    assert np.array_equal(after.embeddings, before.embeddings[kept])  # nothing encoded again
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", ITEMS)
    assert len(result["results"]) == ITEMS - 2


def test_a_second_index_writer_waits_for_the_first_and_says_so(ws, monkeypatch, capsys):
    import threading

    from vlpcache.index.layout import LOCK_FILE
    from vlpcache.locks import WriterLock

    the_index(ws).mkdir(parents=True)
    held = WriterLock.take(the_index(ws) / LOCK_FILE)
    threading.Timer(1.0, held.release).start()
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and f"waiting for pid {os.getpid()}" in err and f"which is writing the index {the_index(ws)}" in err
    assert read_meta(the_index(ws)).count == ITEMS


def test_ids_with_control_characters_are_escaped_for_people_and_raw_in_json(ws, monkeypatch, capsys):
    from vlpcache.cache.reader import RegionCache
    from vlpcache.cache.writer import ShardWriter

    cache = RegionCache(ws / "cache")
    odd = "two\nlines\x1b[31m"
    with ShardWriter(ws / "cache", cache.settings, writer_name="s1of2") as writer:
        writer.add(odd, f"/data/{odd}.mp4", "video", {k: v for k, v in cache.get("v0").items() if k not in ("id", "path", "kind", "source", "times_from")})
    code, out, _ = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", ITEMS + 1)
    assert code == 0 and "two\\nlines\\x1b[31m  /data/two\\nlines\\x1b[31m.mp4" in out and "\x1b" not in out
    assert all(line.startswith(("query: ", "       ")) or line[:3].strip().isdigit() for line in out.splitlines())
    [result] = search_json(monkeypatch, capsys, "a dog", "-k", ITEMS + 1)
    assert odd in [hit["id"] for hit in result["results"]]


def test_a_rendered_items_default_file_name_never_starts_with_a_dash(ws, tmp_path, monkeypatch, capsys):
    from vlpcache.cache.reader import RegionCache
    from vlpcache.cache.writer import ShardWriter

    cache = RegionCache(ws / "cache")
    with ShardWriter(ws / "cache", cache.settings, writer_name="s1of2") as writer:
        writer.add("-rf", "/nowhere/-rf.mp4", "video", {k: v for k, v in cache.get("v0").items() if k not in ("id", "path", "kind", "source", "times_from")})
    monkeypatch.chdir(tmp_path)
    code, out, err = vlpcache(monkeypatch, capsys, "inspect", "--render", "-rf")
    assert code == 0 and out == "wrote rf.png\n" and (tmp_path / "rf.png").is_file(), err
    assert not list(tmp_path.glob("-*"))


def test_a_rendered_box_falls_where_the_cache_has_it_in_its_labels_colour_and_the_whole_frame_is_not_boxed(
        ws, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from vlpcache.cache.reader import RegionCache
    from vlpcache.cache.schema import FRAME_REGION_LABEL
    from vlpcache.cache.writer import ShardWriter
    from vlpcache.extract.render import CAPTION_HEIGHT, PALETTE, TITLE_HEIGHT

    cache = RegionCache(ws / "cache")
    item = {k: v.copy() for k, v in cache.get("v0").items() if k not in ("id", "path", "kind", "source", "times_from")}
    item["frame_mask"][:] = [True, False]  # one frame, 320 x 240 as the cache records it, drawn 480 x 360
    item["region_mask"][:] = False
    item["region_mask"][0, :2] = True
    item["boxes"][0, :2] = [[0.25, 0.2, 0.75, 0.6], [0, 0, 1, 1]]
    item["labels"][0, :2] = [2, FRAME_REGION_LABEL]  # a car; the whole frame
    with ShardWriter(ws / "cache", cache.settings, writer_name="s1of2") as writer:
        writer.add("boxed", "/nowhere/boxed.mp4", "video", item)  # no source: the boxes go on a grey frame
    out = tmp_path / "boxed.png"
    code, _, err = vlpcache(monkeypatch, capsys, "inspect", "--render", "boxed", "-o", out)
    assert code == 0 and "drawing boxes on blank frames" in err
    picture = np.asarray(Image.open(out).convert("RGB"))
    top = TITLE_HEIGHT + CAPTION_HEIGHT  # the frame's first row
    assert picture.shape == (top + 360, 480, 3)
    row = picture[top + 150]  # halfway down the box, away from its label
    car, grey = PALETTE[2], (96, 96, 96)
    assert tuple(row[120]) == tuple(row[359]) == car  # its left and right edges, at 0.25 and 0.75 of 480
    assert tuple(row[116]) == tuple(row[240]) == tuple(row[364]) == grey  # outside and inside it
    assert tuple(row[0]) == tuple(row[479]) == grey  # the whole-frame region is no box
    assert tuple(picture[top + 2 * 36, 240]) == tuple(picture[top + 6 * 36 - 1, 240]) == car  # top and bottom at 0.2, 0.6


def test_search_qbnorm_ranks_by_the_banks_normalised_similarity_and_the_bank_grows_with_the_index(ws, monkeypatch, capsys):
    from vlpcache.index.layout import QUERYBANK_FILE
    from vlpcache.querybank import QueryBank

    [plain] = search_json(monkeypatch, capsys, "a horse", "-k", str(ITEMS), "--no-rerank")  # every item a candidate
    [result] = search_json(monkeypatch, capsys, "a horse", "-k", "8", "--qbnorm")  # makes the bank on first use
    bank = QueryBank.load(the_index(ws) / QUERYBANK_FILE)
    index = VideoIndex.load(the_index(ws))
    assert len(bank.log_norm) == len(index) == ITEMS
    # the expected order, from the bank and the plain global scores of the same candidates
    rows = np.array([index.ids.index(h["id"]) for h in plain["results"]])
    globals_ = np.array([h["global_score"] for h in plain["results"]])
    expected = bank.normalise(globals_[None], rows[None])[0]
    order = np.argsort(-expected, kind="stable")[:8]
    assert [h["id"] for h in result["results"]] == [plain["results"][j]["id"] for j in order]
    assert all(h["local_score"] is None for h in result["results"])
    # videos added later extend the bank exactly as building it anew would
    write_cache(ws / "cache", 3, prefix="w", seed=5)
    assert vlpcache(monkeypatch, capsys, "index")[0] == 0
    grown, index = QueryBank.load(the_index(ws) / QUERYBANK_FILE), VideoIndex.load(the_index(ws))
    assert len(grown.log_norm) == len(index) == ITEMS + 3
    fresh = QueryBank.build(grown.bank, index.embeddings, grown.beta, grown.k)
    np.testing.assert_allclose(grown.log_norm, fresh.log_norm, rtol=1e-5)
    assert grown.hubs.tolist() == fresh.hubs.tolist()


def test_search_qbnorm_reads_the_query_bank_once(ws, monkeypatch, capsys):
    # it was read whole twice per command: once to see that it fits the index, once to use it
    from vlpcache.querybank import QueryBank

    assert vlpcache(monkeypatch, capsys, "index", "--qbnorm", "--quiet")[0] == 0
    reads, load = [], QueryBank.load.__func__
    monkeypatch.setattr(QueryBank, "load", classmethod(lambda cls, path: reads.append(path) or load(cls, path)))
    [result] = search_json(monkeypatch, capsys, "a horse", "-k", "3", "--qbnorm")
    assert len(result["results"]) == 3 and len(reads) == 1, reads


def test_search_qbnorm_over_a_query_bank_cut_short_makes_it_again(ws, monkeypatch, capsys):
    # a bank file cut short (a copy stopped halfway, a damaged disk) was a zipfile.BadZipFile traceback
    from vlpcache.index.layout import QUERYBANK_FILE
    from vlpcache.querybank import QueryBank

    assert vlpcache(monkeypatch, capsys, "index", "--qbnorm", "--quiet")[0] == 0
    path = the_index(ws) / QUERYBANK_FILE
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    [result] = search_json(monkeypatch, capsys, "a horse", "-k", "3", "--qbnorm")
    assert len(result["results"]) == 3
    assert len(QueryBank.load(path).log_norm) == ITEMS


def test_search_qbnorm_ranks_every_hit_by_the_normalised_score_past_the_first_32_too(ws, monkeypatch, capsys):
    """-k 44 --qbnorm gave QB-Norm's scores (its log-softmax, about -3) to the first 32 hits and plain cosines (about
    -0.04) to the hits after them, in global order: the score rose down the list, and the order past 32 ignored
    QB-Norm. Every item is now ranked by its normalised score, as eval ranks them: the first hits whatever k."""
    from vlpcache.index.layout import QUERYBANK_FILE
    from vlpcache.querybank import QueryBank

    write_cache(ws / "cache", 20, prefix="w", seed=5)  # 44 items: more than the 32 candidates search re-orders
    k = ITEMS + 20
    assert vlpcache(monkeypatch, capsys, "index", "--qbnorm", "--quiet")[0] == 0
    [plain] = search_json(monkeypatch, capsys, "a horse", "-k", str(k), "--no-rerank")  # every item a candidate
    [result] = search_json(monkeypatch, capsys, "a horse", "-k", str(k), "--qbnorm")
    bank, index = QueryBank.load(the_index(ws) / QUERYBANK_FILE), VideoIndex.load(the_index(ws))
    rows = np.array([index.ids.index(h["id"]) for h in plain["results"]])
    globals_ = np.array([h["global_score"] for h in plain["results"]])
    assert bank.hubs[rows[0]]  # the query's best is a hub: its every score is normalised
    expected = bank.normalise(globals_[None], rows[None])[0]
    order = np.argsort(-expected, kind="stable")
    assert [h["id"] for h in result["results"]] == [plain["results"][j]["id"] for j in order]
    scores = [h["score"] for h in result["results"]]
    np.testing.assert_allclose(scores, expected[order], rtol=1e-5)
    assert len(scores) == k and scores == sorted(scores, reverse=True) and max(scores) < 0
    code, out, _ = vlpcache(monkeypatch, capsys, "search", "a horse", "-k", str(k), "--qbnorm")
    printed = [float(line.split()[1]) for line in out.splitlines()[1:] if line[:3].strip().isdigit()]
    assert code == 0 and printed == sorted(printed, reverse=True) and len(printed) == k
    for first in (3, 10):  # every item ranked by its normalised score: the first hits whatever k, as before
        [fewer] = search_json(monkeypatch, capsys, "a horse", "-k", str(first), "--qbnorm")
        assert [h["id"] for h in fewer["results"]] == [h["id"] for h in result["results"][:first]]


def test_a_query_bank_of_other_rows_is_never_used_and_a_searcher_takes_up_one_made_later(ws, monkeypatch, capsys):
    """An item indexed anew moves to the end of the index, as many rows as before: a bank left from before (its
    rebuild failed: the run's captions unreadable) ranked --qbnorm by other rows' normalisers without a word. And
    a Searcher took up a bank that `index --qbnorm` made for an index up to date only when the index changed."""
    from vlpcache import Searcher
    from vlpcache.index import build
    from vlpcache.index.layout import QUERYBANK_FILE
    from vlpcache.querybank import bank_for

    search_json(monkeypatch, capsys, "a horse", "-k", "3", "--qbnorm")  # makes the bank
    assert bank_for(the_index(ws) / QUERYBANK_FILE, VideoIndex.load(the_index(ws)).ids) is not None
    write_cache(ws / "cache", 1, prefix="v", seed=9)  # v0 extracted again: indexed anew, at the end
    made = build.run_query_bank
    monkeypatch.setattr(build, "run_query_bank", lambda *args, **kwargs: None)  # its captions cannot be read now
    assert vlpcache(monkeypatch, capsys, "index")[0] == 0
    index = VideoIndex.load(the_index(ws))
    assert index.ids[-1] == "v0" and len(index) == ITEMS and not (the_index(ws) / QUERYBANK_FILE).exists()
    searcher = Searcher(ws / "runs" / "run-001", ws / "cache")
    with pytest.raises(UserError, match="no query bank.*index --qbnorm"):
        searcher.search("a dog", qbnorm=True)
    monkeypatch.setattr(build, "run_query_bank", made)
    assert vlpcache(monkeypatch, capsys, "index", "--qbnorm")[0] == 0  # the index up to date: only the bank written
    assert [h.id for h in searcher.search("a dog", k=3, qbnorm=True)]  # the same Searcher, at its next search


def test_a_bank_made_for_other_rows_of_as_many_videos_is_not_the_indexs(tmp_path):
    from vlpcache.querybank import QueryBank, bank_for

    rng = np.random.default_rng(0)
    bank = QueryBank.build(rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32))
    bank.of_rows(["a", "b", "c"]).save(tmp_path / "bank.npz")
    assert bank_for(tmp_path / "bank.npz", ["a", "b", "c"]) is not None
    assert bank_for(tmp_path / "bank.npz", ["b", "c", "a"]) is None and bank_for(tmp_path / "bank.npz", ["a", "b"]) is None
    bank.save(tmp_path / "old.npz")  # made before banks kept their rows: taken for as many
    assert bank_for(tmp_path / "old.npz", ["x", "y", "z"]) is not None and bank_for(tmp_path / "none.npz", ["a"]) is None


def test_a_shard_out_of_reach_during_one_index_is_not_new_when_it_is_back(ws, monkeypatch, capsys):
    # an index run while a shard was unreadable recorded the shards without it; back unchanged (moved out and back,
    # a permission mended, as the unreadable-shard line advises), its items were "extracted again since they were
    # indexed": their matched regions hidden, and all of them encoded anew by the next index
    from vlpcache.cache.writer import ShardWriter

    assert vlpcache(monkeypatch, capsys, "index")[0] == 0
    shard = sorted((ws / "cache" / "shards").glob("*.h5"))[-1]
    shutil.move(shard, ws / "away.h5")
    cache = RegionCache(ws / "cache")
    item = {k: v for k, v in cache.get("v0").items() if k not in ("id", "path", "kind", "source", "times_from")}
    with ShardWriter(ws / "cache", cache.settings, writer_name="s1of2") as writer:  # meanwhile, a new item
        writer.add("w0", "w0.mp4", "video", item)
    cache.close()
    assert vlpcache(monkeypatch, capsys, "index")[0] == 0
    shutil.move(ws / "away.h5", shard)
    code, _, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", str(ITEMS))
    assert code == 0 and "extracted again" not in err, err
    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "anew" not in err and f"up to date: {ITEMS + 1} items" in err, err


def test_searcher_without_a_query_bank_says_how_to_make_one(ws):
    from vlpcache import Searcher

    searcher = Searcher(ws / "runs" / "run-001", ws / "cache")
    with pytest.raises(UserError, match="no query bank.*index --qbnorm"):
        searcher.search("a dog", qbnorm=True)


# ---------------------------------------------------------------- search --like: items like an indexed one


def test_like_ranks_the_other_items_by_cosine_with_the_items_own_embedding_in_the_api_and_the_cli(ws, monkeypatch,
                                                                                                   capsys):
    from vlpcache import Searcher

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    searcher = Searcher()
    index = VideoIndex.load(the_index(ws))
    example = index.row_of("v5")
    cosine = index.embeddings @ index.embeddings[example]  # (V,) normalised embeddings
    order = [r for r in np.argsort(-cosine, kind="stable") if r != example][:6]  # the item itself left out
    hits = searcher.like("v5", k=6)
    assert [h.id for h in hits] == [index.ids[r] for r in order] and [h.rank for h in hits] == list(range(1, 7))
    assert np.allclose([h.score for h in hits], cosine[order], atol=1e-5)
    assert all(h.score == h.global_score and h.local_score is None and h.regions == [] for h in hits)
    assert all(h.path == f"{h.id}.mp4" and h.time == float(h.frame) for h in hits)  # frames stamped 0 s, 1 s
    [result] = search_json(monkeypatch, capsys, "--like", "v5", "-k", "6")
    assert result == {"like": "v5", "model": "run-001, epoch 1",
                      "results": json.loads(json.dumps([dataclasses.asdict(h) for h in hits]))}
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", "v5", "--like", "v7", "-k", "30")
    assert code == 0, err
    assert f"-k 30 is more than the {ITEMS - 1} other indexed items in the cache" in err
    first, second = out.split("\n\n")
    assert first.splitlines()[0] == "like: v5" and second.splitlines()[0] == "like: v7"
    ranked = [line for line in first.splitlines()[1:] if not line.startswith("       ")]  # not their notes
    assert len(ranked) == ITEMS - 1 and all(" -> " not in line for line in first.splitlines())  # no regions
    assert " v5 " not in first and f"  {hits[0].id}  {hits[0].id}.mp4  @ " in ranked[0]


def test_like_under_an_approximate_factory_ranks_and_scores_by_the_exact_cosine_of_the_stored_embeddings(
        ws, monkeypatch, capsys):
    """FAISS's own scores of an approximate index are estimates (a PCA index's are biased; under IVF-PQ an exact copy
    scored 0.81, the others in another order): --like printed them and their order. They only choose candidates now."""
    assert vlpcache(monkeypatch, capsys, "index", "--factory", "PCA8,Flat", "--rebuild", "--quiet")[0] == 0
    index = VideoIndex.load(the_index(ws))
    example = index.row_of("v0")
    cosine = index.embeddings @ index.embeddings[example]  # (V,)
    order = [r for r in np.argsort(-cosine, kind="stable") if r != example][:6]
    _, faiss_rows = index.search(index.embeddings[example][None], 7)  # the item itself and 6
    faiss_order = [r for r in faiss_rows[0] if r != example][:6]
    assert faiss_order != order and not set(order) <= set(faiss_order)  # FAISS's own first 7 miss some of these
    [result] = search_json(monkeypatch, capsys, "--like", "v0", "-k", "6")
    assert [h["id"] for h in result["results"]] == [index.ids[r] for r in order]
    assert [h["score"] for h in result["results"]] == pytest.approx(cosine[order].tolist(), abs=1e-5)


def test_like_of_an_item_extracted_again_since_it_was_indexed_says_its_old_content_answers(ws, monkeypatch, capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    write_cache(ws / "cache", 1, prefix="v", seed=9)  # v0 extracted again (a new shard): the index holds its old vector
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", "v0", "--like", "v1", "-k", "2")
    assert code == 0 and out.startswith("like: v0")
    assert err.count("was extracted again since it was indexed") == 1
    assert "note: v0 was extracted again since it was indexed (its source changed): these are the items most like its old" in err
    first, second = search_json(monkeypatch, capsys, "--like", "v0", "--like", "v1", "-k", "2")
    assert first["note"].startswith("v0 was extracted again since it was indexed") and "note" not in second


def test_a_searcher_open_before_an_item_was_indexed_takes_it_for_like_without_a_search_between(ws, monkeypatch, capsys):
    from vlpcache import Searcher

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    searcher = Searcher()  # a server started before the user's clip was extracted and indexed
    write_cache(ws / "cache", 1, prefix="w", seed=5)
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    assert searcher.indexed_item("w0.mp4") == "w0" and len(searcher.like("w0", k=3)) == 3  # no search before


def test_a_like_hits_frame_is_the_one_whose_regions_are_most_like_the_items_regions(ws, monkeypatch, capsys):
    from vlpcache import Searcher
    from vlpcache.index.region_store import RegionStore

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    searcher = Searcher()
    example, N = searcher.index.row_of("v4"), searcher.cache.settings.regions
    a, b = np.eye(searcher.index.regions.embeddings.shape[1], dtype=np.float16)[:2]
    for matching_frame in (1, 0):  # the example's one region is a; every other item has b on one frame, a on the other
        vectors, positions, offsets = [], [], [0]
        for row in range(len(searcher.index)):
            if row == example:
                vectors, positions = vectors + [a], positions + [0]
            else:
                vectors += [b, b, a] if matching_frame == 1 else [a, b, b]
                positions += [0, 1, N] if matching_frame == 1 else [0, N, N + 1]
            offsets.append(len(vectors))
        searcher.index.regions = RegionStore(np.stack(vectors), np.array(offsets, np.int64), np.array(positions, np.int32))
        hits = searcher.like("v4", k=5)
        assert [h.frame for h in hits] == [matching_frame] * 5 and [h.time for h in hits] == [float(matching_frame)] * 5
    # an exact copy: every frame's regions are the example's, alike but for float rounding; the first is shown
    rng = np.random.default_rng(0)
    regions = rng.standard_normal((3, a.shape[0])).astype(np.float16)
    vectors, positions, offsets = [], [], [0]
    for row in range(len(searcher.index)):
        scales = [1.0] if row == example else [1.0 + 0.05 * row, 1.0 + 0.37 * row]  # by frame
        vectors += [(region * scale).astype(np.float16) for scale in scales for region in regions]
        positions += [t * N + j for t in range(len(scales)) for j in range(3)]
        offsets.append(len(vectors))
    searcher.index.regions = RegionStore(np.stack(vectors), np.array(offsets, np.int64), np.array(positions, np.int32))
    assert [h.frame for h in searcher.like("v4", k=20)] == [0] * 20


def test_like_of_a_path_that_is_no_file_says_so_and_that_no_item_has_that_id(ws, monkeypatch, capsys):
    # it said only that "/missing/file" names no item of the index, as if it were a mistyped id
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    missing = str(ws / "gone" / "clip.mp4")
    for key, said in ((missing, f'{missing}: no such file or folder, and "{missing}" names no item of the index; '),
                      ("clip", '"clip" names no item of the index; ')):  # an id alone is not said to be no file
        code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", key)
        assert (code, out) == (2, "") and err.startswith(f"error: {said}give an id as search prints it") and \
            len(err.strip().splitlines()) == 1, err


def test_like_of_a_file_looks_through_the_cache_sources_once_and_its_ids_once_to_name_it(ws, tmp_path, monkeypatch,
                                                                                         capsys, videos_dir):
    # the sources were looked through three times and the ids (by the ends of the path) four, before extracting
    from vlpcache.index import search

    calls = {"cached_source": 0, "ends_in": 0}
    for name in calls:
        def counted(*args, real=getattr(search, name), name=name):
            calls[name] += 1
            return real(*args)
        monkeypatch.setattr(search, name, counted)
    clip = tmp_path / "clip.mp4"
    shutil.copy(videos_dir / "tests_data_test.mp4", clip)  # not in the cache (whose detector is a synthetic one)
    code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", str(clip))
    assert f"{clip} is not in the cache: extracting it on its own" in err
    assert calls == {"cached_source": 1, "ends_in": 2}, calls  # ends_in: to name it, and for the line above


def test_search_names_the_run_that_ranked_its_hits_once_on_stderr_and_in_each_json_object(ws, monkeypatch, capsys):
    # with several runs, nothing said which one's model ranked the hits
    retrained(ws)  # run-002, the newest: search takes it
    for args, model in (([], "run-002, epoch 1"), (["--run", str(ws / "runs" / "run-001")], "run-001, epoch 1")):
        code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "--queries", "-", "-k", "2", *args,
                                  stdin="a cat\n")
        assert code == 0 and out.startswith("query: a dog\n") and "\n\nquery: a cat\n" in out  # stdout as it was
        assert err.count("searching with") == 1 and f"searching with {model}\n" in err, err
        code, out, err = vlpcache(monkeypatch, capsys, "search", "a dog", "-k", "2", "--json", *args)
        assert code == 0 and "searching with" not in err  # --json: the field says it
        results = [json.loads(out)] + search_json(monkeypatch, capsys, "--like", "v3", "-k", "2", *args)
        assert [result["model"] for result in results] == [model, model]


def test_like_takes_an_item_by_file_name_or_path_as_inspect_does_and_says_why_another_names_none(ws, monkeypatch,
                                                                                                 capsys):
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    [by_id] = search_json(monkeypatch, capsys, "--like", "v3", "-k", "3")
    for key in ("v3.mp4", "videos/v3.mp4", str(ws / "v3.mp4")):
        assert search_json(monkeypatch, capsys, "--like", key, "-k", "3") == [by_id]  # {"like": "v3", ...}
    for given, said in (("v3x", '"v3x" names no item of the index; did you mean "v3"?'),
                        ("zzzzzz", '"zzzzzz" names no item of the index; give an id as search prints it (the path '
                                   'below the folder extracted, without its extension: "v0")')):
        code, out, err = vlpcache(monkeypatch, capsys, "search", "--like", "v2", "--like", given)
        assert (code, out, err.strip()) == (2, "", f"error: {said}")  # v2's answer is not printed before the error
    write_cache(ws / "cache", 1, prefix="w", seed=5)  # extracted since the index was built
    code, _, err = vlpcache(monkeypatch, capsys, "search", "--like", "w0.mp4")
    assert code == 2 and err.strip().endswith('"w0" is cached but not in the index yet; run `vlpcache index` to add it')
    with ShardWriter(ws / "cache", RegionCache(ws / "cache").settings, writer_name="pruner") as writer:
        writer.record_removals([("w0", RegionCache(ws / "cache").row_of("w0"), "/data/w0.mp4", "gone")])  # extract --prune
    code, _, err = vlpcache(monkeypatch, capsys, "search", "--like", "w0")
    assert code == 2 and "error: 'w0' was dropped from the cache " in err and ": /data/w0.mp4 was gone; " in err
    for args, said in ((["a dog", "--like", "v2"], "give words to search for (TEXT, --queries) or --like ID, not both"),
                       (["--like", "v2", "--qbnorm"], "--qbnorm normalises text queries by the run's captions")):
        code, _, err = vlpcache(monkeypatch, capsys, "search", *args)
        assert code == 2 and said in err and "Traceback" not in err
    from vlpcache import Searcher

    with pytest.raises(UserError, match="at least one result"):
        Searcher().like("v2", k=0)


def test_like_of_a_file_the_cache_does_not_hold_names_the_commands_that_add_it(ws, monkeypatch, capsys):
    """Where --like cannot extract the file on its own as the cache's items were (here: the tests' synthetic
    detector, which no machine has; a cache made with other weights), and where the Python API is asked
    (Searcher.indexed_item(on_disk=True) does not extract): the commands that add it to the cache."""
    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    (ws / "mine").mkdir()
    (ws / "mine" / "clip.mp4").write_bytes(b"a video of the user's that the cache does not hold")
    for path, name in ((ws / "mine" / "clip.mp4", "clip"), (ws / "mine", "mine")):  # a file, a folder of one
        said = (f'"{path}" is not in the cache {ws / "cache"}: --like compares the items of its index; add it with '
                f"`vlpcache extract {path} -o {ws / 'cache'} --frames 2 --regions 3 --detector synthetic`, index it "
                f"(`vlpcache index`), then search `--like {name}`")
        code, _, err = vlpcache(monkeypatch, capsys, "search", "--like", str(path))
        assert code == 2 and err.strip().splitlines() == [
            f"{path} is not in the cache: extracting it on its own to compare it (with the cache's settings; nothing "
            "is added to the cache)",
            f"error: {said} (--like cannot extract it on its own here: unknown detector 'synthetic'; choose from "
            "yolox, frcnn, vg)"], err
        from vlpcache import Searcher

        with pytest.raises(UserError) as raised:
            Searcher().indexed_item(str(path), on_disk=True)
        assert str(raised.value) == said
    from vlpcache.index.search import outside_line

    settings = RegionCache(ws / "cache").settings  # as extract records a detector: its name, then its weights
    cache = SimpleNamespace(settings=dataclasses.replace(settings, detector="yolox:yolox_nano_coco.onnx"), cache_dir=ws,
                            ids=[], paths=[], kinds=[])
    assert "--detector yolox`," in outside_line(str(ws / "mine"), cache)
    # new in a folder the cache was extracted from: that folder again, the id it gives
    collection = ws / "collection"
    (collection / "new" / "deeper").mkdir(parents=True)
    sources = [(collection / "old0.mp4", "video"), (ws / "mine" / "old1.mp4", "video")]  # under a folder given, a file given
    for path, _ in sources:
        path.write_bytes(b"extracted")
    write_cache(ws / "other", 2, prefix="old", sources=sources)  # ids old0 and old1, as extract names them there
    Workspace().remember_roots([collection, ws / "mine" / "old1.mp4"])
    other = RegionCache(ws / "other")
    (collection / "new" / "deeper" / "new.mp4").write_bytes(b"not extracted yet")
    for media, name in ((collection / "new" / "deeper" / "new.mp4", "new/deeper/new"), (collection / "new", "new")):
        assert outside_line(str(media), other) == (
            f'"{media}" is not in the cache {ws / "other"}: --like compares the items of its index; extract {collection} '
            f"again (new files only) with `vlpcache extract {collection} -o {ws / 'other'} --frames 2 --regions 3 "
            f"--detector synthetic`, index it (`vlpcache index`), then search `--like {name}`")
    frames = collection / "video0"  # a frame folder the cache holds as one item: one of its images names it
    frames.mkdir()
    (frames / "0001.jpg").write_bytes(b"a frame")
    write_cache(ws / "framed", 1, prefix="video", seed=9, sources=[(frames, "frames")])  # its id: video0
    assert outside_line(str(frames / "0001.jpg"), RegionCache(ws / "framed")) == (
        f'"{frames / "0001.jpg"}" is one of the frames of the cached item "video0": search `--like video0`')
    beside = ws / "mine" / "beside.mp4"  # beside a file given as a root, not in a folder given
    beside.touch()
    assert f"add it with `vlpcache extract {beside} -o" in outside_line(str(beside), other)


@pytest.mark.parametrize("name", ["carphone_pristine.mp4", "demo_demo.mp4", "tests_data_test.mp4"])
def test_the_time_a_frame_is_said_at_is_one_ffmpeg_ss_lands_on_that_frame_at_not_the_next(videos_dir, name):
    import av
    from vlpcache.extract.sampling import read_item
    from vlpcache.extract.sources import Item
    from vlpcache.report import clock_text, frame_time

    stored = [float(np.float32(t)) for t in read_item(Item(name, videos_dir / name, "video"), 8, 480).timestamps]
    with av.open(str(videos_dir / name)) as container:  # every frame's start, as `ffmpeg -ss` reads them
        starts = [frame.time for frame in container.decode(video=0)]
    rounded_up = 0
    for t in stored:
        said = frame_time(t)
        assert clock_text(t) == f"{said:.2f} s"
        landed = min(s for s in starts if s >= said)  # ffmpeg -ss: the first frame starting at or after it
        assert abs(landed - t) < 1e-4, (t, said, landed)  # the frame used, not the one after it
        rounded_up += round(t * 100) > round(said * 100)
    assert rounded_up  # the nearest hundredth would have said a time of the next frame


def test_building_a_large_index_after_the_encoding_bar_is_said_first(ws, monkeypatch, capsys):
    # 200k videos: a minute without a word after the bar (the HNSW graph, its search tuned, the save)
    from vlpcache.index import build

    code, _, err = vlpcache(monkeypatch, capsys, "index")
    assert code == 0 and "building the FAISS index" not in err  # a few videos: nothing to wait for
    monkeypatch.setattr(build, "SAID_BUILD_ITEMS", 3)
    code, _, err = vlpcache(monkeypatch, capsys, "index", "--rebuild")
    count = len(VideoIndex.load(the_index(ws)))
    assert code == 0 and f"index: building the FAISS index of {count} videos (its graph, the tuning of its search) and " \
                         "saving it ..." in err.splitlines(), err


def test_an_index_written_a_few_rows_at_a_time_equals_one_written_at_once_and_never_holds_every_region(ws, monkeypatch,
                                                                                                      capsys):
    # `index` held every encoded video's regions (and the old index's, to add to it) in memory: 2.3x the index at 200k
    from vlpcache.index import build, faiss_index, index_rows

    monkeypatch.setattr(build, "ENCODE_CHUNK", 5)  # parts of 5 videos
    blocks = []
    write = index_rows.NpyWriter.write

    def noted(self, block):
        blocks.append((Path(self.file.name).name.split(".")[1], len(block)))
        write(self, block)

    def index_twice(root: Path) -> dict[str, bytes]:
        cache = root / "cache"
        shutil.copytree(ws / "cache", cache)  # a copy: the same collection, grown alike below
        args = ["index", "--cache", cache, "-o", root, "--quiet"]
        assert vlpcache(monkeypatch, capsys, *args)[0] == 0  # built
        write_cache(cache, 3, prefix="w", seed=5)
        assert vlpcache(monkeypatch, capsys, *args)[0] == 0  # added to
        return {p.name: p.read_bytes() for p in the_index(ws, root=root, cache=cache).iterdir()
                if p.suffix in (".npy", ".faiss") or p.name == "ids.json"}

    at_once = index_twice(ws / "at-once")
    monkeypatch.setattr(index_rows, "READ_ROWS", 3)  # the indexed rows, 3 at a time
    monkeypatch.setattr(faiss_index, "ADD_ROWS", 4)  # into FAISS 4 at a time
    monkeypatch.setattr(index_rows.NpyWriter, "write", noted)
    in_chunks = index_twice(ws / "in-chunks")
    assert len(in_chunks) == 6 and in_chunks == at_once  # embeddings, the region store, the FAISS index, the ids
    index = VideoIndex.load(the_index(ws, root=ws / "in-chunks", cache=ws / "in-chunks" / "cache"))
    regions_of = np.diff(index.regions.offsets)  # (V,)
    assert len(index) == ITEMS + 3 and max(regions_of) > 0
    # the regions went to their file a part (5 videos) or 3 indexed rows at a time, never all together
    written = [n for name, n in blocks if name == "regions"]
    assert sum(written) == regions_of[:ITEMS].sum() + regions_of.sum()  # built, then written again with 3 more
    assert max(written) <= max(regions_of[i : i + 5].sum() for i in range(len(index))) < regions_of[:ITEMS].sum()
    # search maps the stored vectors rather than reading them whole
    assert isinstance(index.embeddings, np.memmap) and isinstance(index.regions.embeddings, np.memmap)


def test_an_index_export_stamped_newer_than_onnxruntime_reads_searches_with_the_runs_model(ws, monkeypatch, capsys):
    # an index a newer install built in a shared folder, searched by an older onnxruntime (pyproject admits 1.17):
    # its ONNX export's load was a traceback
    from test_weights import stamped_newer

    assert vlpcache(monkeypatch, capsys, "index", "--quiet")[0] == 0
    code, before, _ = vlpcache(monkeypatch, capsys, "search", "a dog runs", "--json", "-k", 3)
    assert code == 0
    graph = the_index(ws) / "query" / "text_encoder.onnx"
    graph.write_bytes(stamped_newer(graph.read_bytes(), "ir_version"))
    code, after, err = vlpcache(monkeypatch, capsys, "search", "a dog runs", "--json", "-k", 3)
    assert code == 0 and "Traceback" not in err
    assert f"note: {graph}: ONNX IR version " in err and "; searching with the run's model (torch) meanwhile" in err
    hits = lambda out: [(hit["id"], round(hit["score"], 3)) for hit in json.loads(out)["results"]]  # noqa: E731
    assert hits(before) and hits(after) == hits(before)
