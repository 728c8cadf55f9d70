"""The `frcnn` detector: torchvision Faster R-CNN (COCO) with its own box-head features per region.

As bottom-up-attention does with its 2048-d head, the feature of a region is the box head's output
(1024-d here: TwoMLPHead, or the conv head of the v2 model) RoI-pooled on the FINAL box, i.e. after
box regression, per-class NMS and our selection (score threshold, class-agnostic NMS, top N). The
whole-frame region is the same head on the whole-image box. The backbone runs once per batch; its
FPN maps serve both the detection pass and the pooling of the final boxes.

Weights: a torchvision weights name ("DEFAULT", "COCO_V1"), fetched and cached by torch.hub in
<torch hub dir>/checkpoints/ when online, or a state-dict file (`--weights FILE`); `weights=None`
builds the architecture with random weights (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder

from vlpcache.cache.labels import COCO_CLASSES
from vlpcache.cache.schema import NMS_IOU, SCORE_THRESHOLD
from vlpcache.devices import resolve_device
from vlpcache.errors import UserError
from vlpcache.extract.detectors.inference import autocast, frames_on_device, prepare_device
from vlpcache.extract.detectors.state_dicts import read_state_dict
from vlpcache.extract.detectors.regions import FrameRegions, select_detections, with_frame_region
from vlpcache.extract.detectors.spec import (
    DEFAULT_FRCNN_ARCH,
    FRCNN_FEATURE_DIM,
    FRCNN_SCALES,
    DetectorSpec,
    check_architecture,
    existing_weights_file,
    frcnn_spec,
)
from vlpcache.extract.detectors.weights import fetch_torchvision_weights

NOT_COCO = -100  # background and the "N/A" gaps of torchvision's 91-way COCO label space


@dataclass
class FrcnnConfig:
    arch: str = DEFAULT_FRCNN_ARCH
    weights: str | None = "DEFAULT"  # torchvision weights name; None: random weights (tests)
    weights_file: str | None = None  # a state dict file, instead of `weights`
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    score_threshold: float = SCORE_THRESHOLD
    nms_iou: float = NMS_IOU
    # shorter side resized to min_size, longer side at most max_size; RPN proposals per frame after
    # NMS. None: spec.FRCNN_SCALES[arch].
    min_size: int | None = None
    max_size: int | None = None
    proposals: int | None = None
    autocast: str = "auto"  # "auto" (fp16 on CUDA, off on CPU), "fp16", "bf16" or "none"
    autotune: bool = True  # CUDA only: cuDNN's autotuning (torch.backends.cudnn.benchmark)


class Float32BoxCoder(BoxCoder):
    """torchvision's box decoding, in float32 whatever the head's dtype.

    Under fp16 autocast torchvision decodes in the head's fp16: box areas above 65504 px² (a 256x256
    box) overflow, which sends large boxes to the wrong FPN level, and coordinates lose precision.
    """

    def decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


def coco_label_index(categories: list[str]) -> torch.Tensor:
    """torchvision's 91-way category index -> our 80-class COCO index, NOT_COCO for gaps."""
    return torch.tensor([COCO_CLASSES.index(c) if c in COCO_CLASSES else NOT_COCO for c in categories])  # (91,)


