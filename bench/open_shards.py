"""A cache of many shards read in random order, as a training epoch reads it: memory, read time, close time.

An open shard holds about 0.8 MB of HDF5's own structures whatever its size, so a reader that kept every
shard it read open grew by 4 GB over WebVid's 5,000 shards, in each loading process; it now keeps at most
MAX_OPEN_SHARDS (1,024; VLPCACHE_OPEN_SHARDS) and opens again one it let go. Letting a shard go drops its
references instead of h5py's File.close(), which walks every h5py object alive in the process: that is the
reference measured here beside it (closing a reader that had read 1,200 shards took 108 s that way).

    python bench/open_shards.py                      # 1,200 shards of one MSR-VTT-sized item each
    python bench/open_shards.py --shards 600 --bound 256

Each shard holds one item (8 frames x 31 regions x 1280-d, float16: 0.64 MB), so that many shards fit in a
small disk; an open shard's overhead does not depend on how many items it holds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vlpcache.cache import reader
from vlpcache.cache.reader import RegionCache
from vlpcache.cache.schema import CacheSettings, empty_item
from vlpcache.cache.writer import ShardWriter


def write_shards(cache_dir: Path, count: int) -> None:
    settings = CacheSettings(frames=8, regions=31, feature_dim=1280, detector="synthetic", detector_weights_sha256="0",
                             backbone="synthetic", backbone_weights_sha256="0")
    rng = np.random.default_rng(0)
    with ShardWriter(cache_dir, settings, max_items=1) as writer:
        for i in range(count):
            item = empty_item(settings)
            item["features"][:] = rng.standard_normal(item["features"].shape).astype(np.float16)
            item["region_mask"][:], item["frame_mask"][:] = True, True
            writer.add(f"v{i}", f"/videos/v{i}.mp4", "video", item)


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def epoch(cache_dir: Path, bound: int, close_with_h5py: bool) -> dict:
    """Read every item in random order twice; then close the reader."""
    os.environ["VLPCACHE_OPEN_SHARDS"] = str(bound)
    cache = RegionCache(cache_dir)
    before = resident_mb()
    order = np.random.default_rng(1).permutation(len(cache))
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        for i in order:
            cache.read(int(i))
        timings.append((time.perf_counter() - started) / len(order) * 1000)
    grown, kept = resident_mb() - before, len(cache._handles)
    started = time.perf_counter()
    if close_with_h5py:  # the reference: each file closed by h5py, as the reader did before
        for f in list(cache._handles.values()):
            f.close()
    cache.close()
    return {"first": timings[0], "second": timings[1], "grown": grown, "open": kept,
            "close": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1200)
    parser.add_argument("--bound", type=int, default=reader.MAX_OPEN_SHARDS // 2,
                        help="the reader's bound on open shards for the bounded row (default: half of "
                             "MAX_OPEN_SHARDS, so that it must let shards go)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        write_shards(cache_dir, args.shards)
        runs = [("every shard kept open, closed by h5py (before)", (cache_dir, args.shards, True)),
                ("every shard kept open, let go (now)", (cache_dir, args.shards, False)),
                (f"at most {args.bound} open (now, past the bound)", (cache_dir, args.bound, False))]
        rows = []
        for name, arguments in runs:  # each in a process of its own, so that its memory is its own
            with multiprocessing.get_context("fork").Pool(1) as pool:
                rows.append((name, pool.apply(epoch, arguments)))
    print(f"{args.shards} shards of one item each, read in random order twice, then the reader closed")
    print(f"{'':48} {'ms/read 1st':>12} {'ms/read 2nd':>12} {'MB grown':>9} {'open':>6} {'close s':>8}")
    for name, row in rows:
        print(f"{name:48} {row['first']:12.2f} {row['second']:12.2f} {row['grown']:9.0f} {row['open']:6} "
              f"{row['close']:8.2f}")
    before, now = rows[0][1]["close"], rows[1][1]["close"]
    print(f"closing: {before / max(now, 1e-9):.0f}x faster than with h5py's File.close(); the bound holds "
          f"{rows[2][1]['grown'] / max(rows[1][1]['grown'], 1e-9):.2f}x the memory of every shard open, at "
          f"{rows[2][1]['second'] / max(rows[1][1]['second'], 1e-9):.1f}x the time a read")


if __name__ == "__main__":
    main()
