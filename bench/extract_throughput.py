"""Frames/s of `vlpcache extract` against a simple reference, measured in the same run.

Reference (how bottom-up-attention style tools are usually driven): decode every frame of each
video sequentially with PyAV, keep the same T sampled frames, run the same detector and backbone
one frame at a time, save one .npz per frame.

    python bench/extract_throughput.py                       # real videos + 200 MSR-VTT frame folders
    python bench/extract_throughput.py --msrvtt-items 50 --frames 8 --device cpu
    python bench/extract_throughput.py --device cuda         # + detector x batch-size matrix on the GPU

The matrix (`--matrix`, on by default with `--device cuda`) runs `extract` in-process for each
detector and batch size and reports frames/s, the share of time the detector waited for decoded
frames, and peak GPU memory. frcnn runs with `--frcnn-weights FILE` or, offline, random weights
(speed barely depends on the weights; the number of detections does).

Prints one line per dataset with both throughputs and the ratio; BENCHMARKS.md keeps the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
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


def run_reference_command(root: Path, out_dir: Path, args) -> tuple[int, float, float, int]:
    """The reference as its own process, like ours: (frames, whole-command seconds, loop seconds, decoded)."""
    cmd = [sys.executable, __file__, "--reference-only", str(root), "--reference-out", str(out_dir),
           "--frames", str(args.frames), "--device", args.device]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"reference failed:\n{result.stderr}")
    frames, loop_seconds, decoded = result.stdout.split()
    return int(frames), seconds, float(loop_seconds), int(decoded)


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


def run_matrix(root: Path, scratch: Path, args) -> None:
    """extract in-process for each detector x batch size: frames/s, detector wait share, peak memory."""
    import torch

    from vlpcache.extract.runner import run_extract

    frcnn_weights = args.frcnn_weights
    if "frcnn" in args.detectors and not frcnn_weights:
        from torchvision.models import detection

        frcnn_weights = str(scratch / "frcnn-random.pth")
        torch.save(getattr(detection, args.frcnn_arch)(weights=None, weights_backbone=None).state_dict(), frcnn_weights)
    for detector in args.detectors.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            summary = run_extract(
                [root], cache_dir=scratch / f"matrix-{root.name}-{detector}-{batch_size}", frames=args.frames,
                detector=detector, backbone=args.frcnn_arch if detector == "frcnn" else None,
                weights=frcnn_weights if detector == "frcnn" else None, device=args.device,
                batch_size=batch_size, workers=args.workers, quiet=True)
            busy = summary.detect_seconds + summary.wait_seconds
            peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
            print(f"  matrix {detector:5s} batch {batch_size:4d}: {summary.frames / summary.seconds:7.2f} frames/s, "
                  f"detector waited {100 * summary.wait_seconds / max(busy, 1e-9):5.1f}% of its time for frames{peak}")


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
    parser.add_argument("--matrix", action=argparse.BooleanOptionalAction, default=None,
                        help="detector x batch-size matrix [default: on with --device cuda]")
    parser.add_argument("--detectors", default="yolox,frcnn")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--frcnn-arch", default="fasterrcnn_resnet50_fpn_v2")
    parser.add_argument("--frcnn-weights", default=None)
    parser.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.matrix is None:
        args.matrix = args.device == "cuda"
    os.environ.setdefault("VLPCACHE_MODELS", str(SHARED / "models"))

    if args.reference_only:  # child process: the reference, timed from its own start like `vlpcache extract`
        from vlpcache.extract.yolox import YoloxConfig, YoloxDetector

        items, _ = discover_items([args.reference_only])
        args.reference_out.mkdir(parents=True, exist_ok=True)
        detector = YoloxDetector(YoloxConfig(device=args.device))
        frames, seconds, decoded = run_reference(items, args.frames, detector, 30, args.reference_out)
        print(frames, seconds, decoded)
        return

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, device {args.device}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name in args.datasets.split(","):
            root = dataset_root(name, args, scratch)
            items, _ = discover_items([root])
            ref_dir = scratch / f"ref-{name}"
            ref_frames, ref_seconds, ref_loop, ref_decoded = run_reference_command(root, ref_dir, args)
            ours_frames, ours_seconds, summary = run_vlpcache(root, scratch / f"cache-{name}", args)
            ours_loop = float(re.search(r"failed, ([0-9.]+) s", summary).group(1))
            ref_rate, ours_rate = ref_frames / ref_seconds, ours_frames / ours_seconds
            print(f"{name}: {len(items)} items, T={args.frames}")
            print(f"  reference (decode all {ref_decoded} frames, detector per frame, npz per frame): "
                  f"{ref_frames} frames in {ref_seconds:.1f} s = {ref_rate:.2f} frames/s "
                  f"({ref_frames / ref_loop:.2f} frames/s after start-up and model loading)")
            print(f"  vlpcache extract: {ours_frames} frames in {ours_seconds:.1f} s = {ours_rate:.2f} frames/s "
                  f"({ours_frames / ours_loop:.2f} frames/s after start-up, model loading included)")
            print(f"  {summary}")
            print(f"  ratio, whole commands: {ours_rate / ref_rate:.2f}x; "
                  f"after start-up: {(ours_frames / ours_loop) / (ref_frames / ref_loop):.2f}x")
            shutil.rmtree(ref_dir)
            if args.matrix:
                run_matrix(root, scratch, args)


if __name__ == "__main__":
    main()
