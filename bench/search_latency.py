"""Search speed: FAISS index types on synthetic vectors, text encoding per query, cold CLI start.

    python bench/search_latency.py                       # 1M 256-d vectors, every index type
    python bench/search_latency.py --n 100000            # smaller, while developing
    python bench/search_latency.py --workspace W --skip-faiss   # text encoding + cold CLI only

For each index type the chooser can pick (vlpcache.index.faiss_index.candidate_factories), the
index is built exactly as `vlpcache index` builds it (VideoIndex.build: training, adding, tuning of
efSearch/nprobe to recall@10 >= 0.95 on indexed vectors), then measured on fresh queries:
build time, p50/p99 latency of one query at a time (k=10), recall@10 against exact search. The
exact index ("Flat") is the reference the ratios are taken against.

Synthetic data: uniform random unit vectors have no neighbourhood structure at all (every point
is almost equally far from every other), which real embeddings never look like; the default
`--data clustered` draws points from a mixture of 1000 Gaussians in a 32-d latent space mapped
linearly to 256-d plus isotropic noise, then L2-normalises. `--data uniform` gives the worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from vlpcache.index.faiss_index import VideoIndex, candidate_factories, recall_at
from vlpcache.index.layout import IndexConfig, IndexMeta


def synthetic_vectors(n: int, dim: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 unit vectors; see the module docstring for the two kinds."""
    if kind == "uniform":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        latent, clusters = 32, 1000
        centres = rng.standard_normal((clusters, latent), dtype=np.float32) * 2
        mixing = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
        x = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 100_000):  # in blocks: keeps the temporaries small
            m = min(100_000, n - start)
            z = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, latent), dtype=np.float32)
            x[start : start + m] = z @ mixing + 0.3 * rng.standard_normal((m, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def single_query_latencies(index: VideoIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Seconds per query, one query per call, as `vlpcache search` does it."""
    times = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        index.search(queries[i : i + 1], k)
        times[i] = time.perf_counter() - start
    return times


def bench_faiss(args) -> list[dict]:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    base = synthetic_vectors(args.n + args.queries, args.dim, args.data, rng)
    queries, base = base[: args.queries], base[args.queries :]
    print(f"data: {args.n} x {args.dim} {args.data} vectors, {args.queries} queries "
          f"({time.perf_counter() - t0:.1f} s to generate)", flush=True)
    _, truth = faiss.knn(queries, base, args.k, metric=faiss.METRIC_INNER_PRODUCT)
    ids = [str(i) for i in range(args.n)]
    meta = IndexMeta(checkpoint_sha256="synthetic", cache_settings={}, embedding_dim=args.dim, factory="")
    factories = args.factories or candidate_factories(args.n, args.dim)
    rows = []
    for factory in factories:
        start = time.perf_counter()
        index = VideoIndex.build(ids, base, meta, IndexConfig(factory=factory))
        build_s = time.perf_counter() - start
        # exact search over 1M vectors costs ~50 ms a query: fewer queries suffice for its latency
        timed = queries[: args.queries if factory != "Flat" else min(args.queries, 200)]
        latency = single_query_latencies(index, timed, args.k)
        _, found = index.search(queries, args.k)
        row = {
            "factory": factory,
            "search_params": index.meta.search_params,
            "build_s": round(build_s, 1),
            "p50_ms": round(1e3 * float(np.percentile(latency, 50)), 3),
            "p99_ms": round(1e3 * float(np.percentile(latency, 99)), 3),
            "recall@10": round(recall_at(found, truth), 4),
            "tuned_recall@10": index.meta.tuned_recall,
            "index_mb": round(_index_bytes(index.index) / 2**20),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del index
    flat = next((r for r in rows if r["factory"] == "Flat"), None)
    if flat:
        for r in rows:
            r["speedup_vs_exact"] = round(flat["p50_ms"] / r["p50_ms"], 1)
    return rows


def _index_bytes(index) -> int:
    return len(faiss.serialize_index(index))


def bench_text_encoding(workspace: Path, queries: list[str]) -> dict:
    """Per-query encoding time (warm, one query per call): the ONNX export search uses, and torch."""
    import torch

    from vlpcache.index.query_graphs import TorchQueryModel
    from vlpcache.index.query_model import OnnxQueryModel
    from vlpcache.model.checkpoint import load_run
    from vlpcache.model.run_layout import latest_run
    from vlpcache.workspace import Workspace

    workspace = Workspace(workspace)
    result = {}
    for name, model in (("onnx", OnnxQueryModel(workspace.index_dir)), ("torch", TorchQueryModel(load_run(latest_run(workspace.runs_dir))))):
        model.encode("warm up")
        times = []
        for q in queries:
            start = time.perf_counter()
            model.encode(q)
            times.append(time.perf_counter() - start)
        result[f"text_encode_{name}_p50_ms"] = round(1e3 * statistics.median(times), 2)
        result[f"text_encode_{name}_p99_ms"] = round(1e3 * float(np.percentile(times, 99)), 2)
    result["torch_threads"] = torch.get_num_threads()
    return result


def bench_cold_cli(workspace: Path, repeats: int) -> dict:
    """Wall time of `vlpcache search TEXT` from the shell (a new process each time), index built."""
    exe = shutil.which("vlpcache") or f"{sys.executable} -m vlpcache"
    env = {**os.environ, "VLPCACHE_WORKSPACE": str(workspace)}
    cmd = exe.split() + ["search", "a person is cooking in a kitchen", "-k", "5"]
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # first use may build the index
    result = {}
    for name, command in {
        "cli_search_s": cmd,
        "cli_help_s": exe.split() + ["--help"],
        "python_import_torch_s": [sys.executable, "-c", "import torch"],
    }.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        result[name] = round(statistics.median(times), 2)
        result[name[:-2] + "_min_s"] = round(min(times), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--factory", dest="factories", action="append", help="measure only these factory strings")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--workspace", type=Path, help="a workspace (the .vlpcache folder) with a cache, a run and its index, "
                        "for text encoding and cold CLI start")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPU cores, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads", flush=True)
    figures: dict = {"n": args.n, "dim": args.dim, "data": args.data}
    if not args.skip_faiss:
        figures["faiss"] = bench_faiss(args)
    if args.workspace:
        words = "person dog car kitchen cooking running ball music man woman playing talking".split()
        rng = np.random.default_rng(0)
        queries = [" ".join(rng.choice(words, 4)) for _ in range(50)]
        figures["text"] = bench_text_encoding(args.workspace, queries)
        print(json.dumps(figures["text"]), flush=True)
        figures["cli"] = bench_cold_cli(args.workspace, args.repeats)
        print(json.dumps(figures["cli"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
