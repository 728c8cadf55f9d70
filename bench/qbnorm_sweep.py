"""QB-Norm's β and k, and dual softmax's temperature, chosen on validation.

Text->video on a split (every caption a query) for a grid of settings.

For each run given, the split's videos and captions are encoded once, the bank (the run's own training
captions, as `eval --qbnorm` and `search --qbnorm` use) once, and each (β, k) re-normalises the same
similarities. Prints R@1 / R@5 / R@10 / MdR per setting, mean ± std over the runs, beside the plain
ranking. Choose on val only.

    python bench/qbnorm_sweep.py --cache CACHE --captions val.jsonl RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vlpcache.captions import caption_queries, read_captions
from vlpcache.index.build import open_cache, run_query_bank
from vlpcache.metrics import retrieval_metrics
from vlpcache.model.checkpoint import load_run
from vlpcache.model.retrieval import encode_texts, encode_videos
from vlpcache.querybank import QueryBank, dual_softmax

METRICS = ("R@1", "R@5", "R@10", "MdR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True, help="validation captions (never a test split)")
    parser.add_argument("--betas", type=float, nargs="+", default=[5, 10, 20, 30, 50, 100])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--dual-temperatures", type=float, nargs="+", default=[10, 30, 100, 300],
                        help="dual softmax (eval-only row) temperatures, scored the same way")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cache = open_cache(args.cache)
    by_id = {i: c for i, c in read_captions(args.captions).by_id.items() if i in cache}
    ids = list(by_id)
    texts, owners = caption_queries(list(by_id.values()), True)
    results: dict[str, list[dict]] = {}
    device = torch.device("cpu")
    for run_dir in args.runs:
        run = load_run(run_dir)
        video = encode_videos(run.model, cache, [cache.index_of(i) for i in ids], device, 64, regions=False,
                              progress=False).global_.numpy()
        text = encode_texts(run.model, run.tokenizer, texts, device, 64, progress=False).global_.numpy()
        similarity = text @ video.T
        results.setdefault("plain", []).append(retrieval_metrics(similarity, owners))
        bank = run_query_bank(run, video, device, 64, progress=False)
        if bank is None:
            sys.exit(f"error: {run_dir}: none of the training caption files its config names can be read (the bank)")
        for k in args.ks:
            for beta in args.betas:
                normalised = QueryBank.build(bank.bank, video, beta, k).normalise(similarity)
                results.setdefault(f"beta {beta:g}, k {k}", []).append(retrieval_metrics(normalised, owners))
        for temperature in args.dual_temperatures:
            results.setdefault(f"dual softmax, temperature {temperature:g}", []).append(
                retrieval_metrics(dual_softmax(similarity, temperature), owners))
        print(f"{run_dir}: {len(texts)} queries, {len(ids)} videos, bank {len(bank.bank)}", flush=True)

    print(f"| setting | {' | '.join(METRICS)} |\n| --- |" + " ---: |" * len(METRICS))
    for name, rows in results.items():
        cells = [f"{np.mean([r[m] for r in rows]):.1f} ± {np.std([r[m] for r in rows]):.1f}" for m in METRICS]
        print(f"| {name} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
