"""Run the detector over decoded items in frame batches and pack each item into cache arrays."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from vlpcache.cache.schema import CacheSettings, empty_item
from vlpcache.errors import UserError
from vlpcache.extract.reader import DecodedItem
from vlpcache.extract.regions import Detector, pack_frame_regions


@dataclass
class RegionItem:
    decoded: DecodedItem
    arrays: dict[str, np.ndarray] | None  # schema.ARRAYS for one video; None when it failed
    error: str | None = None


def build_detector(
    detector: str,
    backbone: str | None,
    weights: str | None,
    models: str | None,
    device: str,
    score_threshold: float,
    nms_iou: float = 0.5,
) -> Detector:
    """The detector named on the command line, with its weights found or one clear error."""
    if detector == "yolox":
        from vlpcache.extract.yolox import YoloxConfig, YoloxDetector

        if weights:
            raise UserError("--weights is for --detector frcnn; yolox reads its files from --models")
        config = YoloxConfig(backbone=backbone or "mobilenet_v2", score_threshold=score_threshold,
                             nms_iou=nms_iou, device=device)
        return YoloxDetector(config, models=models)
    if detector == "frcnn":
        from vlpcache.extract.frcnn import FasterRCNNDetector

        return FasterRCNNDetector(
            arch=backbone or "fasterrcnn_resnet50_fpn_v2", weights_file=weights, device=device,
            score_threshold=score_threshold, nms_iou=nms_iou,
        )
    raise UserError(f"unknown detector {detector!r}; choose yolox or frcnn")


def cache_settings(detector: Detector, frames: int, regions: int, score_threshold: float, nms_iou: float = 0.5) -> CacheSettings:
    return CacheSettings(
        frames=frames, regions=regions + 1, feature_dim=detector.feature_dim,
        score_threshold=score_threshold, nms_iou=nms_iou, **detector.provenance(),
    )


class RegionMapper:
    """Batches frames across items so the detector always sees `batch_size` frames or more."""

    def __init__(self, detector: Detector, settings: CacheSettings, batch_size: int):
        self.detector = detector
        self.settings = settings
        self.batch_size = batch_size
        self.wait_seconds = 0.0  # time the detector stood idle waiting for decoded frames
        self.detect_seconds = 0.0

    def __call__(self, decoded: Iterable[DecodedItem]) -> Iterator[RegionItem]:
        batch: list[DecodedItem] = []
        frames = 0
        decoded = iter(decoded)
        while True:
            waiting = time.perf_counter()
            item = next(decoded, None)
            self.wait_seconds += time.perf_counter() - waiting
            if item is None:
                break
            if item.sampled is None:
                yield RegionItem(item, None, item.error)
                continue
            batch.append(item)
            frames += len(item.sampled.frames)
            if frames >= self.batch_size:
                yield from self._detect(batch)
                batch, frames = [], 0
        if batch:
            yield from self._detect(batch)

    def _detect(self, batch: list[DecodedItem]) -> Iterator[RegionItem]:
        frames = [f for item in batch for f in item.sampled.frames]
        started = time.perf_counter()
        regions = self.detector.detect(frames, max_detections=self.settings.regions - 1)
        self.detect_seconds += time.perf_counter() - started
        start = 0
        for item in batch:
            count = len(item.sampled.frames)
            yield RegionItem(item, self._pack(item, regions[start : start + count]))
            start += count

    def _pack(self, item: DecodedItem, frame_regions) -> dict[str, np.ndarray]:
        arrays = empty_item(self.settings)
        sampled = item.sampled
        for t, regions in enumerate(frame_regions[: self.settings.frames]):
            packed = pack_frame_regions(regions, self.settings.regions)
            for name, value in packed.items():
                arrays[name][t] = value
            arrays["frame_mask"][t] = True
            arrays["timestamps"][t] = sampled.timestamps[t]
        arrays["frame_size"][:] = sampled.size
        arrays["duration"][...] = sampled.duration
        return arrays
