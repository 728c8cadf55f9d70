"""The detectors `extract` offers, described before any network is loaded.

The cache settings (feature size, weight hashes) come from the description, so a run that finds
everything cached loads no model, and the decoding workers start while torch and the networks load.
Nothing here imports torch for `yolox`; `frcnn` needs torchvision to find its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlpcache.cache.schema import CacheSettings
from vlpcache.errors import UserError
from vlpcache.files import file_sha256
from vlpcache.workspace import model_file

DETECTORS = ("yolox", "frcnn")
YOLOX_FILE = "yolox_nano_coco.onnx"
MOBILENET_FILE = "mobilenet_v2_imagenet_features.pth"
YOLOX_INPUT_SIZE = 416  # YOLOX-Nano's input side; frames are letterboxed to it
MOBILENET_DIM = 1280
NECK_DIMS = (64, 128, 256)  # YOLOX-Nano neck maps at strides 8, 16, 32
YOLOX_BACKBONES = {"mobilenet_v2": MOBILENET_DIM, "neck": sum(NECK_DIMS), "mobilenet_v2+neck": MOBILENET_DIM + sum(NECK_DIMS)}


@dataclass(frozen=True)
class DetectorChoice:
    """What `extract` will run: enough to write and check cache settings without loading it."""

    detector: str  # yolox | frcnn
    backbone: str  # yolox: a YOLOX_BACKBONES key; frcnn: the torchvision architecture
    feature_dim: int
    max_side: int  # decoder workers downscale frames so that their longer side is at most this
    provenance: dict[str, str]
    files: tuple[Path, ...]  # yolox: the ONNX and (if used) MobileNetV2 files; frcnn: its state dict

    def cache_settings(self, frames: int, regions: int, score_threshold: float, nms_iou: float = 0.5) -> CacheSettings:
        """regions: detections kept per frame; the whole-frame region makes N = regions + 1."""
        return CacheSettings(frames=frames, regions=regions + 1, feature_dim=self.feature_dim,
                             score_threshold=score_threshold, nms_iou=nms_iou, **self.provenance)


def yolox_feature_dim(backbone: str) -> int:
    """Feature size of a yolox backbone, or one clear error listing the choices."""
    if backbone not in YOLOX_BACKBONES:
        raise UserError(f"unknown backbone {backbone!r} for yolox; choose from {', '.join(YOLOX_BACKBONES)}")
    return YOLOX_BACKBONES[backbone]


def yolox_provenance(backbone: str, yolox_sha256: str, mobilenet_sha256: str | None) -> dict[str, str]:
    return {
        "detector": f"yolox:{YOLOX_FILE}",
        "detector_weights_sha256": yolox_sha256,
        "backbone": backbone,
        "backbone_weights_sha256": mobilenet_sha256 or yolox_sha256,
    }


def frcnn_provenance(arch: str, weights_sha256: str) -> dict[str, str]:
    return {
        "detector": f"frcnn:{arch}",
        "detector_weights_sha256": weights_sha256,
        "backbone": "frcnn-box-head",
        "backbone_weights_sha256": weights_sha256,
    }


def choose_detector(detector: str, backbone: str | None, weights: str | None, models: str | None) -> DetectorChoice:
    """The detector named on the command line with its weight files found (frcnn: downloaded when
    online), or one clear error naming the file."""
    if detector == "yolox":
        backbone = backbone or "mobilenet_v2"
        if weights:
            raise UserError("--weights is for --detector frcnn; yolox reads its files from --models")
        feature_dim = yolox_feature_dim(backbone)
        yolox = model_file(YOLOX_FILE, models)
        mobilenet = model_file(MOBILENET_FILE, models) if "mobilenet_v2" in backbone else None
        provenance = yolox_provenance(backbone, file_sha256(yolox), mobilenet and file_sha256(mobilenet))
        files = (yolox, mobilenet) if mobilenet else (yolox,)
        return DetectorChoice("yolox", backbone, feature_dim, YOLOX_INPUT_SIZE, provenance, files)
    if detector == "frcnn":
        from vlpcache.extract.frcnn import (
            ARCH_DEFAULTS,
            DEFAULT_ARCH,
            FEATURE_DIM,
            check_architecture,
            existing_weights_file,
            fetch_torchvision_weights,
        )

        arch = check_architecture(backbone or DEFAULT_ARCH)
        path = existing_weights_file(Path(weights).expanduser() if weights else fetch_torchvision_weights(arch, "DEFAULT"))
        max_side = ARCH_DEFAULTS[arch][1]  # the model's transform never looks at more pixels
        return DetectorChoice("frcnn", arch, FEATURE_DIM, max_side, frcnn_provenance(arch, file_sha256(path)), (path,))
    raise UserError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")


def load_detector(choice: DetectorChoice, device: str, score_threshold: float, nms_iou: float = 0.5):
    """The networks of `choice`, loaded on `device` (a Detector, see regions.py); imports torch."""
    if choice.detector == "yolox":
        from vlpcache.extract.yolox import YoloxConfig, YoloxDetector

        config = YoloxConfig(backbone=choice.backbone, score_threshold=score_threshold, nms_iou=nms_iou, device=device)
        return YoloxDetector(config, models=str(choice.files[0].parent))
    from vlpcache.extract.frcnn import FasterRCNNDetector

    return FasterRCNNDetector(arch=choice.backbone, weights_file=str(choice.files[0]), device=device,
                              score_threshold=score_threshold, nms_iou=nms_iou)
