"""Decoding workers killed at random moments: does the reader finish, with every item once?

    python bench/worker_deaths.py                  # 10 runs, 12 SIGKILLs each, 2 workers
    python bench/worker_deaths.py --runs 3 --kills 4 --signal SIGSEGV

Each run is its own process: `FrameReader` (T=8, 416 px, as extract decodes for yolox) over two
copies of every video of shared/data/videos, while a thread of the same process sends the signal
to a randomly chosen live decoding worker after a random pause of 0.05-0.6 s, up to --kills times. A
run that has not finished after --hang-after seconds is counted as hung and killed. Printed per run:
seconds, kills sent, results, distinct items, and items reported failed. An item is reported failed
only when its worker dies twice while decoding it, so under kills this frequent some are: a real
decoder crash or OOM kill is rarer. Run it from another checkout (PYTHONPATH) to compare versions.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VLPCACHE_SHARED", REPO.parent / "shared"))


def one_run(seed: int, root: Path, kills: int, signum: signal.Signals, workers: int) -> None:
    from vlpcache.extract.reader import FrameReader
    from vlpcache.extract.sources import discover_items

    rng = random.Random(seed)
    items, _ = discover_items([root])
    sent, stop = [], threading.Event()

    def killer():
        while not stop.wait(rng.uniform(0.05, 0.6)) and len(sent) < kills:
            alive = [p for p in multiprocessing.active_children() if p.is_alive()]
            if alive:
                try:
                    os.kill(rng.choice(alive).pid, signum)
                    sent.append(signum)
                except ProcessLookupError:
                    pass

    threading.Thread(target=killer, daemon=True).start()
    started = time.monotonic()
    results = [(d.item.id, d.error) for d in FrameReader(8, 416, workers=workers)(items)]
    stop.set()
    ids = [item_id for item_id, _ in results]
    failed = [error for _, error in results if error]
    print(f"{time.monotonic() - started:.1f} {len(sent)} {len(ids)} {len(set(ids))} {len(items)} {len(failed)}"
          f" {sorted(set(failed))}", flush=True)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kills", type=int, default=12, help="signals sent per run, at most")
    parser.add_argument("--signal", default="SIGKILL", help="SIGKILL, SIGTERM, SIGSEGV, ...")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hang-after", type=float, default=120.0, help="seconds after which a run counts as hung")
    parser.add_argument("--one", type=int, metavar="SEED", help=argparse.SUPPRESS)  # a single run, in a child
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    signum = signal.Signals[args.signal]
    if args.one is not None:
        return one_run(args.one, args.root, args.kills, signum, args.workers)

    videos = SHARED / "data" / "videos"
    if not videos.is_dir():
        sys.exit(f"no videos at {videos} (set VLPCACHE_SHARED to the shared/ folder)")
    with tempfile.TemporaryDirectory(prefix="vlpcache-worker-deaths-") as scratch:
        root = Path(scratch)
        for copy in range(2):
            for video in sorted(videos.iterdir()):
                shutil.copy(video, root / f"{copy}-{video.name}")
        print(f"{args.runs} runs, up to {args.kills} x {args.signal} each to one of {args.workers} decoding workers")
        finished, whole, failed_items, items_total = 0, 0, 0, 0
        for seed in range(args.runs):
            command = [sys.executable, __file__, "--one", str(seed), "--root", str(root), "--kills", str(args.kills),
                       "--signal", args.signal, "--workers", str(args.workers)]
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=args.hang_after)
            except subprocess.TimeoutExpired:
                print(f"run {seed}: HUNG (no end after {args.hang_after:.0f} s)")
                continue
            if run.returncode != 0:
                print(f"run {seed}: FAILED (exit status {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
                continue
            seconds, sent, results, distinct, items, failed, reasons = run.stdout.split(" ", 6)
            finished += 1
            whole += results == distinct == items
            failed_items += int(failed)
            items_total += int(items)
            print(f"run {seed}: {seconds} s, {sent} signals, {results} results, {distinct} distinct of {items} items,"
                  f" {failed} reported failed {reasons.strip() if int(failed) else ''}")
        print(f"finished {finished} of {args.runs} runs; every item exactly once in {whole};"
              f" {failed_items} of {items_total} items reported failed")


if __name__ == "__main__":
    main()
