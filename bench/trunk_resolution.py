"""Does MobileNetV2 read frames better at another input size than YOLOX's 416 letterbox?

The extractor runs YOLOX-Nano and the MobileNetV2 trunk on one letterboxed batch (longer side 416),
so MSR-VTT's 320x240 frames reach an ImageNet trunk upscaled 1.3x. This computes the whole-frame
feature the cache stores (the exact mean of the trunk's map over the visible frame) with the trunk at
other letterbox sides, from the same frames the cache sampled, and trains the frozen baseline of
`bench/quality.py` on each (all captions per epoch, its learning-rate grid, seeds; best epoch on val,
every val caption a query). It measures the global path only: region features pooled from the map are
what `vlpcache pretrain` would add on top. At the cache's own side the features must equal the cache's
(printed as a cosine), which checks that the comparison reads the same frames the same way.

    python bench/trunk_resolution.py --workspace WS --msrvtt-cache CACHE --sides 224 320 416 544 640
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, BaselineConfig, BaselineData, load_split, selection_score, train_baseline  # noqa: E402

from vlpcache.cache.reader import RegionCache  # noqa: E402
from vlpcache.errors import UserError  # noqa: E402
from vlpcache.extract.detectors.spec import YOLOX_INPUT_SIZE, yolox_spec  # noqa: E402
from vlpcache.extract.detectors.yolox import STRIDES, _mobilenet_onnx, _onnx_session, frame_average, letterbox  # noqa: E402
from vlpcache.extract.sampling import _read_image  # noqa: E402
from vlpcache.extract.sources import frame_files  # noqa: E402


def whole_frame_features(cache: RegionCache, ids: list[str], side: int, session) -> torch.Tensor:
    """(V, 1280): each item's whole-frame trunk features at letterbox `side`, averaged over its real
    frames (frame-folder items: the frames at the positions the cache sampled)."""
    rows = []
    for item_id in ids:
        item = cache.get(item_id, ("frame_mask", "timestamps"))
        row = cache.index_of(item_id)
        if cache.kinds[row] != "frames":
            raise SystemExit(f"{item_id}: a {cache.kinds[row]} item; this bench reads frame folders only")
        files = frame_files(Path(cache.paths[row]))
        per_frame = []
        for position in item["timestamps"][item["frame_mask"].astype(bool)]:
            frame = _read_image(files[int(position)], 1 << 16)[0]  # (H, W, 3) RGB, never downscaled
            canvas, scale = letterbox(frame, side)  # (3, Hc, Wc) BGR 0-255
            feature_map = torch.from_numpy(session.run(None, {"images": canvas[None].numpy()})[0])[0]  # (1280, Hc/32, Wc/32)
            per_frame.append(frame_average(feature_map, frame.shape[0] * scale, frame.shape[1] * scale, STRIDES[-1]))
        rows.append(torch.stack(per_frame).mean(0))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True, help="frozen caption features go here")
    parser.add_argument("--msrvtt-cache", type=Path, required=True, help="`vlpcache extract` (defaults) of the MSR-VTT frame folders")
    parser.add_argument("--sides", type=int, nargs="+", default=[224, 320, 416, 544, 640])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))

    try:
        cache = RegionCache(args.msrvtt_cache)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    splits = {s: load_split(s, cache, SHARED / "data" / "msrvtt" / f"{s}.jsonl") for s in ("train", "val")}
    for name, split in splits.items():
        if not split.ids:
            raise SystemExit(f"error: {args.msrvtt_cache} holds no item of MSR-VTT's {name} captions; "
                             f"extract shared/data/msrvtt/frames/{{train,val}} into it")
    spec = yolox_spec("mobilenet_v2", None)
    session = _mobilenet_onnx(spec.backbone_file, spec.provenance["backbone_weights_sha256"], lambda graph: _onnx_session(graph, "cpu", 0))
    frozen = BaselineData(splits, args.workspace)
    stored = frozen.videos["val"]
    print(f"{'side':>5} {'lr':>7} {'R@1':>12} {'R@1+5+10':>12} {'features':>9}")
    for side in args.sides:
        started = time.monotonic()
        frozen.videos = {name: whole_frame_features(cache, splits[name].ids, side, session) for name in splits}
        seconds = time.monotonic() - started
        if side == YOLOX_INPUT_SIZE:
            cosine = F.cosine_similarity(frozen.videos["val"], stored)
            print(f"side {side}: cosine with the cache's whole-frame features, min {cosine.min():.5f}", file=sys.stderr)
        train, val = frozen.train_inputs("train"), frozen.eval_inputs("val", True)
        for lr in args.lrs:
            best = [max(train_baseline(BaselineConfig(lr=lr, captions="all"), seed, train, val)[1], key=selection_score)
                    for seed in args.seeds]
            r1, total = [m["R@1"] for m in best], [selection_score(m) for m in best]
            print(f"{side:>5} {lr:>7g} {np.mean(r1):>6.2f} ± {np.std(r1):.2f} {np.mean(total):>6.1f} ± {np.std(total):.1f} "
                  f"{seconds:>8.0f}s", flush=True)


if __name__ == "__main__":
    main()
