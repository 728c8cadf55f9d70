"""Frames/s of `vlpcache extract` against simple references, measured in the same run.

Both references decode every frame of each video sequentially with PyAV, keep the same T sampled
frames, detect one frame at a time and save one .npz per frame, as bottom-up-attention tools do:

- `simple`: the published models driven the straightforward way, as a user's own script would:
  `yolox_nano_coco.onnx` through an onnxruntime session with default options at the 416x416 input
  the file declares, the MobileNetV2 `.pth` through torchvision in torch, torchvision's nms and
  roi_align, library default threads. This is the reference of issue 2's 3x target.
- `detector`: vlpcache's own tuned `yolox` detector (trunk exported to onnxruntime, stride-32
  canvases, thread settings) called one frame at a time. It shares every per-frame optimisation,
  so the gap to it is what batching, seeking and overlapped decoding alone give.

    python bench/extract_throughput.py                       # real videos + 200 MSR-VTT frame folders
    python bench/extract_throughput.py --msrvtt-items 50 --frames 8 --device cpu
    python bench/extract_throughput.py --device cuda         # + detector x batch-size matrix on the GPU
    python bench/extract_throughput.py --engines local,ray --references ""   # the ray engine's overhead

`--engines` runs `vlpcache extract` once per engine on each dataset (default: local, and ray when it is
installed); the ray engine starts its own local Ray instance, as `--engine ray` without an address does,
so its whole-command figure includes Ray's start-up, and the ratio local/ray is its overhead.

The matrix (`--matrix`, on by default with `--device cuda`) runs `extract` for each detector and
batch size, each in its own process and twice there: cold (what a new process pays once: CUDA's
lazy kernel loading, cuDNN's autotuning of each new input shape) and warm (the steady rate of a long
job). It reports frames/s, the share of time the detector waited for decoded frames, peak GPU memory
and, for yolox, the number of distinct input shapes; `--autotune on,off` adds each configuration with
cuDNN's autotuning off (`extract --no-autotune`). frcnn and vg run with `--frcnn-weights FILE` / `--vg-weights FILE` or,
offline, random weights (speed barely depends on the weights; the number of detections does):
`--detectors yolox,frcnn,vg` adds vg. `--runtimes` (also on by
default with `--device cuda`) times yolox's two runtimes, onnxruntime (CUDA provider with
onnxruntime-gpu installed) and the ONNX graph converted to torch, on the same decoded frames.

Prints one line per dataset and run with its throughput and ratios; BENCHMARKS.md keeps the results.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
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


class SimpleReference:
    """The published YOLOX-Nano ONNX and MobileNetV2 weights, one frame at a time, library defaults."""

    def __init__(self, models: Path, device: str):
        import onnxruntime as ort
        import torch
        from torchvision.models import mobilenet_v2

        from vlpcache.extract.detectors.spec import MOBILENET_FILE, YOLOX_FILE
        from vlpcache.extract.detectors.yolox import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, _grid

        self.torch, self.size, self.device = torch, INPUT_SIZE, torch.device(device)
        providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(models / YOLOX_FILE), providers=providers)
        self.trunk = mobilenet_v2(weights=None).features
        self.trunk.load_state_dict(torch.load(models / MOBILENET_FILE, map_location="cpu", weights_only=True))
        self.trunk = self.trunk.eval().to(self.device)
        self.grid, self.strides = _grid(INPUT_SIZE, INPUT_SIZE)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def detect(self, frames: list[np.ndarray], max_detections: int):
        from torchvision.ops import roi_align

        from vlpcache.extract.detectors.regions import FrameRegions, select_detections, with_frame_region
        from vlpcache.extract.detectors.yolox import decode_yolox, letterbox

        torch = self.torch
        (frame,) = frames
        h, w = frame.shape[:2]
        resized, scale = letterbox(frame)  # (3, Hc, Wc) BGR 0-255, then onto the model's square input
        square = torch.full((1, 3, self.size, self.size), 114.0)
        square[0, :, : resized.shape[1], : resized.shape[2]] = resized
        with torch.inference_mode():
            raw = torch.from_numpy(self.session.run(None, {self.session.get_inputs()[0].name: square.numpy()})[0][0])
            boxes, scores, labels = decode_yolox(raw, self.grid, self.strides)
            keep = select_detections(boxes, scores, labels, 0.1, 0.5, max_detections)
            visible = torch.tensor([0.0, 0.0, w * scale, h * scale])
            boxes = torch.cat((visible[None], torch.minimum(boxes[keep].clamp_min(0), visible[[2, 3, 2, 3]])))
            rgb = ((square.flip(1) - self.mean) / self.std).to(self.device)
            trunk_map = self.trunk(rgb)
            rois = torch.cat((torch.zeros(len(boxes), 1), boxes), dim=1).to(self.device)
            features = roi_align(trunk_map, rois, 2, spatial_scale=1 / 32, sampling_ratio=2, aligned=True)
            features = features.mean(dim=(2, 3)).cpu().numpy()
        normalised = (boxes[1:] / scale / torch.tensor([w, h, w, h])).clamp_(0, 1).numpy()
        return [FrameRegions(*with_frame_region(normalised, scores[keep].numpy(), labels[keep].numpy()), features)]


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


def run_reference_command(kind: str, root: Path, out_dir: Path, args) -> tuple[int, float, float, int]:
    """A reference as its own process, like ours: (frames, whole-command seconds, loop seconds, decoded)."""
    cmd = [sys.executable, __file__, "--reference-only", str(root), "--reference-kind", kind,
           "--reference-out", str(out_dir), "--frames", str(args.frames), "--device", args.device]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"reference failed:\n{result.stderr}")
    frames, loop_seconds, decoded = result.stdout.split()
    shutil.rmtree(out_dir, ignore_errors=True)
    return int(frames), seconds, float(loop_seconds), int(decoded)


def run_vlpcache(root: Path, cache_dir: Path, args, engine: str = "local") -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "vlpcache", "extract", str(root), "-o", str(cache_dir), "--frames", str(args.frames),
           "--device", args.device, "--engine", engine, "--quiet"]
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


def run_engine(root: Path, cache_dir: Path, args, engine: str) -> tuple[float, float]:
    """`vlpcache extract --engine ENGINE` as a command: prints and returns (frames/s, frames/s after start-up)."""
    frames, seconds, summary = run_vlpcache(root, cache_dir, args, engine)
    # after start-up: from the detector being ready (imports and model loading done; ray: the first
    # actor's) to the end
    loop = (float(re.search(r"([0-9.]+) s, [0-9.]+ items/s", summary).group(1))
            - float(re.search(r"loaded after ([0-9.]+) s", summary).group(1)))
    print(f"  vlpcache extract --engine {engine}: {frames} frames in {seconds:.1f} s = {frames / seconds:.2f} frames/s "
          f"({frames / loop:.2f} frames/s after start-up and model loading)")
    print(f"    {summary}")
    return frames / seconds, frames / loop


def run_matrix(root: Path, scratch: Path, args) -> None:
    """extract for each detector x batch size, each in its own process: cold, then warm (see matrix_child)."""
    import torch

    weights = {"frcnn": args.frcnn_weights, "vg": args.vg_weights}
    if "frcnn" in args.detectors and not weights["frcnn"]:
        from torchvision.models import detection

        weights["frcnn"] = str(scratch / "frcnn-random.pth")
        torch.save(getattr(detection, args.frcnn_arch)(weights=None, weights_backbone=None).state_dict(), weights["frcnn"])
    if "vg" in args.detectors and not weights["vg"]:
        from vlpcache.extract.detectors.vg_model import VgFasterRCNN

        weights["vg"] = str(scratch / "vg-random.bin")  # the published checkpoint's layout
        torch.save(VgFasterRCNN().state_dict(), weights["vg"])
    for detector, batch_size, autotune in itertools.product(
            args.detectors.split(","), args.batch_sizes.split(","), autotune_choices(args.autotune)):
        cmd = [sys.executable, __file__, "--matrix-child", str(root), "--matrix-out", str(scratch / "matrix"),
               "--detectors", detector, "--batch-sizes", batch_size, "--frames", str(args.frames),
               "--device", args.device, "--frcnn-arch", args.frcnn_arch, "--autotune", autotune]
        cmd += ["--frcnn-weights", weights["frcnn"]] if detector == "frcnn" else []
        cmd += ["--vg-weights", weights["vg"]] if detector == "vg" else []
        cmd += ["--workers", str(args.workers)] if args.workers is not None else []
        result = subprocess.run(cmd, capture_output=True, text=True)
        print(result.stdout, end="", flush=True)
        if result.returncode != 0:
            print(f"  matrix {detector} batch {batch_size} autotune {autotune} failed (exit status {result.returncode}):\n"
                  f"{result.stderr[-2000:]}", flush=True)
        shutil.rmtree(scratch / "matrix", ignore_errors=True)


def autotune_choices(text: str) -> list[str]:
    """--autotune on,off: the matrix's settings of cuDNN's autotuning (extract --autotune/--no-autotune)."""
    choices = text.split(",")
    if set(choices) - {"on", "off"}:
        raise SystemExit(f"--autotune {text!r}: give on, off or on,off")
    return choices


def matrix_child(root: Path, args) -> None:
    """One matrix configuration, in a process of its own: `extract` in-process twice over the same items.

    The first (cold) pass pays what each new process pays once: CUDA's lazy loading of kernels and
    cuDNN's autotuning of each new input shape. The second (warm) pass, into a new cache, loads the
    detector again but finds those done, so it shows the steady rate of a long job. Both print frames/s
    once the detector is loaded, the share of its time the detector waited for decoded frames, peak GPU
    memory and, for yolox, how many distinct input shapes reached its networks. (The matrix ran every
    configuration in one process until 2026-12-04, so each was measured after its predecessors had
    warmed some of its shapes.)"""
    import torch

    from vlpcache.extract.detectors import yolox
    from vlpcache.extract.runner import run_extract

    shapes = set()  # of the batches that reach yolox's networks
    run_yolox = yolox.YoloxDetector._run_yolox

    def counted(self, images):
        shapes.add(tuple(images.shape))
        return run_yolox(self, images)

    yolox.YoloxDetector._run_yolox = counted
    detector, batch_size, autotune = args.detectors, int(args.batch_sizes), args.autotune == "on"
    weights = {"frcnn": args.frcnn_weights, "vg": args.vg_weights}.get(detector)
    for label in ("cold", "warm"):
        shapes.clear()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary = run_extract(
            [root], cache_dir=args.matrix_out / label, frames=args.frames, detector=detector,
            backbone=args.frcnn_arch if detector == "frcnn" else None, weights=weights, device=args.device,
            batch_size=batch_size, autotune=autotune, workers=args.workers, quiet=True)
        busy = summary.detect_seconds + summary.wait_seconds
        loaded = summary.seconds - summary.load_seconds
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
        counted_shapes = f", {len(shapes)} input shape(s)" if detector == "yolox" else ""
        tuned = "" if autotune else " no-autotune"
        print(f"  matrix {detector:5s} batch {batch_size:4d}{tuned} {label}: {summary.frames / loaded:7.2f} frames/s once loaded "
              f"({summary.frames} frames in {loaded:.1f} s), detector waited "
              f"{100 * summary.wait_seconds / max(busy, 1e-9):5.1f}% of its time for frames{peak}{counted_shapes}",
              flush=True)


def run_runtimes(root: Path, args) -> None:
    """yolox's two runtimes (onnxruntime; the ONNX graph converted to torch with the torchvision trunk)
    on the same decoded frames, detector only, per batch size: the measurement issue 5 asks to choose by."""
    import torch

    from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector
    from vlpcache.extract.reader import FrameReader

    items, _ = discover_items([root])
    frames = [f for d in FrameReader(args.frames, 416, workers=0)(items) if d.sampled for f in d.sampled.frames]
    for runtime in ("onnxruntime", "torch"):
        detector = YoloxDetector(YoloxConfig(device=args.device, runtime=runtime))
        where = detector.session.get_providers()[0] if detector.session else f"torch on {args.device}"
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            detector.detect(frames[:batch_size], 30)  # warm-up: cudnn autotuning, onnxruntime arenas
            start = time.perf_counter()
            for k in range(0, len(frames), batch_size):
                detector.detect(frames[k : k + batch_size], 30)  # returns host arrays: synchronised
            rate = len(frames) / (time.perf_counter() - start)
            peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
            print(f"  runtime {runtime:11s} ({where}) batch {batch_size:4d}: {rate:7.2f} frames/s, detector only{peak}")


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
    parser.add_argument("--runtimes", action=argparse.BooleanOptionalAction, default=None,
                        help="yolox onnxruntime vs torch runtime, detector only [default: on with --device cuda]")
    parser.add_argument("--detectors", default="yolox,frcnn")
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--autotune", default="on", help="matrix: cuDNN's autotuning, on, off or on,off (extract --autotune)")
    parser.add_argument("--frcnn-arch", default="fasterrcnn_resnet50_fpn_v2")
    parser.add_argument("--frcnn-weights", default=None)
    parser.add_argument("--vg-weights", default=None, help="vg: the checkpoint (default: random weights in its layout)")
    parser.add_argument("--matrix-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--matrix-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-kind", choices=("simple", "detector"), default="simple", help=argparse.SUPPRESS)
    parser.add_argument("--references", default="simple,detector", help="references to run (simple, detector)")
    parser.add_argument("--engines", default=None, help="vlpcache extract engines to run: local, ray "
                                                        "[default: local, and ray when it is installed]")
    args = parser.parse_args()
    if args.engines is None:
        args.engines = "local,ray" if importlib.util.find_spec("ray") else "local"
    engines = list(filter(None, args.engines.split(",")))
    if not engines or set(engines) - {"local", "ray"}:
        parser.error(f"--engines {args.engines!r}: choose one or more of local, ray")
    unknown = set(filter(None, args.references.split(","))) - {"simple", "detector"}
    if unknown:
        parser.error(f"--references: unknown {', '.join(sorted(unknown))}; choose from simple, detector")
    if args.matrix is None:
        args.matrix = args.device == "cuda"
    if args.runtimes is None:
        args.runtimes = args.device == "cuda"
    os.environ.setdefault("VLPCACHE_MODELS", str(SHARED / "models"))

    if args.matrix_child:  # child process: one configuration of the matrix
        matrix_child(args.matrix_child, args)
        return
    if args.reference_only:  # child process: a reference, timed from its own start like `vlpcache extract`
        items, _ = discover_items([args.reference_only])
        args.reference_out.mkdir(parents=True, exist_ok=True)
        if args.reference_kind == "simple":
            detector = SimpleReference(Path(os.environ["VLPCACHE_MODELS"]), args.device)
        else:
            from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector

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
            print(f"{name}: {len(items)} items, T={args.frames}")
            rates = {engine: run_engine(root, scratch / f"cache-{name}-{engine}", args, engine) for engine in engines}
            if len(rates) == 2:
                (local, local_loop), (on_ray, on_ray_loop) = rates["local"], rates["ray"]
                print(f"    ray engine overhead (local / ray): whole commands {local / on_ray:.2f}x, "
                      f"after start-up {local_loop / on_ray_loop:.2f}x")
            ours_rate, ours_loop_rate = rates[engines[0]]
            for kind in filter(None, args.references.split(",")):
                frames, seconds, loop, decoded = run_reference_command(kind, root, scratch / f"ref-{kind}-{name}", args)
                print(f"  reference {kind} (decodes all {decoded} frames, one frame at a time, npz per frame): "
                      f"{frames} frames in {seconds:.1f} s = {frames / seconds:.2f} frames/s "
                      f"({frames / loop:.2f} frames/s after start-up and model loading)")
                print(f"    ratio to {kind}: whole commands {ours_rate / (frames / seconds):.2f}x, "
                      f"after start-up {ours_loop_rate / (frames / loop):.2f}x")
            if args.matrix:
                run_matrix(root, scratch, args)
            if args.runtimes:
                run_runtimes(root, args)


if __name__ == "__main__":
    main()
