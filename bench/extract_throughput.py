"""Frames/s of `vlpcache extract` against a simple reference, measured in the same run.

Reference (how bottom-up-attention style tools are usually driven): decode every frame of each
video sequentially with PyAV, keep the same T sampled frames, run the same detector and backbone
one frame at a time, save one .npz per frame.

    python bench/extract_throughput.py                       # real videos + 200 MSR-VTT frame folders
    python bench/extract_throughput.py --msrvtt-items 50 --frames 8 --device cpu

Prints one line per dataset with both throughputs and the ratio; BENCHMARKS.md keeps the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLPCACHE_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))

from vlpcache.extract.sampling import segment_centres  # noqa: E402
from vlpcache.extract.sources import Item, discover_items, frame_files  # noqa: E402


def decode_all_frames(item: Item, num_frames: int) -> tuple[list[np.ndarray], int]:
    """The reference's decoding: every frame in order, keeping the ones nearest the segment centres."""
    import av
    from PIL import Image

    if item.kind == "frames":
        files = frame_files(item.path)
        picks = sorted({min(len(files) - 1, int(c)) for c in segment_centres(len(files), num_frames)})
        return [np.asarray(Image.open(files[i]).convert("RGB")) for i in picks], len(files)
    if item.kind == "image":
        return [np.asarray(Image.open(item.path).convert("RGB"))], 1
    with av.open(str(item.path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = sorted({min(len(frames) - 1, int(c)) for c in segment_centres(len(frames), num_frames)})
    return [frames[i] for i in picks], len(frames)


def run_reference(items: list[Item], num_frames: int, detector, regions: int, out_dir: Path) -> tuple[int, float, int]:
    start = time.perf_counter()
    kept = decoded = 0
    for item in items:
        try:
            frames, total = decode_all_frames(item, num_frames)
        except Exception as err:
            print(f"reference: {item.path}: {err}", file=sys.stderr)
            continue
        decoded += total
        for t, frame in enumerate(frames):
            (r,) = detector.detect([frame], regions)
            target = out_dir / f"{item.id.replace('/', '__')}_{t}.npz"
            np.savez(target, boxes=r.boxes, scores=r.scores, labels=r.labels, features=r.features.astype(np.float16))
            kept += 1
    return kept, time.perf_counter() - start, decoded


def run_vlpcache(root: Path, cache_dir: Path, args) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "vlpcache", "extract", str(root), "-o", str(cache_dir), "--frames", str(args.frames),
           "--device", args.device, "--quiet"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"vlpcache extract failed:\n{result.stderr}")
    summary = result.stderr.strip().splitlines()[-1]
    from vlpcache.cache.reader import RegionCache

    frames = int(RegionCache(cache_dir).column("frame_mask").sum())
    return frames, seconds, summary


def dataset_root(name: str, args, scratch: Path) -> Path:
    if name == "videos":
        return SHARED / "data" / "videos"
    root = scratch / "msrvtt"
    if not root.exists():
        folders = sorted((SHARED / "data" / "msrvtt" / "frames" / "val").iterdir())[: args.msrvtt_items]
        root.mkdir()
        for folder in folders:
            os.symlink(folder, root / folder.name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--msrvtt-items", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--datasets", default="videos,msrvtt")
    args = parser.parse_args()
    os.environ.setdefault("VLPCACHE_MODELS", str(SHARED / "models"))

    from vlpcache.extract.yolox import YoloxConfig, YoloxDetector

    detector = YoloxDetector(YoloxConfig(device=args.device))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, device {args.device}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name in args.datasets.split(","):
            root = dataset_root(name, args, scratch)
            items, _ = discover_items([root])
            ref_dir = scratch / f"ref-{name}"
            ref_dir.mkdir()
            ref_frames, ref_seconds, ref_decoded = run_reference(items, args.frames, detector, 30, ref_dir)
            ours_frames, ours_seconds, summary = run_vlpcache(root, scratch / f"cache-{name}", args)
            ref_rate, ours_rate = ref_frames / ref_seconds, ours_frames / ours_seconds
            print(f"{name}: {len(items)} items, T={args.frames}")
            print(f"  reference (decode all {ref_decoded} frames, detector per frame, npz per frame): "
                  f"{ref_frames} frames in {ref_seconds:.1f} s = {ref_rate:.2f} frames/s")
            print(f"  vlpcache extract (whole command, incl. start-up): {ours_frames} frames in {ours_seconds:.1f} s "
                  f"= {ours_rate:.2f} frames/s")
            print(f"  {summary}")
            print(f"  ratio: {ours_rate / ref_rate:.2f}x")
            shutil.rmtree(ref_dir)


if __name__ == "__main__":
    main()
