"""`vlpcache compare`: two models on the same queries, from the records of `eval --per-query`.

Each side is one run's records, or several runs' (seeds) averaged. For R@1/5/10 and the median rank it
gives each side's figure (mean ± std over its runs), the difference B - A, and a 95% interval of that
difference from a paired bootstrap: resample the videos with replacement, each with all its queries
(one video's 20 captions are not 20 independent queries), score both sides on the same resample, take
the 2.5th and 97.5th percentiles of the differences. The interval says how far the difference would
move with other videos and queries of the same kind; the ± over runs says how far it moves with
another training seed. A claim needs both.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlpcache.errors import UserError
from vlpcache.records import json_lines
from vlpcache.report import printable, say

RANKINGS = {  # --ranking -> the record's key, and the eval option that writes it
    "global": ("rank", None),
    "reranked": ("rank_reranked", "a run with region-word alignment and --rerank-candidates above 0"),
    "qbnorm": ("rank_qbnorm", "--qbnorm"),
    "dual-softmax": ("rank_dual_softmax", "--dual-softmax"),
}
CUTOFFS = (1, 5, 10)  # R@K
RESAMPLES = 10_000
CONFIDENCE = 95  # percent
_CHUNK = 250  # resamples scored at once: bounds memory at CHUNK x Q per run
SIDES_SEPARATOR = "vs"


@dataclass(frozen=True)
class Side:
    """One model's ranks on the queries: (R, Q) int64, one row per run (seed) read."""
    paths: tuple[str, ...]
    ranks: np.ndarray


