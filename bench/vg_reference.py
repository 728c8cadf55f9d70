"""`--detector vg` against its reference implementation: transformers' LXMERT demo Faster R-CNN
(examples/research_projects/lxmert/modeling_frcnn.py and processing_image.py, the code that loads
`unc-nlp/frcnn-vg-finetuned`), with the same random weights in both, on real frames.

The reference is not part of vlpcache and is not committed: fetch the two files (and keep them
together in one folder), then

    python bench/vg_reference.py --reference DIR [--frames 6] [--min-size 600 --max-size 1000]

It checks, frame by frame:
  network   proposals, class and attribute probabilities, box deltas and the pooled 2048-d features of
            every proposal (our VgFasterRCNN against the reference's backbone, RPN and Res5ROIHeads);
  selection the reference's own output (its do_nms: best class per proposal, class-agnostic NMS, at
            most MAX_DETECTIONS boxes) against our detector run with selection="max-class": boxes,
            scores, object and attribute labels and scores, features;
and prints the largest differences. Our default selection (selection="class-aware", bottom-up
attention's per-class NMS over the proposals) has no counterpart in the reference; tests/test_vg.py
checks it against a per-class loop.

The reference imports a `utils` module (configuration and download helpers of the demo) for names it
only uses to download; this script provides the few it needs (a Config over a dict) instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The published config of unc-nlp/frcnn-vg-finetuned as far as it shapes the network (R101-C4, 1600
# objects, 400 attributes, 12 anchors of 64-512 px, a 512-wide RPN, 14x14 RoIPool, dilated res5,
# caffe max pool, BGR pixel means), with bottom-up attention's test settings for the rest.
REFERENCE_CONFIG = {
    "MODEL": {"DEVICE": "cpu", "MAX_POOL": True, "PIXEL_MEAN": [102.9801, 115.9465, 122.7717],
              "PIXEL_STD": [1.0, 1.0, 1.0]},
    "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": 600, "MAX_SIZE_TEST": 1000},
    "SIZE_DIVISIBILITY": 0, "PAD_VALUE": 0.0,
    "MIN_DETECTIONS": 10, "MAX_DETECTIONS": 36,
    "BACKBONE": {"FREEZE_AT": 2},
    "RESNETS": {"DEPTH": 101, "NORM": "BN", "NUM_GROUPS": 1, "OUT_FEATURES": ["res4"], "RES2_OUT_CHANNELS": 256,
                "RES5_DILATION": 1, "STEM_OUT_CHANNELS": 64, "STRIDE_IN_1X1": True, "WIDTH_PER_GROUP": 64},
    "PROPOSAL_GENERATOR": {"HIDDEN_CHANNELS": 512, "MIN_SIZE": 0.0},
    "ANCHOR_GENERATOR": {"SIZES": [[64, 128, 256, 512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]], "OFFSET": 0.0},
    "RPN": {"IN_FEATURES": ["res4"], "NMS_THRESH": 0.7, "PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 300,
            "PRE_NMS_TOPK_TRAIN": 12000, "POST_NMS_TOPK_TRAIN": 2000, "BATCH_SIZE_PER_IMAGE": 256,
            "POSITIVE_FRACTION": 0.5, "SMOOTH_L1_BETA": 0.0, "LOSS_WEIGHT": 1.0, "BOUNDARY_THRESH": -1,
            "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0], "IOU_THRESHOLDS": [0.3, 0.7], "IOU_LABELS": [0, -1, 1]},
    "ROI_HEADS": {"IN_FEATURES": ["res4"], "NUM_CLASSES": 1600, "POSITIVE_FRACTION": 0.25,
                  "PROPOSAL_APPEND_GT": True, "SCORE_THRESH_TEST": 0.2, "NMS_THRESH_TEST": 0.5},
    "ROI_BOX_HEAD": {"ATTR": True, "NUM_ATTRS": 400, "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
                     "CLS_AGNOSTIC_BBOX_REG": False, "POOLER_RESOLUTION": 14, "POOLER_SAMPLING_RATIO": 0,
                     "RES5HALVE": False, "SMOOTH_L1_BETA": 0.0},
}


class Config:
    """The demo's Config as the reference reads it: nested dicts as attributes."""

    def __init__(self, values: dict):
        for key, value in values.items():
            setattr(self, key, Config(value) if isinstance(value, dict) else value)


