"""The detector protocol and the region-selection rules every detector shares.

A detector maps a batch of RGB frames to, per frame, at most N-1 detections (after class-agnostic
NMS, best first) with one feature vector each; `pack_frame_regions` then puts the whole-frame region
at index 0 and pads to N with masked zeros (never by repeating boxes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vlpcache.cache.labels import NO_ATTRIBUTE
from vlpcache.cache.schema import FRAME_REGION_LABEL
from vlpcache.extract.detectors.spec import DetectorSpec
from vlpcache.extract.detectors.vision_ops import nms


@dataclass
class FrameRegions:
    """Detections of one frame, best first; boxes normalised (x1, y1, x2, y2) in [0, 1]."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    labels: np.ndarray  # (n,) int64, the detector's class index (labels.region_names)
    features: np.ndarray  # (n, D) float32
    # detectors that label attributes (vg): each region's best attribute, NO_ATTRIBUTE for the whole frame
    attributes: np.ndarray | None = None  # (n,) int64
    attribute_scores: np.ndarray | None = None  # (n,) float32


class Detector(Protocol):
    """frames (uint8 RGB, any sizes) -> per frame: boxes, scores, labels, features."""

    name: str
    spec: DetectorSpec  # the weight files it was built from and their provenance, for the cache manifest
    feature_dim: int
    max_side: int  # decoder workers downscale frames so that their longer side is at most this

    def detect(self, frames: list[np.ndarray], max_detections: int) -> list[FrameRegions]:
        """Detect up to `max_detections` regions per frame and compute one feature per region
        plus one for the whole frame, returned as the first row of each FrameRegions."""
        ...


def select_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
    score_threshold: float, nms_iou: float, max_detections: int,
) -> torch.Tensor:
    """Indices of the detections to keep: above threshold, class-agnostic NMS, best `max_detections`.

    boxes (n, 4) xyxy in any pixel frame; returns indices sorted by descending score.
    """
    keep = torch.nonzero(scores >= score_threshold).flatten()  # (k,) indices into the n detections
    if keep.numel() == 0 or max_detections <= 0:
        return keep[:0]
    kept = nms(boxes[keep].float(), scores[keep].float(), nms_iou)  # sorted by score already
    return keep[kept[:max_detections]]


def pack_frame_regions(regions: FrameRegions, n_regions: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays for one frame: the given rows (whole frame first), padded to n_regions."""
    n = min(len(regions.scores), n_regions)
    dim = regions.features.shape[1]
    out = {
        "features": np.zeros((n_regions, dim), np.float32),
        "boxes": np.zeros((n_regions, 4), np.float32),
        "scores": np.zeros((n_regions,), np.float32),
        "labels": np.full((n_regions,), FRAME_REGION_LABEL, np.int64),
        "region_mask": np.zeros((n_regions,), bool),
    }
    out["features"][:n] = regions.features[:n]
    out["boxes"][:n] = np.clip(regions.boxes[:n], 0.0, 1.0)
    out["scores"][:n] = regions.scores[:n]
    out["labels"][:n] = regions.labels[:n]
    out["region_mask"][:n] = True
    if regions.attributes is not None:
        out["attributes"] = np.full((n_regions,), NO_ATTRIBUTE, np.int64)
        out["attributes"][:n] = regions.attributes[:n]
        out["attribute_scores"] = np.zeros((n_regions,), np.float32)
        out["attribute_scores"][:n] = regions.attribute_scores[:n]
    return out


def with_frame_region(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Prepend the whole-frame region (box [0,0,1,1], score 1, label FRAME_REGION_LABEL)."""
    return (
        np.concatenate([np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), boxes.astype(np.float32)]),  # (1 + n, 4)
        np.concatenate([np.ones(1, np.float32), scores.astype(np.float32)]),  # (1 + n,)
        np.concatenate([np.full(1, FRAME_REGION_LABEL, np.int64), labels.astype(np.int64)]),  # (1 + n,)
    )
