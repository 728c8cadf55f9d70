"""The detector named on the command line: chosen (files found and hashed, nothing loaded) and loaded.

Above the spec and the detector implementations: it imports them, they never import it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vlpcache.errors import UserError
from vlpcache.extract.detectors.spec import (
    DEFAULT_FRCNN_ARCH,
    DEFAULT_YOLOX_BACKBONE,
    DETECTORS,
    DetectorSpec,
    check_architecture,
    frcnn_spec,
    vg_spec,
    vg_weights,
    with_input_size,
    yolox_spec,
)


def choose_detector(detector: str, backbone: str | None, weights: str | None, models: str | None,
                    scale: tuple[int, int] | None = None, proposals: int | None = None) -> DetectorSpec:
    """The detector named on the command line with its weight files found (frcnn: downloaded when
    online; vg: fetched into the models folder) and hashed, or one clear error naming the file."""
    return with_input_size(named_detector(detector, backbone, weights, models), scale, proposals)


def named_detector(detector: str, backbone: str | None, weights: str | None, models: str | None) -> DetectorSpec:
    if detector == "yolox":
        if weights:
            raise UserError("--weights is for --detector frcnn or vg; yolox reads its files from --models")
        return yolox_spec(backbone or DEFAULT_YOLOX_BACKBONE, models)
    if detector == "frcnn":
        arch = check_architecture(backbone or DEFAULT_FRCNN_ARCH)
        if weights:
            return frcnn_spec(arch, Path(weights).expanduser())
        from vlpcache.extract.detectors.weights import fetch_torchvision_weights  # torch.hub finds the file

        return frcnn_spec(arch, fetch_torchvision_weights(arch, "DEFAULT"))
    if detector == "vg":
        if backbone:
            raise UserError("--backbone is for yolox and frcnn; vg is one network (R101-C4), its weights from --weights FILE")
        return vg_spec(vg_weights(weights, models))
    raise UserError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")


def load_detector(spec: DetectorSpec, device: str, score_threshold: float, autotune: bool = True):
    """The networks of `spec`, loaded on `device` (a Detector, see regions.py), with cuDNN's autotuning
    on CUDA if `autotune`; imports torch."""
    weights = str(spec.detector_file) if spec.detector_file else None
    if spec.detector == "yolox":
        from vlpcache.extract.detectors.yolox import YoloxConfig, YoloxDetector

        config = YoloxConfig(backbone=spec.backbone, score_threshold=score_threshold, nms_iou=spec.nms_iou, device=device,
                             autotune=autotune)
        return YoloxDetector(config, spec=spec)
    if spec.detector == "vg":
        from vlpcache.extract.detectors.vg import VgConfig, VgDetector

        config = VgConfig(weights_file=weights, device=device, score_threshold=score_threshold, nms_iou=spec.nms_iou,
                          autotune=autotune)
        return VgDetector(replace(config, **input_size(spec)), spec=spec)
    from vlpcache.extract.detectors.frcnn import FasterRCNNDetector, FrcnnConfig

    config = FrcnnConfig(arch=spec.backbone, weights_file=weights, weights=None, device=device,
                         score_threshold=score_threshold, nms_iou=spec.nms_iou, autotune=autotune)
    return FasterRCNNDetector(replace(config, **input_size(spec)), spec=spec)


def input_size(spec: DetectorSpec) -> dict:
    """The Faster R-CNN config fields that --scale and --proposals set (min_size, max_size, proposals)."""
    fields = {"min_size": spec.scale[0], "max_size": spec.scale[1]} if spec.scale else {}
    return fields | ({"proposals": spec.proposals} if spec.proposals else {})