def load_reference(folder: str | Path) -> types.SimpleNamespace:
    """modeling_frcnn and processing_image from `folder`, imported with a stand-in for the demo's utils."""
    folder = Path(folder)
    missing = [name for name in ("modeling_frcnn.py", "processing_image.py") if not (folder / name).is_file()]
    if missing:
        sys.exit(f"{folder}: {', '.join(missing)} missing; fetch them from transformers' "
                 "examples/research_projects/lxmert/")
    utils = types.ModuleType("utils")
    utils.Config, utils.WEIGHTS_NAME, utils.img_tensorize = Config, "pytorch_model.bin", None
    utils.cached_path = utils.hf_bucket_url = utils.is_remote_url = utils.load_checkpoint = None
    sys.modules["utils"] = utils
    modules = {}
    for name in ("modeling_frcnn", "processing_image"):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return types.SimpleNamespace(GeneralizedRCNN=modules["modeling_frcnn"].GeneralizedRCNN,
                                 Preprocess=modules["processing_image"].Preprocess, Config=Config)


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for the reference's own layout: its initialisation, with the frozen batch norms'
    statistics and the heads drawn anew (spread out so that classes, attributes and boxes differ between regions)."""
    torch.manual_seed(seed + 1)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith(("running_mean", "norm.bias")):
            value = torch.randn_like(value) * 0.05
        elif name.endswith(("running_var", "norm.weight")):
            value = torch.rand_like(value) * 0.4 + 0.8
        elif "box_predictor" in name or "rpn_head" in name:
            value = torch.randn_like(value) * (0.02 if value.dim() > 1 else 0.1)
        state[name] = value.clone()
    return state


def real_frames(shared: Path, count: int) -> list[np.ndarray]:
    """RGB frames of MSR-VTT (320x240) and Flickr8k photos (various sizes), half and half."""
    from PIL import Image

    msrvtt = sorted((shared / "data" / "msrvtt" / "frames" / "devtest").iterdir())[: (count + 1) // 2]
    flickr = sorted((shared / "data" / "flickr8k" / "images").iterdir())[: count // 2]
    paths = [sorted(folder.iterdir())[0] for folder in msrvtt] + flickr
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def reference_outputs(reference, model, config, frames: list[np.ndarray]) -> dict:
    """The reference on a batch of frames: its network's intermediate outputs and its own final selection."""
    preprocess = reference.Preprocess(config)
    with torch.no_grad():
        images, sizes, scales_yx = preprocess([torch.from_numpy(f[:, :, ::-1].copy()) for f in frames])  # BGR, HWC
        features = model.backbone(images)
        proposals, _ = model.proposal_generator(images, sizes, features, None)
        obj_logits, attr_logits, deltas, pooled = model.roi_heads(features, proposals, None)
        boxes, classes, probs, attrs, attr_probs, roi_features = model.roi_outputs(
            obj_logits=obj_logits, attr_logits=attr_logits, box_deltas=deltas, pred_boxes=proposals,
            features=pooled, sizes=sizes, scales=scales_yx)
    counts = [len(p) for p in proposals]
    raw = [torch.tensor(f.shape[:2], dtype=torch.float32) for f in frames]  # (h, w)
    return {"sizes": [tuple(int(v) for v in s) for s in sizes], "proposals": proposals,
            "class_probs": obj_logits.softmax(-1)[:, :-1].split(counts), "deltas": deltas.split(counts),
            "attribute_probs": attr_logits[:, :-1].softmax(-1).split(counts), "features": pooled.split(counts),
            "boxes": [b / r[[1, 0, 1, 0]] for b, r in zip(boxes, raw)], "scores": probs, "labels": classes,
            "attributes": attrs, "attribute_scores": attr_probs, "region_features": roi_features}