def _weights_enum(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A bare state dict or {"model": state_dict}, from .pth (never unpickled) or .safetensors."""
    existing_weights_file(path)
    try:
        return read_state_dict(path)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    # torchvision's COCO MobileNetV3 checkpoints come from FrozenBatchNorm2d layers, which have no
    # num_batches_tracked; in eval mode BatchNorm2d computes the same, so only that key may be missing.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: another architecture or class count
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise UserError(f"{path}: not a {arch} state dict ({first})") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        keys = ", ".join((missing + unexpected)[:3])
        raise UserError(f"{path}: not a {arch} state dict ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected keys, e.g. {keys})")


def build_faster_rcnn(config: FrcnnConfig) -> tuple[torch.nn.Module, Path | None]:
    """The torchvision model in eval mode on the CPU, and the weights file it was loaded from."""
    from torchvision.models import get_model_builder

    check_architecture(config.arch)
    if config.weights_file:
        path = Path(config.weights_file).expanduser()
    elif config.weights:
        path = fetch_torchvision_weights(config.arch, config.weights)
    else:
        path = None
    state = load_state_dict_file(path) if path else None
    min_size, max_size, proposals = model_settings(config)
    model = get_model_builder(config.arch)(
        weights=None, weights_backbone=None, num_classes=91, min_size=min_size, max_size=max_size,
        rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals,
    )
    if state is not None:
        _load_weights(model, state, path, config.arch)
    for stage in (model.rpn, model.roi_heads):
        stage.box_coder = Float32BoxCoder(stage.box_coder.weights, stage.box_coder.bbox_xform_clip)
    return model.eval(), path


def model_settings(config: FrcnnConfig) -> tuple[int, int, int]:
    """(min_size, max_size, proposals): the configured ones, else the architecture's defaults."""
    min_size, max_size, proposals = FRCNN_SCALES[check_architecture(config.arch)]
    return config.min_size or min_size, config.max_size or max_size, config.proposals or proposals


class FasterRCNNDetector:
    """Detector protocol implementation: torchvision Faster R-CNN boxes, box-head region features."""

    name = "frcnn"
    feature_dim = FRCNN_FEATURE_DIM

    def __init__(self, config: FrcnnConfig | None = None, spec: DetectorSpec | None = None, **options):
        """FasterRCNNDetector(FrcnnConfig(...)) or FasterRCNNDetector(arch=..., weights_file=..., ...); `spec`:
        the description its weights file was chosen and hashed by (choice.load_detector)."""
        self.config = replace(config or FrcnnConfig(), **options)
        self.device = resolve_device(self.config.device)
        self.max_side = model_settings(self.config)[1]  # the model's transform never looks at more pixels
        model, self.weights_path = build_faster_rcnn(self.config)
        self.model = model.to(self.device)
        # Keep every class score above our threshold and enough per-class survivors for our own
        # class-agnostic NMS and top N to choose from.
        self.model.roi_heads.score_thresh = self.config.score_threshold
        self.model.roi_heads.detections_per_img = 300
        self.coco_index = coco_label_index(_weights_enum(self.config.arch).DEFAULT.meta["categories"]).to(self.device)
        self.autocast_dtype = prepare_device(self.device, self.config.autocast, self.config.autotune)
        self._spec = spec

    @property
    def spec(self) -> DetectorSpec:
        """What the cache records of this detector; its weights file is hashed on first use only."""
        if self._spec is None:
            self._spec = frcnn_spec(self.config.arch, self.weights_path, self.max_side)
        return self._spec

    def _images_on_device(self, frames: list) -> list[torch.Tensor]:
        """(H, W, 3) uint8 frames -> (3, H, W) float in [0, 1] on the device."""
        return [p.permute(2, 0, 1).float().div_(255) for p in frames_on_device(frames, self.device)]

    @torch.inference_mode()
    def detect(self, frames: list[np.ndarray], max_detections: int) -> list[FrameRegions]:
        if not frames:
            return []
        model = self.model
        images = self._images_on_device(frames)
        with autocast(self.device, self.autocast_dtype):
            image_list, _ = model.transform(images)  # resized, normalised, padded: (B, 3, H', W')
            features = model.backbone(image_list.tensors)  # FPN maps, reused for the final boxes
            proposals, _ = model.rpn(image_list, features)
            detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)

            rois, kept = [], []
            for detection, (h, w) in zip(detections, image_list.image_sizes):
                labels = self.coco_index[detection["labels"]]  # (m,) our COCO index
                coco = torch.nonzero(labels != NOT_COCO).flatten()
                boxes, scores, labels = detection["boxes"][coco], detection["scores"][coco], labels[coco]  # (m', 4), (m',), (m',)
                keep = select_detections(boxes, scores, labels, self.config.score_threshold,
                                         self.config.nms_iou, max_detections)
                frame_box = torch.tensor([[0.0, 0.0, w, h]], device=boxes.device)
                rois.append(torch.cat((frame_box, boxes[keep])).float())  # whole frame first, (1 + n, 4)
                kept.append((scores[keep], labels[keep], (h, w)))
            pooled = model.roi_heads.box_roi_pool(features, rois, image_list.image_sizes)  # (R, C, 7, 7)
            region_features = model.roi_heads.box_head(pooled)  # (R, 1024)

        # one device -> host transfer per array for the whole batch
        counts = [len(r) for r in rois]
        sizes = torch.tensor([[w, h, w, h] for _, _, (h, w) in kept], dtype=torch.float32, device=self.device)  # (B, 4)
        boxes = torch.cat([r.float() / size for r, size in zip(rois, sizes)]).clamp_(0, 1).cpu().numpy()  # (R, 4)
        scores = torch.cat([s for s, _, _ in kept]).float().cpu().numpy()  # (R - B,)
        labels = torch.cat([lab for _, lab, _ in kept]).cpu().numpy()  # (R - B,)
        region_features = region_features.float().cpu().numpy()  # (R, 1024)
        results, start = [], 0
        for b, n in enumerate(counts):  # region rows start .. start + n: whole frame, then n - 1 detections
            kept_rows = slice(start - b, start - b + n - 1)  # scores and labels have no whole-frame rows
            all_boxes, all_scores, all_labels = with_frame_region(boxes[start + 1 : start + n], scores[kept_rows],
                                                                  labels[kept_rows])
            results.append(FrameRegions(all_boxes, all_scores, all_labels, region_features[start : start + n]))
            start += n
        return results
