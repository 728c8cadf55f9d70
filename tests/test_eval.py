"""`vlpcache eval` end to end on a tiny trained run and a real cache, and its re-rank bookkeeping."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from broken_media import damage_chunk
from test_search import build_tiny_workspace, hand_local_score, vlpcache
from vlpcache.cache.reader import RegionCache
from vlpcache.captions import read_captions
from vlpcache.metrics import reranked, retrieval_metrics, top_candidates
from vlpcache.model.batch import tokenize, video_batch
from vlpcache.model.checkpoint import load_run
from vlpcache.model.run_layout import read_run_videos


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    build_tiny_workspace(root)
    return root


@pytest.fixture
def ws(root, monkeypatch):
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(root / "ws"))
    return root / "ws"


def eval_json(monkeypatch, capsys, *args) -> dict:
    code, out, err = vlpcache(monkeypatch, capsys, "eval", *args, "--json", "--quiet")
    assert code == 0, err
    return json.loads(out)


def test_eval_reports_both_directions_with_and_without_rerank(root, ws, monkeypatch, capsys):
    results = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl")
    # expected from the run's own embeddings (float16 words and regions, as eval keeps them), S_loc by hand
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    captions = read_captions(root / "val.jsonl").by_id
    ids = [i for i in cache.ids if i in captions]
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([cache.get(i) for i in ids]))
        text = run.model.encode_text(*tokenize(run.tokenizer, [captions[i][0] for i in ids], run.config.max_words))
    t2v = (text.global_ @ video.global_.T).numpy()  # (8 first captions, 8 videos)
    local = np.array([[hand_local_score(text.words[q][text.word_mask[q]].half().float().numpy(),
                                        video.regions[v][video.region_mask[v]].half().float().numpy(), run.config.rwa_lambda)
                       for v in range(len(ids))] for q in range(len(ids))])
    every = np.tile(np.arange(len(ids)), (len(ids), 1))  # 8 candidates: all of them are re-ranked
    weight, own = run.config.rerank_weight, np.arange(len(ids))
    expected = {
        "text_to_video": retrieval_metrics(t2v, own),
        "video_to_text": retrieval_metrics(t2v.T, own),
        "text_to_video_rerank": retrieval_metrics(reranked(t2v, every, local, weight), own),
        "video_to_text_rerank": retrieval_metrics(reranked(t2v.T, every, local.T, weight), own),
    }
    for key, metrics in expected.items():
        assert results[key] == pytest.approx(metrics), key
    assert results["text_to_video"]["queries"] == 8 and results["text_to_video"]["candidates"] == 8
    assert results["protocol"]["captions_per_video"] == "first"


def test_global_metrics_equal_retrieval_metrics_on_the_models_own_similarities(root, ws, monkeypatch, capsys):
    results = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl", "--rerank-candidates", "0")
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    captions = read_captions(root / "val.jsonl").by_id
    ids = [i for i in cache.ids if i in captions]
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([cache.get(i) for i in ids])).global_
        text = run.model.encode_text(*tokenize(run.tokenizer, [captions[i][0] for i in ids], run.config.max_words)).global_
    expected = retrieval_metrics((text @ video.T).numpy(), np.arange(len(ids)))
    assert results["text_to_video"] == pytest.approx(expected)
    assert "text_to_video_rerank" not in results


def test_a_candidate_found_damaged_counts_as_a_video_without_frames_said_in_one_line(root, tmp_path, monkeypatch,
                                                                                   capsys):
    ws = tmp_path / "ws"
    shutil.copytree(root / "ws", ws)
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(ws))
    shard = sorted((ws / "cache" / "shards").glob("*.h5"))[1]  # v16 ... v23: the validation videos
    damage_chunk(shard, "features", 1)  # v17
    cache = RegionCache(ws / "cache")  # made before eval records v17 (later readers leave it out)
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--rerank-candidates", "0",
                              "--json", "--quiet")
    [line] = [line for line in err.splitlines() if "cannot be read" in line]  # (and one: the run's validation videos)
    assert line.startswith(f"{shard}: item 'v17' cannot be read (")
    assert line.endswith("extracts it again; eval counts it as a video without frames (its captions' queries rank it by "
                        "nothing it shows)")
    run, captions = load_run(ws / "runs" / "run-001"), read_captions(root / "val.jsonl").by_id
    ids = [i for i in cache.ids if i in captions]
    assert "v17" in ids and "v17" in RegionCache(ws / "cache").damaged
    with torch.inference_mode():
        items = [cache.blank(cache.index_of(i)) if i == "v17" else cache.get(i) for i in ids]
        video = run.model.encode_video(**video_batch(items)).global_
        text = run.model.encode_text(*tokenize(run.tokenizer, [captions[i][0] for i in ids], run.config.max_words)).global_
    results = json.loads(out)
    assert results["text_to_video"] == pytest.approx(retrieval_metrics((text @ video.T).numpy(), np.arange(len(ids))))
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--rerank-candidates", "0",
                              "--json")  # recorded by now: the cache leaves v17 out, eval keeps it a candidate
    assert code == 0 and "8 captioned videos of 23 cached" in err
    assert "1 of them found damaged, counted as videos without frames" in err and "cannot be read" not in err
    assert json.loads(out)["text_to_video"] == results["text_to_video"]


def test_split_evaluates_the_videos_of_one_split_of_a_file_that_has_several(root, ws, monkeypatch, capsys, tmp_path):
    # one file for every split, as Karpathy's and MSR-VTT's are: the val videos split as test and val
    captions = read_captions(root / "val.jsonl").by_id
    ids = [i for i in RegionCache(ws / "cache").ids if i in captions]
    split = {item_id: "test" if n < 5 else "val" for n, item_id in enumerate(ids)}
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"video": i, "captions": captions[i], "split": split[i]}) + "\n" for i in ids))
    test = eval_json(monkeypatch, capsys, "--captions", path, "--split", "TEST", "--rerank-candidates", "0")
    assert test["text_to_video"]["queries"] == 5 and test["text_to_video"]["candidates"] == 5
    assert test["run"]["split"] == "TEST"

    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", path, "--rerank-candidates", "0")
    assert "; no re-rank (--rerank-candidates 0), " in out and "top 0" not in out
    assert code == 0 and (f"eval: {path} has videos of several splits (5 test, 3 val), all evaluated together: "
                          "--split NAME evaluates one") in err.splitlines()
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", path, "--split", "train")
    assert code == 2 and err.strip().splitlines() == [f"error: {path}: no video of split 'train' (its splits: test, val)"]


def test_a_run_moved_with_its_data_still_knows_its_training_captions(tmp_path):
    # the run's config records absolute paths: after a move, eval scored the training set without a word
    from vlpcache.index.evaluate import _seen_by_id

    old, new = tmp_path.resolve() / "old", tmp_path.resolve() / "new"
    (new / "data" / "cache").mkdir(parents=True)
    (new / "data" / "train.jsonl").write_text("".join(json.dumps({"video": f"v{i}", "caption": "a dog"}) + "\n"
                                                      for i in range(3)))
    (new / "runs" / "run-001").mkdir(parents=True)
    (new / "runs" / "run-001" / "config.json").write_text(json.dumps({"train": {
        "caches": [str(old / "data" / "cache")], "captions": [str(old / "data" / "train.jsonl")],
        "val_captions": None, "made_in": str(old / "runs" / "run-001")}}))
    seen = _seen_by_id(new / "runs" / "run-001", new / "data" / "cache", new / "data" / "train.jsonl",
                       read_captions(new / "data" / "train.jsonl"), False)
    assert seen.trained == 3 and seen.training_files == (str(new / "data" / "train.jsonl"),)


def test_the_same_videos_evaluated_from_another_cache_under_other_ids_are_said(tmp_path):
    # a run trained on frames/video65xx of one cache, evaluated on val/video65xx of another (extracted again from
    # another root): eval said nothing, and 28 of the 31 R@1 hits were videos it trained on
    from vlpcache.captions import Captions
    from vlpcache.index.evaluate import seen_by_run
    from vlpcache.extract.stamps import source_stamp
    from vlpcache.model.run_layout import save_run_videos
    from test_pretrain import write_cache

    (tmp_path / "data").mkdir()
    (tmp_path / "copy").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"v{i}.mp4").write_bytes(f"video {i}".encode() * 1000)
        shutil.copy(tmp_path / "data" / f"v{i}.mp4", tmp_path / "copy" / f"v{i}.mp4")  # another time, same content
    run = tmp_path / "runs" / "run-001"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {
        "caches": [str(tmp_path / "cache")], "captions": [str(tmp_path / "train.jsonl")], "val_captions": None,
        "made_in": str(run)}}))
    save_run_videos(run, [f"frames/v{i}" for i in range(3)], [],
                    trained_stamps=[source_stamp(tmp_path / "data" / f"v{i}.mp4") for i in range(3)])
    write_cache(tmp_path / "other", 4, sources=[(tmp_path / "copy" / f"v{i}.mp4", "video") for i in range(4)])
    captions = Captions({f"v{i}": ["a dog"] for i in range(4)})
    seen = seen_by_run(run, RegionCache(tmp_path / "other"), tmp_path / "test.jsonl", captions, False)
    assert (seen.trained, seen.same_content) == (0, 3)
    assert seen.line(tmp_path / "test.jsonl", 4) == (
        "eval: 3 of these 4 videos are files the run trained on (the same content, in another cache or under other "
        "ids): the figures say how well it fits them, not how it finds videos it has not seen; evaluate on videos "
        "held out from training")
    (tmp_path / "copy" / "v0.mp4").write_bytes(b"another video" * 1000)  # other content under the same name
    write_cache(tmp_path / "again", 4, sources=[(tmp_path / "copy" / f"v{i}.mp4", "video") for i in range(4)])
    assert seen_by_run(run, RegionCache(tmp_path / "again"), tmp_path / "test.jsonl", captions, False).same_content == 2


def test_the_videos_a_runs_init_run_trained_or_validated_on_are_said_with_the_init_as_the_reason(tmp_path):
    # a run fine-tuned with --init on another cache re-ranks at the weight its init run chose on its validation:
    # eval on those videos said nothing, and on the init's training videos "the same content, in another cache"
    from vlpcache.captions import Captions
    from vlpcache.extract.stamps import source_stamp
    from vlpcache.index.evaluate import seen_by_run
    from vlpcache.model.run_layout import read_trained_content, save_run_videos
    from test_pretrain import write_cache

    (tmp_path / "data").mkdir()
    for i in range(6):
        (tmp_path / "data" / f"v{i}.mp4").write_bytes(f"video {i}".encode() * 1000)
    write_cache(tmp_path / "msr", 6, sources=[(tmp_path / "data" / f"v{i}.mp4", "video") for i in range(6)])
    parent, child = tmp_path / "runs" / "parent", tmp_path / "runs" / "child"
    for run, cache, val in ((parent, "msr", tmp_path / "val.jsonl"), (child, "flickr", None)):
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"train": {
            "caches": [str(tmp_path / cache)], "captions": [str(tmp_path / f"{cache}.jsonl")],
            "val_captions": val and str(val), "made_in": str(run)}, **({"init": {"run": str(parent)}} if run == child
                                                                         else {})}))
    stamps = [source_stamp(tmp_path / "data" / f"v{i}.mp4") for i in range(4)]
    save_run_videos(parent, [f"v{i}" for i in range(4)], ["v4", "v5"], trained_stamps=stamps)
    save_run_videos(child, ["w0"], [], inherited=read_run_videos(parent)[0], inherited_content=read_trained_content(parent))
    msr = RegionCache(tmp_path / "msr")
    seen = seen_by_run(child, msr, tmp_path / "val.jsonl", Captions({f"v{i}": ["a dog"] for i in (4, 5)}), False)
    assert seen.line(tmp_path / "val.jsonl", 2) == (
        f"eval: 2 of these 2 videos are the validation videos ({tmp_path / 'val.jsonl'}) of the run this one started "
        f"from (--init: {parent}): the checkpoint it started from and its re-rank weight were chosen on these captions, "
        "so the figures lean optimistic; report them on a test file")
    seen = seen_by_run(child, msr, tmp_path / "msr.jsonl", Captions({f"v{i}": ["a dog"] for i in range(6)}), False)
    assert seen.line(tmp_path / "msr.jsonl", 6) == (
        f"eval: 4 of these 6 videos were trained on by the run this one started from (--init: {parent}) with these "
        f"captions ({tmp_path / 'msr.jsonl'} is one of its training caption files) (2 more are its validation videos, "
        "on which its best epoch was chosen): the figures say how well it fits them, not how it finds videos it has "
        "not seen; evaluate on held-out captions (a val or test file, or --split test)")
    assert seen_by_run(parent, msr, tmp_path / "val.jsonl", Captions({"v4": ["a dog"]}), False).init_run is None


def test_eval_on_the_runs_training_captions_says_the_figures_measure_fit(root, ws, monkeypatch, capsys, tmp_path):
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "train.jsonl", "--json", "--quiet")
    assert code == 0 and json.loads(out)["run"]["videos_trained_on"] == 16
    assert err.splitlines() == [f"eval: 16 of these 16 videos were trained on with these captions ({root / 'train.jsonl'} "
                                "is one of the run's training caption files): the figures say how well it fits them, not "
                                "how it finds videos it has not seen; evaluate on held-out captions (a val or test file, "
                                "or --split test)"]  # under --quiet too
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--json", "--quiet")
    assert code == 0 and json.loads(out)["run"]["videos_trained_on"] == 0 and json.loads(out)["run"]["validation_videos"] == 8
    assert err.splitlines() == [f"eval: 8 of these 8 videos are the run's validation videos ({root / 'val.jsonl'}): its "
                                "best epoch and re-rank weight were chosen on these captions, so the figures lean "
                                "optimistic; report them on a test file"]
    # the same file read through another path is the same file
    monkeypatch.chdir(root)
    assert eval_json(monkeypatch, capsys, "--captions", "train.jsonl")["run"]["videos_trained_on"] == 16
    # the same videos captioned in another file (here a copy): the run's record of its videos (videos.npz) tells
    run = ws / "runs" / "run-001"
    trained, validation = read_run_videos(run)
    assert len(trained) == 16 and len(validation) == 8
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (copies / name).write_text((root / name).read_text().replace('"a ', '"one '))
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", copies / "train.jsonl", "--json", "--quiet")
    assert code == 0 and json.loads(out)["run"]["videos_trained_on"] == 16
    assert err.splitlines() == [f"eval: 16 of these 16 videos were trained on, with the captions of the run's training "
                                f"files ({root / 'train.jsonl'}): the figures say how well it fits them, not how it finds "
                                "videos it has not seen; evaluate on videos held out from training"]
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", copies / "val.jsonl", "--json", "--quiet")
    assert code == 0 and json.loads(out)["run"]["validation_videos"] == 8
    assert err.splitlines() == [f"eval: 8 of these 8 videos are the run's validation videos (of {root / 'val.jsonl'}): its "
                                "best epoch and re-rank weight were chosen on them, so the figures lean optimistic; "
                                "report them on a test file"]
    # a run made before the record was kept: pretraining's split rules, for the same file only
    (run / "videos.npz").rename(tmp_path / "videos.npz")
    assert eval_json(monkeypatch, capsys, "--captions", copies / "train.jsonl")["run"]["videos_trained_on"] == 0
    # one file of several splits trained and validated on (its train and val splits, as pretraining chooses them)
    captions = read_captions(root / "train.jsonl").by_id
    config = json.loads((run / "config.json").read_text())
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"video": i, "captions": c, "split": ("test", "val", "train")[min(n // 4, 2)]})
                            + "\n" for n, (i, c) in enumerate(captions.items())))  # 4 test, 4 val, 8 train
    (run / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "captions": [str(path)],
                                                                       "val_captions": str(path)}}))
    try:
        test = eval_json(monkeypatch, capsys, "--captions", path, "--split", "test")["run"]
        assert test["videos_trained_on"] == 0 and test["validation_videos"] == 0  # held out from both
        assert eval_json(monkeypatch, capsys, "--captions", path, "--split", "val")["run"]["validation_videos"] == 4
        assert eval_json(monkeypatch, capsys, "--captions", path)["run"]["videos_trained_on"] == 8
        # a validation file whose splits hold no validation split: pretraining validated on all of it
        path.write_text("".join(json.dumps({"video": i, "captions": c, "split": ("test", "dev")[n % 2]}) + "\n"
                                for n, (i, c) in enumerate(captions.items())))  # 8 test, 8 dev
        test = eval_json(monkeypatch, capsys, "--captions", path, "--split", "test")["run"]
        assert test["validation_videos"] == 8 and test["videos_trained_on"] == 0
    finally:
        (run / "config.json").write_text(json.dumps(config))
        (tmp_path / "videos.npz").rename(run / "videos.npz")


@pytest.mark.parametrize("max_words, repeat", [(None, 1), (6, 1), (None, 16)])
def test_paragraphs_make_one_query_of_each_videos_captions_cut_at_max_words(root, ws, monkeypatch, capsys, tmp_path,
                                                                             max_words, repeat):
    # repeat 16: paragraphs longer than the tiny text model's 64 positions, which the default of 128 would pass on
    captions = read_captions(root / "val.jsonl").by_id
    path = tmp_path / "paragraphs.jsonl"
    path.write_text("".join(json.dumps({"video": i, "captions": texts * repeat}) + "\n" for i, texts in captions.items()))
    extra = ("--max-words", max_words) if max_words else ()
    results = eval_json(monkeypatch, capsys, "--captions", path, "--paragraphs", *extra, "--rerank-candidates", "0")
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    ids = [i for i in cache.ids if i in captions]
    words = max_words or 64  # the default of 128 tokens, down to the text model's 64 positions
    paragraphs = [" ".join(captions[i] * repeat) for i in ids]
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([cache.get(i) for i in ids])).global_
        text = run.model.encode_text(*tokenize(run.tokenizer, paragraphs, words)).global_
    assert results["text_to_video"] == pytest.approx(retrieval_metrics((text @ video.T).numpy(), np.arange(len(ids))))
    assert results["protocol"]["captions_per_video"] == "paragraph" and results["protocol"]["max_words"] == words
    assert results["text_to_video"]["queries"] == 8
    # the paragraphs longer than that are counted: all 8 at 6 tokens and when repeated, none otherwise
    lengths = [len(run.tokenizer(paragraph)["input_ids"]) for paragraph in paragraphs]
    assert results["protocol"]["queries_cut"] == sum(n > words for n in lengths) == (0 if (max_words, repeat) == (None, 1) else 8)


def test_eval_of_segment_sentences_says_they_query_whole_videos_and_suggests_paragraphs(root, ws, monkeypatch, capsys,
                                                                                        tmp_path):
    captions = read_captions(root / "val.jsonl").by_id
    path = tmp_path / "val_1.json"  # ActivityNet Captions: each sentence describes a segment of its video
    path.write_text(json.dumps({i: {"duration": 9.0, "timestamps": [[0, 4]] * len(texts), "sentences": texts}
                                for i, texts in captions.items()}))
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", path)
    assert code == 0, err
    assert (f"note: {path} (ActivityNet Captions, each segment's sentence taken as a caption of its whole video; eval "
            "--paragraphs joins them into one query per video, the paragraph-to-video protocol)") in err.splitlines()
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", path, "--paragraphs")
    assert code == 0 and "segment" not in err


def test_max_words_past_positions_of_the_text_model_is_one_line(root, ws, monkeypatch, capsys):
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--max-words", 100)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "error: --max-words 100: the text model" in err and "reads at most 64 tokens; give 64 or fewer" in err


def test_all_captions_makes_every_caption_a_query(root, ws, monkeypatch, capsys):
    results = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl", "--all-captions", "--rerank-candidates", "0")
    assert results["text_to_video"]["queries"] == 16  # two non-empty captions per video
    assert results["video_to_text"]["queries"] == 8 and results["video_to_text"]["candidates"] == 16
    # a video is found at the best rank of any of its captions
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    captions = read_captions(root / "val.jsonl").by_id
    ids = [i for i in cache.ids if i in captions]
    texts = [(v, text) for v, i in enumerate(ids) for text in captions[i]]
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([cache.get(i) for i in ids])).global_
        text = run.model.encode_text(*tokenize(run.tokenizer, [t for _, t in texts], run.config.max_words)).global_
    similarity = (text @ video.T).numpy()  # (16, 8)
    ranks = []
    for v in range(len(ids)):
        own = [q for q, (owner, _) in enumerate(texts) if owner == v]
        others = [q for q, (owner, _) in enumerate(texts) if owner != v]
        best = similarity[own, v].max()
        ranks.append(1 + int((similarity[others, v] >= best).sum()))
    assert results["video_to_text"]["MnR"] == pytest.approx(np.mean(ranks))
    assert results["video_to_text"]["R@1"] == pytest.approx(100 * np.mean(np.array(ranks) == 1))
    assert results["text_to_video"] == pytest.approx(retrieval_metrics(similarity, [v for v, _ in texts]))


def test_eval_prints_a_table_by_default(root, ws, monkeypatch, capsys):
    code, out, _ = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--quiet")
    assert code == 0
    assert out.splitlines()[0].split() == ["R@1", "R@5", "R@10", "MdR", "MnR"]
    assert out.splitlines()[2].startswith("text->video re-ranked")
    assert "queries (first caption per video, up to 32 tokens)" in out.splitlines()[-1]
    code, out, _ = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--quiet", "--all-captions")
    weight = json.loads(vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--quiet",
                                 "--json")[1])["protocol"]["rerank_weight"]
    assert out.splitlines()[-1].startswith("text->video: 16 queries (every caption of each video, up to 32 tokens), 8 "
                                           "candidate videos; video->text: 8 queries, their 16 captions the candidates; "
                                           f"re-rank of all 8 at weight {weight:g}, ")  # not "of the top 32" among 8
    from vlpcache.index.evaluate import rerank_said  # a run whose validation found the re-rank no help says so

    assert rerank_said(32, 1000, 0.0) == ("re-rank of the top 32 at weight 0 (the run's validation chose none: its rows "
                                          "are the global ones)")


def test_captions_of_videos_not_cached_are_counted_with_an_example(root, ws, monkeypatch, capsys, tmp_path):
    captions = tmp_path / "val.jsonl"
    captions.write_text((root / "val.jsonl").read_text() + json.dumps({"video": "not-here", "captions": ["x"]}) + "\n")
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", captions)
    assert code == 0 and "(1 caption entries without a cached video (e.g. 'not-here'))" in err, err


def test_a_file_of_trained_and_validation_videos_says_both():
    from vlpcache.index.evaluate import Seen

    line = Seen(trained=300, validated=60, same_file=True).line("captions.jsonl", 420)
    assert line == ("eval: 300 of these 420 videos were trained on with these captions (captions.jsonl is one of the "
                    "run's training caption files) (60 more are its validation videos, on which its best epoch was "
                    "chosen): the figures say how well it fits them, not how it finds videos it has not seen; evaluate "
                    "on held-out captions (a val or test file, or --split test)")


def test_eval_of_a_run_being_trained_says_its_checkpoint_may_still_change(root, ws, monkeypatch, capsys):
    from vlpcache.locks import WriterLock

    with WriterLock.take(ws / "runs" / "run-001" / "pretrain.lock"):  # as its trainer holds it
        code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl")
    assert code == 0 and re.search(r"^note: run-001 is being trained now \(pid \d+ on .*\): this is its epoch 1, the "
                                   r"best so far; a later epoch may replace it$", err, re.M), err
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl")
    assert "being trained" not in err


def test_ctrl_c_during_eval_says_nothing_is_lost_not_that_it_resumes(root, ws, monkeypatch, capsys):
    import vlpcache.index.evaluate as evaluate

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", stopped)
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--quiet")
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == "interrupted; eval writes nothing, so nothing is lost: run it again for the figures"


def test_captions_of_videos_not_in_the_cache_are_one_line_error(tmp_path, ws, monkeypatch, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"video": "elsewhere", "captions": ["a dog"]}) + "\n")
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", other)
    assert code == 2 and "none of its 1 videos is in cache" in err and err.count("\n") == 1


def test_captions_naming_their_videos_by_file_path_score_as_those_keyed_by_id(root, ws, tmp_path, monkeypatch, capsys):
    records = [json.loads(line) for line in (root / "val.jsonl").read_text().splitlines()]
    by_path = tmp_path / "val-by-path.jsonl"
    by_path.write_text("".join(json.dumps({**r, "video": f"/data/videos/{r['video']}.mp4"}) + "\n" for r in records))
    expected = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl")
    results = eval_json(monkeypatch, capsys, "--captions", by_path)
    assert results["text_to_video"] == expected["text_to_video"] and results["text_to_video"]["queries"] == 8
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", by_path)
    assert code == 0 and "8 caption ids name their video by file name or path (e.g. '/data/videos/v16.mp4' for 'v16')" in err


def test_reranked_candidates_stay_above_the_rest_in_their_new_order():
    similarity = np.array([[0.9, 0.8, 0.7, 0.1]])
    top = top_candidates(similarity, 2)
    assert sorted(top[0]) == [0, 1]
    local = -2 * similarity[0, top[0]][None]  # global + 1 * local reverses the top 2
    order = list(np.argsort(-reranked(similarity, top, local, 1.0)[0]))
    assert order == [1, 0, 2, 3]


def test_qbnorm_ranks_with_a_bank_of_the_runs_training_captions_and_dual_softmax_is_labelled_eval_only(
        root, ws, monkeypatch, capsys):
    from vlpcache.querybank import QueryBank

    results = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl", "--qbnorm", "--dual-softmax",
                        "--rerank-candidates", "0")
    # the same ranking from the bank computed here, from the training file itself
    run, cache = load_run(ws / "runs" / "run-001"), RegionCache(ws / "cache")
    val = read_captions(root / "val.jsonl").by_id
    bank_texts = sorted({c for texts in read_captions(root / "train.jsonl").by_id.values() for c in texts})
    assert results["protocol"]["qbnorm"]["bank"] == len(bank_texts)
    ids = [i for i in cache.ids if i in val]
    with torch.inference_mode():
        video = run.model.encode_video(**video_batch([cache.get(i) for i in ids])).global_.numpy()
        text = run.model.encode_text(*tokenize(run.tokenizer, [val[i][0] for i in ids], run.config.max_words)).global_
        bank = run.model.encode_text(*tokenize(run.tokenizer, bank_texts, run.config.max_words)).global_.numpy()
    expected = retrieval_metrics(QueryBank.build(bank, video).normalise(text.numpy() @ video.T), np.arange(len(ids)))
    assert results["text_to_video_qbnorm"] == pytest.approx(expected, abs=1e-6)
    assert {"R@1", "MdR"} <= set(results["text_to_video_dual_softmax"])
    code, out, _ = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--quiet", "--dual-softmax")
    assert "dual softmax (eval only" in out


def test_the_query_bank_holds_only_captions_of_videos_the_run_trained_on(root, ws, tmp_path):
    # a training file that also captions the run's validation videos and videos of no cache of the run (its test
    # set: a caption file of a whole collection) put those captions, eval's queries, into eval's query bank
    from types import SimpleNamespace

    from vlpcache.index.build import run_training_captions

    run_dir = tmp_path / "run"
    shutil.copytree(ws / "runs" / "run-001", run_dir)
    train, val = read_captions(root / "train.jsonl").by_id, read_captions(root / "val.jsonl").by_id
    lines = [{"video": f"{i}.mp4" if n % 2 else i, "captions": texts} for n, (i, texts) in enumerate(train.items())]
    lines += [{"video": i, "captions": texts} for i, texts in val.items()] + [{"video": "elsewhere", "captions": ["a test query"]}]
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["captions"] = [str(whole)]
    (run_dir / "config.json").write_text(json.dumps(config))
    said = []
    bank = run_training_captions(SimpleNamespace(run_dir=run_dir), "query bank", False, said.append)
    assert sorted(bank) == sorted(c for texts in train.values() for c in texts) and not said  # keys by file name too
    (run_dir / "videos.npz").unlink()  # a run made before the record was kept: every training caption
    assert len(run_training_captions(SimpleNamespace(run_dir=run_dir), "query bank", False, said.append)) == len(
        [c for line in lines for c in line["captions"]])


def test_per_query_records_give_each_querys_ranks_and_best_candidates(root, ws, monkeypatch, capsys, tmp_path):
    """--per-query FILE: one JSON line per text->video query; its ranks are the ones the table summarises,
    and a query whose video ranks first has it first among its best candidates."""
    out = tmp_path / "queries.jsonl"
    results = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl", "--all-captions", "--qbnorm",
                        "--per-query", out)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    captions = read_captions(root / "val.jsonl").by_id
    assert [(r["query"], r["video"]) for r in records] == [(c, v) for v, texts in captions.items() for c in texts]
    assert "per_query" not in results
    for key, rank in (("text_to_video", "rank"), ("text_to_video_rerank", "rank_reranked"),
                      ("text_to_video_qbnorm", "rank_qbnorm")):
        ranks = np.array([r[rank] for r in records])
        assert results[key]["R@1"] == pytest.approx(100 * np.mean(ranks <= 1)), key
        assert results[key]["R@5"] == pytest.approx(100 * np.mean(ranks <= 5)), key
        assert results[key]["MdR"] == pytest.approx(np.median(ranks)), key
    for r in records:
        assert len(r["top"]) == 5 and len(r["top_reranked"]) == 5
        scores = [score for _, score in r["top"]]
        assert scores == sorted(scores, reverse=True)
        assert (r["top"][0][0] == r["video"]) == (r["rank"] == 1)
        assert (r["top_reranked"][0] == r["video"]) == (r["rank_reranked"] == 1)
    # a folder that does not exist is one line, before any encoding
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--per-query",
                            tmp_path / "nope" / "q.jsonl")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope' / 'q.jsonl'}: no such folder {tmp_path / 'nope'}; create it first"


def test_queries_mostly_unknown_to_the_text_model_are_said_under_quiet_too(root, ws, monkeypatch, capsys, tmp_path):
    ids = list(read_captions(root / "val.jsonl").by_id)
    path = tmp_path / "zh.jsonl"
    path.write_text("".join(json.dumps({"video": i, "captions": ["一个女人在厨房里做饭" if n % 2 else "a cat"]},
                                       ensure_ascii=False) + "\n" for n, i in enumerate(ids)), encoding="utf-8")
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", path, "--quiet", "--json")
    assert code == 0, err
    json.loads(out)  # the figures stay valid JSON on stdout; the note is on stderr
    unknown = len(ids) // 2
    assert (f"note: {unknown} of the {len(ids)} queries ({unknown / len(ids):.0%}) are mostly words the text model"
            in err) and ('e.g. "一个女人在厨房里做饭": it reads them as unknown tokens or single letters, and their ranks '
                         "say little about the model; for another language, a multilingual text model reads them: "
                         "pretrain --text-model NAME|DIR") in err
    code, _, err = vlpcache(monkeypatch, capsys, "eval", "--captions", root / "val.jsonl", "--quiet")
    assert code == 0 and "does not know" not in err


def test_eval_tokenizes_its_queries_once_for_both_counts_cut_and_unknown(root, ws, monkeypatch, capsys, tmp_path):
    from transformers import PreTrainedTokenizerBase

    counted = []  # the texts of each tokenizer call made for counting (read_texts asks for the special tokens' mask)
    call = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        if kwargs.get("return_special_tokens_mask"):
            counted.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    captions = read_captions(root / "val.jsonl").by_id
    path = tmp_path / "zh.jsonl"  # half the queries mostly unknown words: the note's count is taken from the same read
    path.write_text("".join(json.dumps({"video": i, "captions": [*texts, "一个女人在厨房里做饭" * (n % 2)]},
                                       ensure_ascii=False) + "\n" for n, (i, texts) in enumerate(captions.items())),
                    encoding="utf-8")
    code, out, err = vlpcache(monkeypatch, capsys, "eval", "--captions", path, "--all-captions", "--max-words", "6",
                              "--rerank-candidates", "0", "--json")
    assert code == 0, err
    protocol = json.loads(out)["protocol"]
    assert counted == [protocol["queries"]]  # once, not once for each count
    run = load_run(ws / "runs" / "run-001")
    texts = [t for texts in read_captions(path).by_id.values() for t in texts]
    assert protocol["queries_cut"] == sum(len(run.tokenizer(t)["input_ids"]) > 6 for t in texts) > 0
    unknown = len(captions) // 2
    assert f"note: {unknown} of the {len(texts)} queries ({unknown / len(texts):.0%}) are mostly words" in err


def test_eval_in_blocks_of_a_few_rows_prints_and_records_what_the_whole_matrix_gives(root, ws, monkeypatch, capsys,
                                                                                    tmp_path):
    from vlpcache.index import evaluate

    args = ["--captions", root / "val.jsonl", "--all-captions", "--qbnorm", "--dual-softmax"]
    whole = eval_json(monkeypatch, capsys, *args, "--per-query", tmp_path / "whole.jsonl")
    monkeypatch.setattr(evaluate, "DENSE_SCORES", 0)  # blocks of 3 or 4 rows, both directions
    monkeypatch.setattr(evaluate, "BLOCK_SCORES", 1)
    monkeypatch.setattr(evaluate, "MIN_BLOCK_ROWS", 3)
    blocks = eval_json(monkeypatch, capsys, *args, "--per-query", tmp_path / "blocks.jsonl")
    assert whole["protocol"]["queries"] > 8 and "text_to_video_rerank" in whole and "text_to_video_dual_softmax" in whole
    for results in (whole, blocks):
        results["protocol"].pop("seconds")
    assert blocks == whole
    assert (tmp_path / "blocks.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


def test_eval_ranks_thousands_of_candidates_without_holding_their_square(monkeypatch):
    import tracemalloc

    from vlpcache.index import evaluate
    from vlpcache.metrics import query_ranks

    monkeypatch.setattr(evaluate, "DENSE_SCORES", 0)
    monkeypatch.setattr(evaluate, "BLOCK_SCORES", 1 << 18)  # blocks of 272 or 273 rows of 3000
    n = 3000
    text, video = (torch.nn.functional.normalize(torch.randn(n, 32, generator=torch.Generator().manual_seed(s)), dim=1)
                   for s in (0, 1))
    local = np.random.default_rng(0).random((n, 32)).astype(np.float32)
    targets = list(range(n))
    tracemalloc.start()
    scores = evaluate.GlobalScores.of(text, video)  # (n, n)
    top = evaluate.top_candidates_of(scores, 32)
    rankings = [evaluate.Ranks(targets, keep_best=True),
                evaluate.Ranks(targets, lambda rows, block: reranked(block, top[rows], local[rows], 0.5)),
                evaluate.Ranks(targets, evaluate.dual_softmax_of(scores))]
    evaluate.over_blocks(scores, *rankings)
    video_ranks = evaluate.Ranks([[c] for c in targets])
    evaluate.over_blocks(scores.transposed(), video_ranks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * n * 8 / 3, f"{peak / 1e6:.0f} MB"  # a float64 copy of the whole (n, n) is 72 MB
    similarity = (text @ video.T).numpy()
    assert np.array_equal(rankings[0].ranks, query_ranks(similarity, targets))
    assert np.array_equal(video_ranks.ranks, query_ranks(similarity.T, targets))
    assert np.array_equal(rankings[1].ranks, query_ranks(reranked(similarity, top, local, 0.5), targets))
