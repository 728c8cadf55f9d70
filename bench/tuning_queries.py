"""Does an index tuned with its own video vectors as queries reach its recall for text queries?

`vlpcache index` tunes nprobe / efSearch on indexed vectors used as queries (`tune_search_params`);
users search with captions, which sit elsewhere in the joint space. For each factory this builds the
index over a run's embeddings of every cached video, as the chooser would (`train_and_add`, then the
tuner), and prints recall@10 against exact search at the chosen setting for the tuner's video queries
and for the captions of a split, plus the text recall along the whole ladder.

    python bench/tuning_queries.py --run RUN --cache CACHE --captions val.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np
import torch

from vlpcache.captions import read_captions
from vlpcache.index.build import open_cache
from vlpcache.index.faiss_index import (apply_search_params, new_faiss_index, recall_at, train_and_add,
                                        tune_search_params, tuning_ladder)
from vlpcache.index.layout import IndexConfig
from vlpcache.model.checkpoint import load_run
from vlpcache.model.retrieval import encode_texts, encode_videos

FACTORIES = ["IVF64,Flat", "IVF256,Flat", "IVF64,PQ32np,Refine(SQ8)", "HNSW32,Flat"]
K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True, help="caption file whose captions are the text queries")
    parser.add_argument("--queries", type=int, default=1000, help="text queries (the first captions of the file)")
    parser.add_argument("--factories", nargs="+", default=FACTORIES)
    args = parser.parse_args()

    cache = open_cache(args.cache)
    run = load_run(args.run)
    device = torch.device("cpu")
    videos = encode_videos(run.model, cache, list(range(len(cache))), device, 64, progress=False).global_.numpy()
    captions = [c for texts in read_captions(args.captions).by_id.values() for c in texts][: args.queries]
    texts = encode_texts(run.model, run.tokenizer, captions, device, 256, progress=False).global_.numpy()
    videos, texts = np.ascontiguousarray(videos, "float32"), np.ascontiguousarray(texts, "float32")
    _, truth = faiss.knn(texts, videos, K, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"{len(videos)} videos of {args.cache}, {len(texts)} text queries from {args.captions}, run {args.run}")
    print("| factory | chosen | recall@10, video queries (tuner) | recall@10, text queries |")
    print("| --- | --- | ---: | ---: |")
    ladders = []
    for factory in args.factories:
        index = new_faiss_index(factory, videos.shape[1])
        train_and_add(index, videos, factory)
        params, video_recall = tune_search_params(index, videos, IndexConfig())
        along = []
        for step in tuning_ladder(index):
            apply_search_params(index, step)
            along.append(f"{step.split(',')[0]} {recall_at(index.search(texts, K)[1], truth):.3f}")
        apply_search_params(index, params)
        text_recall = recall_at(index.search(texts, K)[1], truth)
        print(f"| `{factory}` | {params} | {video_recall:.3f} | {text_recall:.3f} |")
        ladders.append(f"{factory}: " + ", ".join(along))
    print("\ntext recall@10 along the ladder:")
    print("\n".join(ladders))


if __name__ == "__main__":
    main()
