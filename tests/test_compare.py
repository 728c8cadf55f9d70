"""`vlpcache compare`: two models' `eval --per-query` records of the same queries, side by side with a
paired-bootstrap interval of the difference."""

import json

import numpy as np
import pytest

from test_eval import eval_json, root, ws  # noqa: F401 (fixtures: the tiny trained run and its captions)
from test_search import vlpcache
from vlpcache.index.compare import Side, compare, weighted_medians


def write_records(path, ranks, queries=None, key="rank"):
    """A per-query file as eval writes it, with the given ranks."""
    queries = queries or [(f"caption {q}", f"video{q % 50}") for q in range(len(ranks))]
    with open(path, "w", encoding="utf-8") as f:
        for (query, video), rank in zip(queries, ranks):
            f.write(json.dumps({"query": query, "video": video, key: int(rank), "top": []}, ensure_ascii=False) + "\n")
    return path


def compare_json(monkeypatch, capsys, *args) -> dict:
    code, out, err = vlpcache(monkeypatch, capsys, "compare", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_compare_gives_each_evals_own_figures_and_their_difference(root, ws, monkeypatch, capsys, tmp_path):  # noqa: F811
    """Two evaluations of the same queries (full queries, and queries cut at 4 tokens): each side's R@K and
    MdR are the ones its eval printed, B - A is their difference, and the interval holds it."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    full = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl", "--all-captions", "--per-query", a)
    cut = eval_json(monkeypatch, capsys, "--captions", root / "val.jsonl", "--all-captions", "--max-words", "4",
                    "--per-query", b)
    result = compare_json(monkeypatch, capsys, a, b)
    assert result["queries"] == full["text_to_video"]["queries"]
    for name in ("R@1", "R@5", "R@10", "MdR"):
        m = result["metrics"][name]
        assert m["a"] == pytest.approx(full["text_to_video"][name]) and m["b"] == pytest.approx(cut["text_to_video"][name])
        assert m["difference"] == pytest.approx(m["b"] - m["a"])
        assert m["interval"][0] <= m["difference"] <= m["interval"][1]
    ra = np.array([json.loads(line)["rank"] for line in a.read_text().splitlines()])
    rb = np.array([json.loads(line)["rank"] for line in b.read_text().splitlines()])
    # two different rankings, which some figure tells apart (which one depends on the tiny model's training)
    assert (ra != rb).any() and any(result["metrics"][name]["difference"] != 0 for name in ("R@1", "R@5", "R@10", "MdR"))
    assert (result["queries_b_higher"], result["queries_b_lower"], result["queries_same"]) == (
        int((rb < ra).sum()), int((rb > ra).sum()), int((rb == ra).sum()))
    # the re-ranked ranking, compared the same way
    reranked = compare_json(monkeypatch, capsys, a, b, "--ranking", "reranked")
    assert reranked["metrics"]["R@1"]["a"] == pytest.approx(full["text_to_video_rerank"]["R@1"])
    code, out, _ = vlpcache(monkeypatch, capsys, "compare", a, b)
    assert code == 0 and out.splitlines()[0] == f"compare: {result['queries']} queries, ranking global"
    assert "one run a side" in out and f"paired bootstrap over the {result['videos']} videos, each with all its queries" in out


def test_a_model_compared_with_itself_differs_by_nothing_on_every_resample(tmp_path):
    ranks = np.random.default_rng(0).geometric(0.1, size=(1, 500))
    result = compare(Side(("a",), ranks), Side(("a",), ranks.copy()), resamples=500)
    for m in result["metrics"].values():
        assert m["difference"] == 0 and m["interval"] == [0.0, 0.0]
    assert result["queries_same"] == 500 and result["first_only_a"] == result["first_only_b"] == 0


def test_a_file_given_on_both_sides_is_said(tmp_path, monkeypatch, capsys):
    a = write_records(tmp_path / "a.jsonl", np.arange(1, 21))
    code, out, err = vlpcache(monkeypatch, capsys, "compare", a, tmp_path / "." / "a.jsonl", "--resamples", "100")
    assert code == 0 and err == (f"note: {tmp_path / '.' / 'a.jsonl'} is on both sides: the same evaluation compared "
                                 "with itself differs by nothing; did you mean another file?\n"), err
    code, out, err = vlpcache(monkeypatch, capsys, "compare", a, "vs", write_records(tmp_path / "b.jsonl", np.arange(1, 21)),
                              "--resamples", "100")
    assert code == 0 and err == ""


def test_a_query_holding_a_unicode_line_separator_is_one_record(tmp_path, monkeypatch, capsys):
    # the caption reader keeps U+2028 inside a caption (its lines end at \n only), eval writes it as it is, and
    # compare read such a file as not one of eval's ("line 1: not a record of vlpcache eval --per-query")
    queries = [("a dog\u2028runs", "video0"), ("a cat\u0085sits", "video1")] + [(f"caption {q}", f"video{q}") for q in range(2, 20)]
    a = write_records(tmp_path / "a.jsonl", np.arange(1, 21), queries)
    assert "\u2028" in a.read_text(encoding="utf-8")  # written as eval writes it (ensure_ascii=False)
    b = write_records(tmp_path / "b.jsonl", np.arange(20, 0, -1), queries)
    result = compare_json(monkeypatch, capsys, a, b, "--resamples", "100")
    assert result["queries"] == 20, result


def test_files_of_the_same_queries_in_another_order_are_compared_query_by_query(tmp_path, monkeypatch, capsys):
    # eval lists its queries in the cache's order: another cache of the same videos (or a row found damaged since,
    # read last) orders them otherwise, and compare refused them as "not the same queries"
    rng = np.random.default_rng(1)
    queries = [(f"caption {q % 30}", f"video{q % 40}") for q in range(60)]  # a pair twice: duplicate captions
    a_ranks, b_ranks = rng.geometric(0.2, 60), rng.geometric(0.3, 60)
    a = write_records(tmp_path / "a.jsonl", a_ranks, queries)
    aligned = write_records(tmp_path / "aligned.jsonl", b_ranks, queries)
    order = rng.permutation(60)
    shuffled = write_records(tmp_path / "shuffled.jsonl", b_ranks[order], [queries[i] for i in order])
    expected = compare_json(monkeypatch, capsys, a, aligned, "--resamples", "200")
    assert compare_json(monkeypatch, capsys, a, shuffled, "--resamples", "200") == {
        **expected, "files": {"a": [str(a)], "b": [str(shuffled)]}}
    other = write_records(tmp_path / "other.jsonl", b_ranks, [("another caption", v) for _, v in queries])
    code, _, err = vlpcache(monkeypatch, capsys, "compare", a, other)
    assert code == 2 and "not the same queries" in err


def test_the_interval_of_a_recall_difference_is_the_paired_one_not_two_independent_ones():
    """B finds at rank 1 exactly the queries A does plus 5% more: the per-query difference is 0 or 1, so
    the paired interval is 5 ± 1.96 · sqrt(0.05 · 0.95 / Q) points, far narrower than the interval two
    independent samples of the 40% and 45% recalls would give (± 1.96 · sqrt(0.4·0.6/Q + 0.45·0.55/Q))."""
    q = 4000
    rng = np.random.default_rng(1)
    a = np.where(rng.random(q) < 0.4, 1, 7)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a > 1), size=q // 20, replace=False)] = 1
    result = compare(Side(("a",), a[None]), Side(("b",), b[None]), resamples=4000, seed=3)
    low, high = result["metrics"]["R@1"]["interval"]
    half = 100 * 1.96 * np.sqrt(0.05 * 0.95 / q)
    assert result["metrics"]["R@1"]["difference"] == pytest.approx(5.0)
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(5.0, abs=0.15)
    assert result["first_only_b"] == q // 20 and result["first_only_a"] == 0


def test_a_videos_captions_are_resampled_together_not_as_independent_queries():
    """20 captions of each video with the same outcome carry no more evidence than one: resampling
    videos gives the interval of one query per video exactly, where resampling the 20 x more queries
    one by one would give one about sqrt(20) times narrower."""
    rng = np.random.default_rng(4)
    a, b = rng.geometric(0.15, size=200), rng.geometric(0.2, size=200)
    one = compare(Side(("a",), a[None]), Side(("b",), b[None]), resamples=2000, seed=5)
    videos = np.repeat(np.arange(200), 20)
    twenty = compare(Side(("a",), np.repeat(a, 20)[None]), Side(("b",), np.repeat(b, 20)[None]), videos,
                     resamples=2000, seed=5)
    loose = compare(Side(("a",), np.repeat(a, 20)[None]), Side(("b",), np.repeat(b, 20)[None]), resamples=2000, seed=5)
    assert twenty["videos"] == 200 and twenty["queries"] == 4000
    for name, m in one["metrics"].items():
        assert twenty["metrics"][name]["interval"] == pytest.approx(m["interval"]), name
        assert twenty["metrics"][name]["difference"] == pytest.approx(m["difference"]), name
    width = lambda result: np.subtract(*result["metrics"]["R@10"]["interval"][::-1])  # noqa: E731
    assert width(loose) < width(twenty) / 3


def test_weighted_medians_are_the_medians_of_the_repeated_values():
    rng = np.random.default_rng(6)
    values = rng.integers(1, 40, size=31)
    weights = rng.integers(0, 4, size=(50, 31))
    weights[:, 0] += 1  # no empty resample
    expected = [np.median(np.repeat(values, w)) for w in weights]
    assert weighted_medians(values, weights.astype(float)) == pytest.approx(expected)


def test_several_runs_a_side_give_the_mean_and_spread_of_their_figures(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(2)
    runs = {side: [rng.geometric(p, size=300) for p in ps] for side, ps in (("a", (0.1, 0.12, 0.11)), ("b", (0.2, 0.22)))}
    files = {side: [write_records(tmp_path / f"{side}{i}.jsonl", r) for i, r in enumerate(rs)] for side, rs in runs.items()}
    result = compare_json(monkeypatch, capsys, *files["a"], "vs", *files["b"], "--resamples", "300")
    assert result["runs"] == {"a": 3, "b": 2}
    for side in ("a", "b"):
        r1 = [100 * np.mean(r <= 1) for r in runs[side]]
        mdr = [np.median(r) for r in runs[side]]
        assert result["metrics"]["R@1"][side] == pytest.approx(np.mean(r1))
        assert result["metrics"]["R@1"][f"{side}_std"] == pytest.approx(np.std(r1))
        assert result["metrics"]["MdR"][side] == pytest.approx(np.mean(mdr))
    code, out, _ = vlpcache(monkeypatch, capsys, "compare", *files["a"], "vs", *files["b"], "--resamples", "300")
    assert code == 0 and " ± " in out and "the ± is the spread over each side's runs" in out


def test_files_of_other_queries_or_without_the_ranking_are_one_line_naming_them(tmp_path, monkeypatch, capsys):
    ranks = np.arange(1, 21)
    a = write_records(tmp_path / "a.jsonl", ranks)
    queries = [(f"caption {q}", f"video{q % 50}") for q in range(20)]
    queries[7] = ("another caption", "video7")
    b = write_records(tmp_path / "b.jsonl", ranks, queries)
    shorter = write_records(tmp_path / "short.jsonl", ranks[:19])
    cases = [
        ((a, b), f"error: {b}'s query 8 is 'another caption' for video7, {a}'s is 'caption 7' for video7: not the same "
                 "queries; compare evaluations of the same caption file with the same --split, --all-captions and --paragraphs"),
        ((a, shorter), f"error: {shorter} has 19 queries and {a} 20: not the same queries; compare evaluations of the "
                       "same caption file with the same --split, --all-captions and --paragraphs"),
        ((a, a, "--ranking", "qbnorm"), f"error: {a}, line 1: no qbnorm ranking (it has: global); eval writes it with --qbnorm"),
        ((a, tmp_path / "nope.jsonl"), f"error: {tmp_path / 'nope.jsonl'}: no such file; write one with vlpcache eval "
                                       f"--per-query {tmp_path / 'nope.jsonl'}"),
        ((a,), "error: compare: give two files (A.jsonl B.jsonl), or several runs a side with 'vs' between them "
               "(A1.jsonl A2.jsonl vs B1.jsonl B2.jsonl); got 1"),
        ((a, "vs"), "error: compare: give files on both sides of one 'vs': A1.jsonl A2.jsonl vs B1.jsonl B2.jsonl"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"query": "x", "video": "v", "rank": 1}\nnot json\n')
    cases.append(((a, tmp_path / "bad.jsonl"), f"error: {tmp_path / 'bad.jsonl'}, line 2: not a record of vlpcache eval "
                                               "--per-query (a JSON object with query, video and rank)"))
    for args, line in cases:
        code, out, err = vlpcache(monkeypatch, capsys, "compare", *args)
        assert (code, out, err.strip()) == (2, "", line), args