def largest(pairs) -> float:
    return max(float((torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max())
               if len(a) else 0.0 for a, b in pairs)


def compare_network(ours: dict, theirs: dict) -> dict:
    """Largest differences of every proposal's outputs; the proposals must be the same boxes in the same order."""
    same_count = all(len(a) == len(b) for a, b in zip(ours["proposals"], theirs["proposals"]))
    if not same_count:
        return {"proposals": "different counts: " + str([(len(a), len(b)) for a, b in zip(ours["proposals"], theirs["proposals"])])}
    attribute_probs = [torch.as_tensor(s) for s in ours["attribute_probs"]]
    return {
        "sizes equal": ours["sizes"] == theirs["sizes"],
        "proposals (px)": largest(zip(ours["proposals"], theirs["proposals"])),
        "class probabilities": largest(zip(ours["class_probs"], theirs["class_probs"])),
        "box deltas": largest(zip(ours["deltas"], theirs["deltas"])),
        "attribute probabilities": largest(zip(attribute_probs, theirs["attribute_probs"])),
        "features (2048-d)": largest(zip(ours["features"], theirs["features"])),
        "feature magnitude (mean abs)": float(torch.cat(theirs["features"]).abs().mean()),
    }


def compare_selection(regions: list, theirs: dict) -> dict:
    """Our max-class regions (whole frame left out) against the reference's own output, frame by frame."""
    counts = [(len(r.scores) - 1, len(b)) for r, b in zip(regions, theirs["boxes"])]
    if any(a != b for a, b in counts):
        return {"regions per frame (ours, reference)": counts}
    pairs = lambda ours, key: [(getattr(r, ours)[1:], t) for r, t in zip(regions, theirs[key])]  # noqa: E731
    return {
        "regions per frame": [a for a, _ in counts],
        "object labels equal": all(np.array_equal(r.labels[1:], t.numpy()) for r, t in zip(regions, theirs["labels"])),
        "attribute labels equal": all(np.array_equal(r.attributes[1:], t.numpy())
                                      for r, t in zip(regions, theirs["attributes"])),
        "boxes (normalised)": largest(pairs("boxes", "boxes")),
        "object scores": largest(pairs("scores", "scores")),
        "attribute scores": largest(pairs("attribute_scores", "attribute_scores")),
        "features (2048-d)": largest(pairs("features", "region_features")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="folder with modeling_frcnn.py and processing_image.py")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=1000)
    parser.add_argument("--proposals", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from vlpcache.extract.detectors.vg import VgDetector

    reference = load_reference(args.reference)
    values = REFERENCE_CONFIG | {"INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": args.min_size, "MAX_SIZE_TEST": args.max_size}}
    values["RPN"] = REFERENCE_CONFIG["RPN"] | {"POST_NMS_TOPK_TEST": args.proposals}
    config = reference.Config(values)
    torch.manual_seed(args.seed)  # the reference's own initialisation draws the convolutions
    theirs_model = reference.GeneralizedRCNN(config).eval()
    state = random_state(theirs_model, args.seed)
    theirs_model.load_state_dict(state)
    frames = real_frames(Path(args.shared), args.frames)
    checkpoint = Path(f"/tmp/vg-reference-{os.getpid()}.bin")
    torch.save(state, checkpoint)  # the published layout: ours loads it as it would the real file
    try:
        ours_model = VgDetector(weights_file=str(checkpoint), selection="max-class", score_threshold=0.0,
                                min_size=args.min_size, max_size=args.max_size, proposals=args.proposals)
    finally:
        checkpoint.unlink()
    print(f"{len(frames)} real frames ({', '.join(f'{f.shape[1]}x{f.shape[0]}' for f in frames)}), "
          f"{args.min_size}/{args.max_size}, {args.proposals} proposals, random weights (seed {args.seed}), "
          f"CPU float32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    started = time.perf_counter()
    theirs = reference_outputs(reference, theirs_model, config, frames)
    reference_s = time.perf_counter() - started
    started = time.perf_counter()
    ours = ours_model.network(frames)
    network_s = time.perf_counter() - started
    regions = ours_model.frame_regions(ours, values["MAX_DETECTIONS"])
    max_class_s = time.perf_counter() - started - network_s
    ours_model.config.selection = "class-aware"  # the default: bottom-up attention's selection
    started = time.perf_counter()
    default_regions = ours_model.frame_regions(ours, values["MAX_DETECTIONS"])
    class_aware_s = time.perf_counter() - started
    ours["attribute_probs"] = network_attribute_probs(ours_model, ours)
    for title, figures in (("network, every proposal", compare_network(ours, theirs)),
                           ("selection (max-class) against the reference's output", compare_selection(regions, theirs))):
        print(f"\n{title}: largest absolute difference")
        for key, value in figures.items():
            print(f"  {key:32s} {value:.3g}" if isinstance(value, float) else f"  {key:32s} {value}")
    per_frame = lambda seconds: f"{1e3 * seconds / len(frames):.0f} ms"  # noqa: E731
    print(f"\nper frame (batch of {len(frames)}): reference {per_frame(reference_s)}; ours: network {per_frame(network_s)}, "
          f"selection max-class {per_frame(max_class_s)}, class-aware (default) {per_frame(class_aware_s)} "
          f"keeping {[len(r.scores) - 1 for r in default_regions]} regions")


def network_attribute_probs(detector, out: dict) -> list[torch.Tensor]:
    """Every proposal's attribute probabilities from our network (network() keeps only the best)."""
    with torch.inference_mode():
        _, _, logits = detector.model.roi_heads.box_predictor(torch.cat(out["features"]))
    return list(logits[:, :-1].softmax(-1).split([len(p) for p in out["proposals"]]))


if __name__ == "__main__":
    main()