def split_sides(files: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The command's files: `A B`, or `A1 A2 ... vs B1 B2 ...` (several runs a side)."""
    if SIDES_SEPARATOR in files:
        cut = files.index(SIDES_SEPARATOR)
        a, b = list(files[:cut]), list(files[cut + 1:])
        if not a or not b or SIDES_SEPARATOR in b:
            raise UserError(f"compare: give files on both sides of one '{SIDES_SEPARATOR}': "
                            f"A1.jsonl A2.jsonl {SIDES_SEPARATOR} B1.jsonl B2.jsonl")
        return a, b
    if len(files) != 2:
        raise UserError(f"compare: give two files (A.jsonl B.jsonl), or several runs a side with '{SIDES_SEPARATOR}' "
                        f"between them (A1.jsonl A2.jsonl {SIDES_SEPARATOR} B1.jsonl B2.jsonl); got {len(files)}")
    return [files[0]], [files[1]]


def read_records(path: str, ranking: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """One `eval --per-query` file -> its (query, video) pairs in file order and their (Q,) ranks under `ranking`."""
    key, option = RANKINGS[ranking]
    name = printable(path)
    try:
        lines = json_lines(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{name}: no such file; write one with vlpcache eval --per-query {name}") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise UserError(f"{name}: not a JSON Lines file of vlpcache eval --per-query ({err.__class__.__name__})") from None
    pairs, ranks = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pair = (str(record["query"]), str(record["video"]))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{name}, line {number}: not a record of vlpcache eval --per-query "
                            "(a JSON object with query, video and rank)") from None
        if key not in record:
            have = ", ".join(k for k, (field, _) in RANKINGS.items() if field in record) or "none"
            raise UserError(f"{name}, line {number}: no {ranking} ranking (it has: {have}); "
                            + (f"eval writes it with {option}" if option else "not a record of eval --per-query"))
        pairs.append(pair)
        ranks.append(record[key])
    if not pairs:
        raise UserError(f"{name}: no records; write them with vlpcache eval --per-query {name}")
    ranks = np.asarray(ranks)
    if ranks.dtype.kind not in "iu" or ranks.min() < 1:
        raise UserError(f"{name}: a {ranking} rank that is not a whole number from 1 up; the file is not eval's")
    return pairs, ranks.astype(np.int64)


def read_sides(a_files: list[str], b_files: list[str], ranking: str) -> tuple[Side, Side, list[tuple[str, str]]]:
    """Both sides' ranks, after checking that every file holds the same queries (in the first file's order)."""
    first, first_pairs = a_files[0], None
    sides = []
    for files in (a_files, b_files):
        rows = []
        for path in files:
            pairs, ranks = read_records(path, ranking)
            if first_pairs is None:
                first_pairs = pairs
            elif pairs != first_pairs and (ranks := in_order_of(first_pairs, pairs, ranks)) is None:
                raise UserError(different_queries(first, first_pairs, path, pairs))
            rows.append(ranks)
        sides.append(Side(tuple(files), np.stack(rows)))
    return sides[0], sides[1], first_pairs


def in_order_of(first_pairs: list, pairs: list, ranks: np.ndarray) -> np.ndarray | None:
    """The ranks of `pairs` in the order of `first_pairs`, where those are the same (query, video) pairs in another
    order (eval lists the videos in its cache's order: another cache of the same videos, or a row found damaged
    since, which goes last, orders them otherwise); None where they are not the same pairs."""
    if len(pairs) != len(first_pairs) or sorted(pairs) != sorted(first_pairs):
        return None
    rows: dict[tuple, collections.deque] = {}
    for row, pair in enumerate(pairs):
        rows.setdefault(pair, collections.deque()).append(row)
    return ranks[[rows[pair].popleft() for pair in first_pairs]]


def different_queries(first: str, first_pairs: list, other: str, pairs: list) -> str:
    """The line that says where two files' queries part."""
    advice = "compare evaluations of the same caption file with the same --split, --all-captions and --paragraphs"
    if len(pairs) != len(first_pairs):
        return (f"{printable(other)} has {len(pairs):,} queries and {printable(first)} {len(first_pairs):,}: "
                f"not the same queries; {advice}")
    q = next(i for i, (x, y) in enumerate(zip(first_pairs, pairs)) if x != y)
    show = lambda pair: f"{printable(pair[0])[:60]!r} for {printable(pair[1])}"  # noqa: E731
    return (f"{printable(other)}'s query {q + 1} is {show(pairs[q])}, {printable(first)}'s is {show(first_pairs[q])}: "
            f"not the same queries; {advice}")


def side_figures(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """(R, Q) ranks -> each metric per run: R@K in percent and MdR, (R,) each."""
    figures = {f"R@{k}": 100.0 * (ranks <= k).mean(1) for k in CUTOFFS}
    figures["MdR"] = np.median(ranks, axis=1)
    return figures


def bootstrap_differences(a: np.ndarray, b: np.ndarray, videos: np.ndarray, resamples: int,
                          seed: int) -> dict[str, np.ndarray]:
    """(resamples,) of B - A for each metric, both sides scored on the same resample of the videos.

    a, b: (R_a, Q) and (R_b, Q) ranks; videos: (Q,) the video of each query. A resample draws as many
    videos as there are, with replacement, and takes every query of each as often as its video was drawn:
    the captions of one video are not independent queries (20 of each on MSR-VTT), so the video is the
    unit resampled. R@K of a side is the mean over its runs; MdR is the mean over its runs of each run's
    median over the resample."""
    _, group = np.unique(videos, return_inverse=True)  # (Q,) the video's number
    g = int(group.max()) + 1
    rng = np.random.default_rng(seed)
    hit_rate = {k: ((b <= k).mean(0) - (a <= k).mean(0)) for k in CUTOFFS}  # (Q,) per-query difference of hits
    out = {name: np.empty(resamples) for name in [f"R@{k}" for k in CUTOFFS] + ["MdR"]}
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        picks = rng.integers(0, g, size=(n, g))  # (n, G) the videos drawn
        drawn = np.bincount((np.arange(n)[:, None] * g + picks).ravel(), minlength=n * g).reshape(n, g)
        weights = drawn[:, group].astype(np.float64)  # (n, Q) how often each query is in each resample
        for k in CUTOFFS:
            out[f"R@{k}"][start:start + n] = 100.0 * (weights @ hit_rate[k]) / weights.sum(1)
        out["MdR"][start:start + n] = (np.mean([weighted_medians(r, weights) for r in b], axis=0)
                                       - np.mean([weighted_medians(r, weights) for r in a], axis=0))
    return out


def weighted_medians(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(Q,) values, (n, Q) whole-number weights -> (n,): the median of each row's multiset (each value
    repeated as often as its weight), the mean of the two middle ones where the count is even, as np.median."""
    levels, level = np.unique(values, return_inverse=True)  # (L,), (Q,)
    n = weights.shape[0]
    counts = np.bincount((np.arange(n)[:, None] * len(levels) + level).ravel(), weights=weights.ravel(),
                         minlength=n * len(levels)).reshape(n, -1)  # (n, L) weight at each level
    below = np.cumsum(counts, axis=1)
    total = below[:, -1]
    low = (below >= ((total + 1) // 2)[:, None]).argmax(1)  # the level of the ceil(W/2)-th smallest
    high = (below >= (total // 2 + 1)[:, None]).argmax(1)  # of the (W/2 + 1)-th: the same one where W is odd
    return (levels[low] + levels[high]) / 2


def compare(a: Side, b: Side, videos=None, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Each side's figures, B - A and its paired-bootstrap interval, and how the queries moved.
    videos: (Q,) the video of each query, the unit resampled [default: each query its own]."""
    fa, fb = side_figures(a.ranks), side_figures(b.ranks)
    videos = np.arange(a.ranks.shape[1]) if videos is None else np.asarray(videos)
    draws = bootstrap_differences(a.ranks, b.ranks, videos, resamples, seed)
    tail = (100 - CONFIDENCE) / 2
    metrics = {}
    for name in fa:
        low, high = np.percentile(draws[name], [tail, 100 - tail])
        metrics[name] = {"a": float(fa[name].mean()), "a_std": float(fa[name].std()),
                         "b": float(fb[name].mean()), "b_std": float(fb[name].std()),
                         "difference": float(fb[name].mean() - fa[name].mean()),
                         "interval": [float(low), float(high)]}
    mean_a, mean_b = a.ranks.mean(0), b.ranks.mean(0)  # (Q,) each query's rank, averaged over a side's runs
    first_a, first_b = (a.ranks == 1).mean(0), (b.ranks == 1).mean(0)
    return {
        "queries": int(a.ranks.shape[1]), "videos": int(len(np.unique(videos))),
        "runs": {"a": len(a.paths), "b": len(b.paths)},
        "files": {"a": list(a.paths), "b": list(b.paths)},
        "resamples": resamples, "confidence": CONFIDENCE, "seed": seed,
        "metrics": metrics,
        "queries_b_higher": int((mean_b < mean_a).sum()), "queries_b_lower": int((mean_b > mean_a).sum()),
        "queries_same": int((mean_b == mean_a).sum()),
        "first_only_b": int((first_b > first_a).sum()), "first_only_a": int((first_a > first_b).sum()),
    }


def format_comparison(result: dict, ranking: str) -> str:
    runs = result["runs"]

    def figure(value: float, std: float, side: str) -> str:
        return f"{value:.1f}" + (f" ± {std:.1f}" if runs[side] > 1 else "")

    def side_name(side: str) -> str:
        files = result["files"][side]
        return printable(files[0]) + (f" and {len(files) - 1} more runs" if len(files) > 1 else "")

    lines = [f"compare: {result['queries']:,} queries, ranking {ranking}",
             f"  A: {side_name('a')}", f"  B: {side_name('b')}",
             f"{'':6s}{'A':>14s}{'B':>14s}{'B - A':>9s}   {result['confidence']}% interval"]
    for name, m in result["metrics"].items():
        low, high = m["interval"]
        lines.append(f"{name:6s}{figure(m['a'], m['a_std'], 'a'):>14s}{figure(m['b'], m['b_std'], 'b'):>14s}"
                     f"{m['difference']:+9.1f}   {low:+.1f} to {high:+.1f}" + ("  (lower is better)" if name == "MdR" else ""))
    if max(runs.values()) > 1:
        moved = "averaged over each side's runs, B ranks the answer"
        first = f"first more often by B for {result['first_only_b']:,} queries, by A for {result['first_only_a']:,}"
    else:
        moved = "B ranks the answer"
        first = f"first by B alone for {result['first_only_b']:,} queries, by A alone for {result['first_only_a']:,}"
    lines.append(f"{moved} higher for {result['queries_b_higher']:,} queries, lower for {result['queries_b_lower']:,}, "
                 f"the same for {result['queries_same']:,}; {first}")
    seeds = ("the ± is the spread over each side's runs (seeds)" if max(runs.values()) > 1
             else "one run a side, so nothing here measures the seed's part: give each side several runs "
                  f"(A1 A2 A3 {SIDES_SEPARATOR} B1 B2 B3)")
    unit = (f"the {result['queries']:,} queries" if result["videos"] == result["queries"]
            else f"the {result['videos']:,} videos, each with all its queries")
    lines.append(f"the interval: paired bootstrap over {unit} ({result['resamples']:,} resamples), what other "
                 f"videos and queries of the same kind would change; {seeds}")
    return "\n".join(lines)


def run_compare(files: tuple[str, ...], ranking: str = "global", resamples: int = RESAMPLES, seed: int = 0,
                as_json: bool = False) -> dict:
    """The `vlpcache compare` command."""
    a_files, b_files = split_sides(files)
    a, b, pairs = read_sides(a_files, b_files, ranking)
    if both := [path for path in b_files if Path(path).resolve() in {Path(p).resolve() for p in a_files}]:
        say(f"note: {printable(both[0])} is on both sides" + (f" (and {len(both) - 1} more file(s))" if len(both) > 1 else "")
            + ": the same evaluation compared with itself differs by nothing; did you mean another file?")
    result = compare(a, b, [video for _, video in pairs], resamples, seed)
    result["ranking"] = ranking
    print(json.dumps(result, indent=2) if as_json else format_comparison(result, ranking))
    return result
