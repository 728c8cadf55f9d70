"""What each detector is before any network loads, torch-free: its weight files, feature size, input
size and the provenance a cache records (DetectorSpec).

The cache settings come from the spec, so a run that finds everything cached loads no model, and the
decoding workers start while torch and the networks load. Weight files are found and hashed here,
once; the detectors are built from the spec (choice.load_detector) and do not look for them again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vlpcache.cache.schema import NMS_IOU, SCORE_THRESHOLD, CacheSettings
from vlpcache.errors import UserError
from vlpcache.files import file_sha256
from vlpcache.extract.detectors.weights import (
    MOBILENET_FILE,
    REGISTRY,
    VG_FILE,
    VG_HUB_REPO,
    YOLOX_FILE,
    trunk_tensors_sha256,
    weights_file,
)

DETECTORS = ("yolox", "frcnn", "vg")
REGIONS = 30  # detections kept per frame when the command line does not say (vg: VG_REGIONS)

# yolox: YOLOX-Nano (ONNX) boxes; features from an ImageNet MobileNetV2 trunk and/or YOLOX's neck maps
YOLOX_INPUT_SIZE = 416  # YOLOX-Nano's input side; frames are letterboxed to it
MOBILENET_DIM = 1280
NECK_DIMS = (64, 128, 256)  # YOLOX-Nano neck maps at strides 8, 16, 32
YOLOX_BACKBONES = {"mobilenet_v2": MOBILENET_DIM, "neck": sum(NECK_DIMS), "mobilenet_v2+neck": MOBILENET_DIM + sum(NECK_DIMS)}
DEFAULT_YOLOX_BACKBONE = "mobilenet_v2"

# frcnn: torchvision Faster R-CNN (COCO); the feature of a region is the box head's output
FRCNN_ARCHITECTURES = (  # torchvision builders whose box head gives 1024-d region features
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
DEFAULT_FRCNN_ARCH = "fasterrcnn_resnet50_fpn_v2"
FRCNN_FEATURE_DIM = 1024
# (min_size, max_size, proposals). Resize as bottom-up-attention tests (shorter side 600, longer at
# most 1000; torchvision: 800/1333, 1.8x the pixels) and keep its 300 RPN proposals (py-faster-rcnn's
# test setting; torchvision: 1000): on CPU the box head over all proposals costs about as much as the
# backbone. The 320 model keeps the small scale and 150 proposals it was tuned for.
FRCNN_SCALES = {arch: (600, 1000, 300) for arch in FRCNN_ARCHITECTURES} | {
    "fasterrcnn_mobilenet_v3_large_320_fpn": (320, 640, 150)}
# vg: bottom-up attention's Visual Genome Faster R-CNN (vg.py); its test settings are the defaults
VG_FEATURE_DIM = 2048  # res5, averaged over the region's 14x14 RoIPool
VG_SCALES = (600, 1000)  # shorter side, longest allowed side
VG_PROPOSALS = 300  # RPN proposals per frame, after their NMS
VG_REGIONS = 36  # at most this many regions per frame, best first (bottom-up attention: 10-100, or 36 fixed)
VG_MIN_REGIONS = 10  # and at least this many, even below the score threshold
VG_SCORE_THRESHOLD = 0.2
VG_NMS_IOU = 0.3  # per object class
VG_DETECTOR = "vg:faster_rcnn_R_101_C4_attr"  # py-bottom-up-attention's name of the model
RANDOM_WEIGHTS = "random-init"  # the weights "hash" of a detector built without weights (tests)


@dataclass(frozen=True)
class DetectorSpec:
    """A detector as `extract` runs it: enough to write and check cache settings without loading it."""

    detector: str  # yolox | frcnn
    backbone: str  # yolox: a YOLOX_BACKBONES key; frcnn: the torchvision architecture
    feature_dim: int
    max_side: int  # decoder workers downscale frames so that their longer side is at most this
    provenance: dict[str, str]  # detector, backbone and the sha256 of their weights (CacheSettings fields)
    detector_file: Path | None  # yolox: the ONNX graph; frcnn: its state dict (None: random weights)
    backbone_file: Path | None = None  # yolox: the MobileNetV2 trunk, when the backbone uses it
    nms_iou: float = NMS_IOU  # of its NMS between detections (vg: per class)
    attributes: bool = False  # it labels attributes too (vg): the cache holds the attribute arrays
    # frcnn, vg: --scale (shorter side, longest side) and --proposals per frame; None: the detector's own
    scale: tuple[int, int] | None = None
    proposals: int | None = None

    def cache_settings(self, frames: int, regions: int, score_threshold: float,
                       cache: CacheSettings | None = None) -> CacheSettings:
        """regions: detections kept per frame; the whole-frame region makes N = regions + 1. A scale or
        proposal count other than the detector's own is recorded too (caches of other ones do not mix).
        cache: the settings of the cache they are for, if it exists (see as_recorded_by)."""
        extra = {"scale": list(self.scale)} if self.scale else {}
        extra |= {"proposals": self.proposals} if self.proposals else {}
        settings = CacheSettings(frames=frames, regions=regions + 1, feature_dim=self.feature_dim,
                                 score_threshold=score_threshold, nms_iou=self.nms_iou, attributes=self.attributes,
                                 extra=extra, **self.provenance)
        return settings if cache is None else as_recorded_by(settings, cache)


def as_recorded_by(settings: CacheSettings, cache: CacheSettings) -> CacheSettings:
    """`settings` naming the trunk file that `cache` names where that cache, written before caches recorded their
    trunk's tensors, names a file the registry knows to hold these tensors (another torch version's save of the
    same trunk): its items and these are of the same weights. Otherwise `settings`."""
    if cache.backbone_tensors_sha256 or not settings.backbone_tensors_sha256:
        return settings
    known = REGISTRY[MOBILENET_FILE].known_as(cache.backbone_weights_sha256)
    if known is None or known.tensors_sha256 != settings.backbone_tensors_sha256:
        return settings
    return replace(settings, backbone_weights_sha256=cache.backbone_weights_sha256)


def with_input_size(spec: DetectorSpec, scale: tuple[int, int] | None, proposals: int | None) -> DetectorSpec:
    """`spec` run at --scale SHORT/LONG with --proposals P (frcnn, vg), or one clear error (yolox)."""
    if scale is None and proposals is None:
        return spec
    if spec.detector == "yolox":
        raise UserError(f"--scale and --proposals are for frcnn and vg; yolox reads {YOLOX_INPUT_SIZE}x{YOLOX_INPUT_SIZE} frames")
    *own_scale, own_proposals = FRCNN_SCALES.get(spec.backbone, (*VG_SCALES, VG_PROPOSALS))
    # the detector's own, spelled out (a script's), are no other settings: its caches take the plain run's items
    scale = None if scale is not None and tuple(scale) == tuple(own_scale) else scale
    proposals = None if proposals == own_proposals else proposals
    return replace(spec, scale=scale, proposals=proposals, max_side=scale[1] if scale else spec.max_side)


def default_regions(detector: str) -> int:
    """Detections kept per frame when --regions is not given."""
    return VG_REGIONS if detector == "vg" else REGIONS


def default_score_threshold(detector: str) -> float:
    """The score threshold when --score-threshold is not given."""
    return VG_SCORE_THRESHOLD if detector == "vg" else SCORE_THRESHOLD


def yolox_feature_dim(backbone: str) -> int:
    """Feature size of a yolox backbone, or one clear error listing the choices."""
    if backbone not in YOLOX_BACKBONES:
        raise UserError(f"unknown backbone {backbone!r} for yolox; choose from {', '.join(YOLOX_BACKBONES)}")
    return YOLOX_BACKBONES[backbone]


def yolox_spec(backbone: str, models: str | None) -> DetectorSpec:
    """The yolox detector with `backbone`, its files found in the models folder (fetched there on first
    use, see weights.py) and hashed."""
    feature_dim = yolox_feature_dim(backbone)
    yolox = weights_file(YOLOX_FILE, models)
    mobilenet = weights_file(MOBILENET_FILE, models) if "mobilenet_v2" in backbone else None
    yolox_sha256 = file_sha256(yolox)
    mobilenet_sha256 = file_sha256(mobilenet) if mobilenet else ""
    provenance = {
        "detector": f"yolox:{YOLOX_FILE}",
        "detector_weights_sha256": yolox_sha256,
        "backbone": backbone,
        "backbone_weights_sha256": mobilenet_sha256 or yolox_sha256,
        # the same trunk converted by another torch version is another file: its tensors are the same weights
        "backbone_tensors_sha256": trunk_tensors_sha256(mobilenet, mobilenet_sha256) if mobilenet else "",
    }
    return DetectorSpec("yolox", backbone, feature_dim, YOLOX_INPUT_SIZE, provenance, yolox, mobilenet)


def check_architecture(arch: str) -> str:
    if arch not in FRCNN_ARCHITECTURES:
        raise UserError(f"unknown Faster R-CNN architecture {arch!r}; choose from {', '.join(FRCNN_ARCHITECTURES)}")
    return arch


def existing_weights_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"weights file {path} not found; pass --weights with an existing state dict file")
    return path


def frcnn_spec(arch: str, weights: Path | None, max_side: int | None = None) -> DetectorSpec:
    """The frcnn detector `arch` with its state dict `weights` (None: random weights) hashed."""
    check_architecture(arch)
    sha256 = file_sha256(existing_weights_file(weights)) if weights else RANDOM_WEIGHTS
    provenance = {
        "detector": f"frcnn:{arch}",
        "detector_weights_sha256": sha256,
        "backbone": "frcnn-box-head",
        "backbone_weights_sha256": sha256,
    }
    # the model's transform never looks at more pixels than its max_size
    max_side = max_side or FRCNN_SCALES[arch][1]
    return DetectorSpec("frcnn", arch, FRCNN_FEATURE_DIM, max_side, provenance, weights)


def vg_spec(weights: Path | None) -> DetectorSpec:
    """The vg detector with its checkpoint `weights` (None: random weights) hashed."""
    sha256 = file_sha256(existing_weights_file(weights)) if weights else RANDOM_WEIGHTS
    provenance = {
        "detector": VG_DETECTOR,
        "detector_weights_sha256": sha256,
        "backbone": "vg-res5-mean",
        "backbone_weights_sha256": sha256,
    }
    return DetectorSpec("vg", "r101-c4", VG_FEATURE_DIM, VG_SCALES[1], provenance, weights, nms_iou=VG_NMS_IOU,
                        attributes=True)


def vg_weights(weights: str | None, models: str | None) -> Path:
    """--weights FILE, else the published checkpoint in the models folder (fetched there on first use)."""
    if weights:
        return Path(weights).expanduser()
    try:
        return weights_file(VG_FILE, models)
    except UserError as err:
        raise UserError(f"{err}; or pass --weights FILE (the pytorch_model.bin of {VG_HUB_REPO})") from None
