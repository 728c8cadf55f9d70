"""`vlpcache search --like FILE` of clips the cache does not hold: the one command against the three it replaces,
measured in the same run.

    python bench/like_outside_latency.py --workspace WS --run RUN CLIP [CLIP ...] [-k 10] [--repeats 3]

WS is a workspace (`.vlpcache/` or what VLPCACHE_WORKSPACE names) with a cache and an index of RUN. For each clip
(a video, photo or frames folder the cache does not hold), each timed as a user runs it, a new process each:

- `vlpcache search --like CLIP` (extracted on its own into a temporary cache, nothing added);
- the reference, what a user ran before: `vlpcache extract CLIP`, `vlpcache index`, `vlpcache search --like ID`
  on a copy of WS made before the clock starts (the copy then holds the clip; a frames folder is extracted
  from a folder that holds it alone, copied there before the clock starts, as its id is its name there).

Both must give the same hits (ids; scores within 2e-3). Prints each clip's seconds, the medians and their ratio.
Set VLPCACHE_MODELS (and VLPCACHE_OFFLINE=1 offline) as for extract.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlpcache", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"vlpcache {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def hits(stdout: str) -> list[tuple[str, float]]:
    return [(h["id"], h["score"]) for h in json.loads(stdout)["results"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--run", required=True)
    parser.add_argument("clips", nargs="+")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    one, three = [], []
    for clip in args.clips:
        item_id = Path(clip).name if Path(clip).is_dir() else Path(clip).stem
        for _ in range(args.repeats):
            env = {**os.environ, "VLPCACHE_WORKSPACE": str(args.workspace)}
            seconds, out = timed(["search", "--like", clip, "--run", args.run, "-k", str(args.k), "--json"], env)
            outside = hits(out)
            one.append(seconds)
            with tempfile.TemporaryDirectory(prefix="like-bench-") as folder:
                copy = Path(folder) / "ws"
                shutil.copytree(args.workspace, copy, symlinks=True)
                env = {**os.environ, "VLPCACHE_WORKSPACE": str(copy)}
                root = clip
                if Path(clip).is_dir():  # a frames folder is one item inside the folder extracted, not as the root
                    root = str(Path(folder) / "parent")
                    shutil.copytree(clip, Path(root) / item_id)
                steps = [timed(["extract", root, "--quiet"], env)[0], timed(["index", "--run", args.run, "--quiet"], env)[0]]
                seconds, out = timed(["search", "--like", item_id, "--run", args.run, "-k", str(args.k), "--json"], env)
                three.append(sum(steps) + seconds)
            indexed = hits(out)
            same = [i for i, _ in outside] == [i for i, _ in indexed] and all(
                abs(a - b) <= 2e-3 for (_, a), (_, b) in zip(outside, indexed))
            print(f"{clip}: --like FILE {one[-1]:.2f} s; extract + index + --like ID {three[-1]:.2f} s "
                  f"(extract {steps[0]:.2f}, index {steps[1]:.2f}, search {seconds:.2f}); same hits: {same}", flush=True)
            if not same:
                raise SystemExit(f"the hits differ:\n{outside}\n{indexed}")
    print(f"median of {len(one)}: --like FILE {statistics.median(one):.2f} s, the three commands "
          f"{statistics.median(three):.2f} s: {statistics.median(three) / statistics.median(one):.2f}x")


if __name__ == "__main__":
    main()
