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
