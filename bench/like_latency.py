"""`vlpcache search --like ID` latency: `Searcher.like` against a simple reference measured in the same run.

    python bench/like_latency.py --run RUN --cache CACHE [--index DIR] [--items 300] [-k 10]

For each of the first --items indexed items (one call each, after 10 warm-up calls): `Searcher.like(id, k)`
(FAISS over the index, the item itself left out, each hit's best frame from the stored regions, each hit
described from the cache), and the reference: numpy's exact top k of the index's embeddings by cosine
(one matrix-vector product and an argpartition, nothing described). Also how often the two agree on
the k ids (1.000 for an exact index; below it for HNSW or IVF), and a text search of a caption
(re-ranked, as `vlpcache search` answers) for scale. Prints p50 and p99 of each, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def percentile(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def reference_top(embeddings: np.ndarray, row: int, k: int) -> list[int]:
    """The k rows most like `row` by cosine, itself left out: exact, in numpy."""
    scores = embeddings @ embeddings[row]
    scores[row] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    return [int(r) for r in top[np.argsort(-scores[top], kind="stable")]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--index", default=None, help="index root [default: the workspace's]")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()

    from vlpcache import Searcher

    searcher = Searcher(run=args.run, cache=args.cache, index=args.index, say=lambda line: None)
    index = searcher.index
    embeddings = np.asarray(index.embeddings, np.float32)
    ids = index.ids[: args.items]
    for item_id in ids[:10]:  # warm-up: the cache's shards opened, FAISS's and numpy's first calls
        searcher.like(item_id, args.k)
        reference_top(embeddings, index.row_of(item_id), args.k)
    like_s, reference_s, agree = [], [], []
    for item_id in ids:
        row = index.row_of(item_id)
        started = time.perf_counter()
        hits = searcher.like(item_id, args.k)
        like_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        top = reference_top(embeddings, row, args.k)
        reference_s.append(time.perf_counter() - started)
        agree.append(len({h.id for h in hits} & {index.ids[r] for r in top}) / args.k)
    text_s = []
    for query in ["a man is cooking in a kitchen", "a dog runs on the grass", "people dance on a stage",
                  "a car drives down a road"] * 25:
        started = time.perf_counter()
        searcher.search(query, args.k)
        text_s.append(time.perf_counter() - started)

    print(f"index: {len(index)} items ({index.meta.factory}), k = {args.k}, {len(ids)} items asked")
    for name, times in (("Searcher.like", like_s), ("reference (numpy exact top-k)", reference_s),
                        ("text search, re-ranked", text_s)):
        print(f"{name:32s} p50 {percentile(times, 50):7.2f} ms  p99 {percentile(times, 99):7.2f} ms")
    print(f"like / reference: {statistics.median(like_s) / statistics.median(reference_s):.1f}x the time, "
          f"like / text search: {statistics.median(like_s) / statistics.median(text_s):.2f}x")
    print(f"like's ids agree with the exact top {args.k}: {np.mean(agree):.3f}")


if __name__ == "__main__":
    main()
