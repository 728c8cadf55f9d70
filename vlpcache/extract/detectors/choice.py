"""The detector named on the command line: chosen (files found and hashed, nothing loaded) and loaded.

Above the spec and the detector implementations: it imports them, they never import it.
"""

from __future__ import annotations

from pathlib import Path

from vlpcache.cache.schema import NMS_IOU
from vlpcache.errors import UserError
from vlpcache.extract.detectors.spec import (
    DEFAULT_FRCNN_ARCH,
    DEFAULT_YOLOX_BACKBONE,
    DETECTORS,
    DetectorSpec,
    check_architecture,
    frcnn_spec,
    yolox_spec,
)


def choose_detector(detector: str, backbone: str | None, weights: str | None, models: str | None) -> DetectorSpec:
    """The detector named on the command line with its weight files found (frcnn: downloaded when
    online) and hashed, or one clear error naming the file."""
    if detector == "yolox":
        if weights:
            raise UserError("--weights is for --detector frcnn; yolox reads its files from --models")
        return yolox_spec(backbone or DEFAULT_YOLOX_BACKBONE, models)
    if detector == "frcnn":
        arch = check_architecture(backbone or DEFAULT_FRCNN_ARCH)
        if weights:
            return frcnn_spec(arch, Path(weights).expanduser())
        from vlpcache.extract.detectors.weights import fetch_torchvision_weights  # torch.hub finds the file

        return frcnn_spec(arch, fetch_torchvision_weights(arch, "DEFAULT"))
    raise UserError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")


def load_detector(spec: DetectorSpec, device: str, score_threshold: float, nms_iou: float = NMS_IOU):
    """The networks of `spec`, loaded on `device` (a Detector, see regions.py); imports torch."""
    if spec.detector == "yolox":
        from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector

        config = YoloxConfig(backbone=spec.backbone, score_threshold=score_threshold, nms_iou=nms_iou, device=device)
        return YoloxDetector(config, spec=spec)
    from vlpcache.extract.detectors.frcnn import FasterRCNNDetector, FrcnnConfig

    config = FrcnnConfig(arch=spec.backbone, weights_file=str(spec.detector_file), device=device,
                         score_threshold=score_threshold, nms_iou=nms_iou)
    return FasterRCNNDetector(config, spec=spec)
