"""`vlpcache serve` latency: p50/p99 of /api/search over HTTP against the in-process Searcher, thumbnails
cold and warm, and the server's start, on a real cache and on a synthetic million-vector index.

    python bench/serve_latency.py --run RUN --cache CACHE                 # real cache, then 1M synthetic
    python bench/serve_latency.py --run RUN --cache CACHE --synthetic 0   # real cache only

Real: the run's index of the cache (built with `vlpcache index` into the work folder when --index is
not given). Queries are the first caption of each video of a caption file (default: MSR-VTT devtest),
k = 10, re-ranked as the page asks; one query at a time, after 10 warm-up queries.

Synthetic (--synthetic N, default 1,000,000): the real index grown to N vectors, the extra ones drawn
as bench/search_latency.py draws them (a mixture of Gaussians in a low-dimensional latent space, L2-
normalised), and indexed with the type the chooser picks for N (HNSW at the default memory budget).
Each extra vector borrows the id of a real video, and its first two stored regions, so that results
are described from the real cache: a query does the same work as over N distinct videos (FAISS over N
vectors, re-rank of 32 candidates, k cache reads), only some ids repeat in the answers. The index is
kept in the work folder and reused by later runs.

In-process: `Searcher.search(q, k=10)` in this process. HTTP: `vlpcache serve` started as a user starts
it, in its own process, asked by this one over one keep-alive connection (as a browser does); the time
runs from sending the request to the last byte of the answer, and the server's own search time comes
back in its Server-Timing header. Each query goes both ways in turn, alternating which goes first, so
that both meet the same load from the rest of the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

# before anything imports faiss: faiss_index sets OpenMP's passive wait, without which idle OpenMP
# threads spin and slow the in-process searches several times over on two cores
from vlpcache.index.faiss_index import IndexConfig, VideoIndex  # noqa: E402
from vlpcache.index.query_model import QUERY_DIR  # noqa: E402
from vlpcache.index.region_store import RegionStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_latency import synthetic_vectors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 10
WARMUP = 10
SYNTHETIC_REGIONS = 2  # stored regions per extra vector: re-ranking reads 32 candidates, whatever their count


def percentiles(seconds: list[float]) -> dict:
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "n": len(ms)}


def read_queries(captions: Path, count: int) -> list[str]:
    queries = []
    for line in captions.read_text().splitlines():
        record = json.loads(line)
        if record.get("captions"):
            queries.append(record["captions"][0])
    return queries[:count]


# ---------------------------------------------------------------- in process and over HTTP


class ServeProcess:
    """`vlpcache serve --port 0` as a user starts it; stopped with Ctrl+C."""

    def __init__(self, run: Path, cache: Path, index: Path, workspace: Path):
        started = time.perf_counter()
        exe = shutil.which("vlpcache")
        command = [exe] if exe else [sys.executable, "-m", "vlpcache"]
        self.process = subprocess.Popen(
            command + ["serve", "--run", str(run), "--cache", str(cache), "--index", str(index), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "VLPCACHE_WORKSPACE": str(workspace)})
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline, url = time.monotonic() + 600, None
        while url is None and time.monotonic() < deadline and selector.select(timeout=deadline - time.monotonic()):
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("serving "):
                url = line.split(" at ")[1].split()[0]
        if url is None:
            self.stop()
            raise SystemExit("vlpcache serve did not start; run it by hand to see why")
        self.start_s = time.perf_counter() - started
        host, port = url.split("/")[2].rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def get(self, path: str) -> tuple[int, dict, bytes]:
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def search(self, query: str) -> tuple[float, dict]:
        """(seconds inside the server's search, the answer)."""
        status, headers, body = self.get("/api/search?" + urlencode({"q": query, "k": K}))
        assert status == 200, body[:200]
        return float(headers["server-timing"].split("dur=")[1]) / 1e3, json.loads(body)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def searches(searcher, server: ServeProcess, queries: list[str]) -> tuple[dict, list[dict]]:
    """Each query in process and over HTTP, one after the other (alternating which goes first), so
    that both meet the same load from the rest of the machine."""
    for q in queries[:WARMUP]:
        searcher.search(q, k=K)
        server.search(q)
    local, remote, inside, answers = [], [], [], []
    for i, q in enumerate(queries[WARMUP:]):
        for side in ("local", "http") if i % 2 == 0 else ("http", "local"):
            if side == "local":
                local.append(timed(lambda: searcher.search(q, k=K))[0])
            else:
                seconds, (in_server, answer) = timed(lambda: server.search(q))
                remote.append(seconds)
                inside.append(in_server)
                answers.append(answer)
    figures = {"in_process": percentiles(local), "http": percentiles(remote), "http_server_side": percentiles(inside)}
    figures["http_overhead_p50_ms"] = round(figures["http"]["p50_ms"] - figures["in_process"]["p50_ms"], 2)
    return figures, answers


def thumbnails(server: ServeProcess, answers: list[dict], count: int) -> dict:
    """Frames of the top results: first request (decoded from the source) and again (from disk)."""
    wanted = []
    for answer in answers:
        for hit in answer["results"][:3]:
            if (hit["id"], hit["frame"]) not in wanted:
                wanted.append((hit["id"], hit["frame"]))
    wanted = wanted[:count]
    result = {}
    for name in ("cold", "warm"):
        times = []
        for item_id, frame in wanted:
            seconds, (status, headers, _) = timed(lambda: server.get("/media/frame?" + urlencode({"id": item_id, "t": frame})))
            times.append(seconds)
            assert status == 200 and "x-vlpcache-placeholder" not in {k.lower() for k in headers}, (item_id, headers)
        result[f"thumbnail_{name}"] = percentiles(times)
    return result


def measure(name: str, run: Path, cache: Path, index: Path, queries: list[str], workdir: Path, thumbs: int) -> dict:
    from vlpcache import Searcher

    if workdir in index.parents:  # cold thumbnails: decoded from the sources (a user's --index keeps its own)
        shutil.rmtree(index / "thumbnails", ignore_errors=True)
    load_s, searcher = timed(lambda: Searcher(run=run, cache=cache, index=index, say=lambda line: None))
    figures = {"case": name, "items": len(searcher), "searcher_load_s": round(load_s, 2)}
    server = ServeProcess(run, cache, index, workdir / "workspace")
    try:
        figures["serve_start_s"] = round(server.start_s, 2)
        found, answers = searches(searcher, server, queries)
        figures.update(found)
        if thumbs:
            figures.update(thumbnails(server, answers, thumbs))
    finally:
        server.stop()
    print(json.dumps(figures), flush=True)
    return figures


# ---------------------------------------------------------------- the indexes


def real_index(args) -> Path:
    index = args.index or args.workdir / "index"
    if not (index / "index.json").exists():
        print(f"building the index of {args.cache} in {index}", flush=True)
        subprocess.run([sys.executable, "-m", "vlpcache", "index", "--run", str(args.run), "--cache", str(args.cache),
                        "-o", str(index), "--quiet"], check=True)
    return index


def synthetic_index(real: Path, n: int, workdir: Path) -> Path:
    """The real index grown to n vectors (see the module docstring); built once, then reused."""
    folder = workdir / f"synthetic-{n}"
    if (folder / "index.json").exists():
        return folder
    source = VideoIndex.load(real)
    base, extra = len(source), n - len(source)
    started = time.perf_counter()
    vectors = synthetic_vectors(extra, source.embeddings.shape[1], "clustered", np.random.default_rng(0))
    borrowed = np.arange(extra) % base  # (extra,) the real row each extra vector borrows id and regions from
    ids = source.ids + [source.ids[r] for r in borrowed]
    print(f"synthetic: {n} vectors ({extra} drawn in {time.perf_counter() - started:.0f} s); building the index", flush=True)
    started = time.perf_counter()
    index = VideoIndex.build(ids, np.concatenate([source.embeddings, vectors]), source.meta, IndexConfig())
    print(f"synthetic: {index.meta.factory} ({index.meta.search_params}) built in {time.perf_counter() - started:.0f} s", flush=True)
    index.regions = RegionStore(np.asarray(source.regions.embeddings), source.regions.offsets, np.asarray(source.regions.positions))
    index.regions.append_store(borrowed_regions(source.regions, borrowed))
    index.save(folder)
    shutil.copytree(real / QUERY_DIR, folder / QUERY_DIR)
    return folder


def borrowed_regions(regions: RegionStore, rows: np.ndarray) -> RegionStore:
    """For each of rows, the first SYNTHETIC_REGIONS stored regions of that real row (repeated if it has fewer)."""
    start = regions.offsets[rows]  # (X,)
    count = regions.offsets[rows + 1] - start
    take = start[:, None] + np.minimum(np.arange(SYNTHETIC_REGIONS)[None], count[:, None] - 1)  # (X, R)
    flat = take.reshape(-1)
    offsets = np.arange(len(rows) + 1, dtype=np.int64) * SYNTHETIC_REGIONS
    return RegionStore(np.asarray(regions.embeddings[flat]), offsets, np.asarray(regions.positions[flat]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a pretraining run")
    parser.add_argument("--cache", type=Path, required=True, help="its region cache (e.g. all of MSR-VTT)")
    parser.add_argument("--index", type=Path, help="the index of run and cache [default: built in the work folder]")
    parser.add_argument("--captions", type=Path, default=REPO.parent / "shared" / "data" / "msrvtt" / "devtest.jsonl",
                        help="queries: the first caption of each video")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="vectors in the synthetic index (0: skip)")
    parser.add_argument("--thumbnails", type=int, default=40, help="frames fetched cold and warm (0: skip)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "serve")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    queries = read_queries(args.captions, args.queries + WARMUP)
    import faiss

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, faiss {faiss.__version__}; "
          f"{len(queries)} queries from {args.captions.name}, k = {K}", flush=True)
    index = real_index(args)
    results = [measure("real", args.run, args.cache, index, queries, args.workdir, args.thumbnails)]
    if args.synthetic:
        synthetic = synthetic_index(index, args.synthetic, args.workdir)
        results.append(measure(f"synthetic-{args.synthetic}", args.run, args.cache, synthetic, queries, args.workdir, 0))
    print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
