"""The `vg` detector: bottom-up attention's Visual Genome Faster R-CNN (vg_model.py), DemoVLP's features.

As bottom-up attention extracts them (its tools/generate_tsv.py, with py-bottom-up-attention's
PyTorch weights): frames resized so the shorter side is 600 and the longer at most 1000, BGR minus
the caffe pixel means; 300 proposals (best 6000 by objectness, NMS 0.7); each proposal's 2048-d
feature is res5 on its 14x14 RoIPool, averaged. Regions are chosen among the proposals by
class-aware NMS (selection="class-aware"): per object class, NMS (IoU 0.3) over the proposals by that
class's probability; a proposal's confidence is its best probability among the classes it survives;
those with confidence >= 0.2 are kept, at least 10 and at most N (36 by default), best first. A
region's box is its proposal, so its feature is exactly the pooled feature of its box; its label is
the class of that confidence, its attribute the best of the 400 (with its probability). The
whole-frame region is the same res5 feature of the whole frame.

selection="max-class" is the LXMERT demo's rule instead (transformers' modeling_frcnn.py, do_nms):
each proposal's best class, its box regressed for that class, class-agnostic NMS (0.5), the best N;
the feature stays the proposal's.

Weights: `unc-nlp/frcnn-vg-finetuned`'s pytorch_model.bin, fetched by name into the models folder
(weights.py) or a file (`--weights FILE`); read with torch.load(weights_only=True), never unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms

from vlpcache.cache.labels import NO_ATTRIBUTE
from vlpcache.devices import resolve_device
from vlpcache.errors import UserError
from vlpcache.extract.detectors.inference import autocast, frames_on_device, prepare_device
from vlpcache.extract.detectors.regions import FrameRegions, with_frame_region
from vlpcache.extract.detectors.spec import (
    VG_FEATURE_DIM,
    VG_MIN_REGIONS,
    VG_NMS_IOU,
    VG_PROPOSALS,
    VG_SCALES,
    VG_SCORE_THRESHOLD,
    DetectorSpec,
    existing_weights_file,
    vg_spec,
)
from vlpcache.extract.detectors.vg_model import (
    OBJECT_CLASSES,
    PIXEL_MEANS_BGR,
    ROI_CODER,
    VgFasterRCNN,
    checkpoint_state,
)
from vlpcache.extract.detectors.weights import VG_FILE
from vlpcache.workspace import replace_command

SELECTIONS = ("class-aware", "max-class")
MAX_CLASS_NMS_IOU = 0.5  # the LXMERT demo's (its config's ROI_HEADS.NMS_THRESH_TEST)


@dataclass
class VgConfig:
    weights_file: str | None = None  # the checkpoint; None: random weights (tests, benchmarks)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    score_threshold: float = VG_SCORE_THRESHOLD  # regions below it are kept only to reach min_regions
    nms_iou: float = VG_NMS_IOU  # class-aware selection: the per-class NMS
    min_regions: int = VG_MIN_REGIONS
    min_size: int = VG_SCALES[0]  # shorter side resized to this, longer side at most max_size
    max_size: int = VG_SCALES[1]
    pre_nms_proposals: int = 6000  # best anchors by objectness before the proposals' NMS
    proposals: int = VG_PROPOSALS  # per frame, after it
    proposal_nms_iou: float = 0.7
    selection: str = "class-aware"  # SELECTIONS
    roi_chunk: int = 1024  # regions through res5 at once: bounds the memory of big batches
    autocast: str = "auto"  # "auto" (fp16 on CUDA, off on CPU), "fp16", "bf16" or "none"
    autotune: bool = True  # CUDA only: cuDNN's autotuning (torch.backends.cudnn.benchmark)


SMALLEST_CANVAS = 32  # pixels a side of the network's input at least (its stride; the frame's own size is kept)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) with the shorter side min_size and the longer at most max_size, rounded as the
    reference rounds them (its ResizeShortestEdge)."""
    scale = min_size * 1.0 / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))  # a 20 x 10000 photo's shorter side: 0 px otherwise


def build_vg_model(weights_file: str | None) -> VgFasterRCNN:
    """The network in eval mode on the CPU, with the checkpoint's weights (random ones without a file)."""
    model = VgFasterRCNN()
    if weights_file:
        path = existing_weights_file(Path(weights_file).expanduser())
        try:
            state = checkpoint_state(path)
        except ValueError as err:
            fix = f"{replace_command(path)}, or" if path.name == VG_FILE else "damaged or another model's:"
            raise UserError(f"{path}: {err}; {fix} pass --weights with unc-nlp/frcnn-vg-finetuned's pytorch_model.bin") from None
        model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------- choosing the regions of a frame


def class_aware_confidence(boxes: torch.Tensor, class_probs: torch.Tensor, iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-up attention's confidence, for B frames at once.

    boxes (B, R, 4) and class_probs (B, R, C) (padded frames: probability -1). Per frame and class,
    greedy NMS over the R boxes in that class's order; a box's confidence is its best probability
    among the classes in which it survives (0 if none), its label that class. Returns both, (B, R).
    All frames and classes take their rank-th box together; which boxes each (frame, class) has
    suppressed is kept as bits, 64 boxes to an int64.
    """
    B, R, C = class_probs.shape
    overlaps = packed_bits(box_iou_batched(boxes) > iou).view(B * R, -1)  # row b*R + i: boxes that box i overlaps
    order = class_probs.argsort(dim=1, descending=True).transpose(0, 1).contiguous()  # (R, B, C): rank-th best box
    first_row = torch.arange(B, device=boxes.device).view(B, 1) * R  # (B, 1)
    suppressed = torch.zeros(B, C, overlaps.shape[1], dtype=torch.int64, device=boxes.device)  # (B, C, words)
    kept = torch.zeros(B, C, R, dtype=torch.bool, device=boxes.device)
    for box in order:  # (B, C)
        word = suppressed.gather(2, (box // 64)[..., None])[..., 0]  # (B, C)
        alive = (word >> (box % 64)) & 1 == 0  # (B, C)
        kept.scatter_(2, box[..., None], alive[..., None])
        rows = overlaps.index_select(0, (box + first_row).view(-1)).view(B, C, -1)  # (B, C, words)
        suppressed |= rows * alive[..., None]  # the boxes that the kept ones overlap
    confidence, label = (class_probs.transpose(1, 2) * kept).max(dim=1)  # (B, R) each
    label = torch.where(confidence > 0, label, class_probs.argmax(dim=2))  # suppressed everywhere: its best class
    return confidence.clamp_(min=0), label


def packed_bits(flags: torch.Tensor) -> torch.Tensor:
    """(..., R) bool -> (..., ceil(R / 64)) int64, flag k as bit k % 64 of word k // 64."""
    words = (flags.shape[-1] + 63) // 64
    bits = F.pad(flags, (0, 64 * words - flags.shape[-1])).view(*flags.shape[:-1], words, 64).long()
    return (bits << torch.arange(64, device=flags.device)).sum(-1)  # distinct powers of two: the sum is the OR


def box_iou_batched(boxes: torch.Tensor) -> torch.Tensor:
    """(B, R, 4) -> (B, R, R) pairwise IoU within each frame."""
    return torch.stack([box_iou(b, b) for b in boxes]) if len(boxes) else boxes.new_zeros((0, 0, 0))


def kept_by_confidence(confidence: torch.Tensor, threshold: float, min_regions: int, max_regions: int) -> torch.Tensor:
    """Indices of the regions to keep, best first: those >= threshold, at least min_regions, at most max_regions."""
    above = int((confidence >= threshold).sum())
    count = min(max(above, min_regions), max_regions, len(confidence))
    return confidence.sort(descending=True, stable=True).indices[:count]


def max_class_candidates(proposals: torch.Tensor, deltas: torch.Tensor, class_probs: torch.Tensor,
                         size: tuple[int, int], iou: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LXMERT demo's rule: each proposal's best class and its box regressed for that class, clipped,
    class-agnostic NMS. Returns (rows kept, best first; their boxes, scores, labels)."""
    R = len(proposals)
    scores, labels = class_probs.max(dim=1)  # (R,)
    boxes = ROI_CODER.decode_single(deltas, proposals).view(R, OBJECT_CLASSES, 4)  # (R, C, 4) input pixels
    boxes = boxes[torch.arange(R, device=boxes.device), labels]  # (R, 4)
    h, w = size
    boxes = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)), dim=1)
    keep = nms(boxes, scores, iou)
    return keep, boxes[keep], scores[keep], labels[keep]


# ---------------------------------------------------------------- the detector


class VgDetector:
    """Detector protocol implementation (regions.py): VG boxes, object and attribute labels, 2048-d features."""

    name = "vg"
    feature_dim = VG_FEATURE_DIM

    def __init__(self, config: VgConfig | None = None, spec: DetectorSpec | None = None, **options):
        """VgDetector(VgConfig(...)) or VgDetector(weights_file=..., ...); `spec`: the description its
        weights file was chosen and hashed by (choice.load_detector)."""
        self.config = replace(config or VgConfig(), **options)
        if self.config.selection not in SELECTIONS:
            raise UserError(f"unknown selection {self.config.selection!r}; choose from {', '.join(SELECTIONS)}")
        self.device = resolve_device(self.config.device)
        self.max_side = self.config.max_size  # the resize never looks at more pixels
        self.model = build_vg_model(self.config.weights_file).to(self.device)
        self.autocast_dtype = prepare_device(self.device, self.config.autocast, self.config.autotune)
        self.pixel_means = torch.tensor(PIXEL_MEANS_BGR, device=self.device).view(3, 1, 1)
        self._spec = spec

    @property
    def spec(self) -> DetectorSpec:
        """What the cache records of this detector; its weights file is hashed on first use only."""
        if self._spec is None:
            self._spec = vg_spec(Path(self.config.weights_file).expanduser() if self.config.weights_file else None)
        return self._spec

    def prepare(self, frames: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """RGB uint8 frames -> the network's input (B, 3, H, W): BGR, resized, minus the pixel means, zero-padded;
        and each frame's resized (h, w)."""
        images = []
        for pixels in frames_on_device(frames, self.device):  # (H, W, 3) uint8
            size = resized_size(pixels.shape[0], pixels.shape[1], self.config.min_size, self.config.max_size)
            bgr = pixels.flip(-1).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
            images.append(F.interpolate(bgr, size, mode="bilinear", align_corners=False)[0] - self.pixel_means)
        # at least SMALLEST_CANVAS a side: a frame resized to 2 x 1000 (a 20 x 10000 photo) alone in its batch left
        # the stem's max-pool no output (a batch of larger frames pads it the same way)
        height = max(SMALLEST_CANVAS, *(i.shape[1] for i in images))
        width = max(SMALLEST_CANVAS, *(i.shape[2] for i in images))
        batch = images[0].new_zeros((len(images), 3, height, width))
        for b, image in enumerate(images):
            batch[b, :, : image.shape[1], : image.shape[2]] = image
        return batch, [(i.shape[1], i.shape[2]) for i in images]

    @torch.inference_mode()
    def network(self, frames: list[np.ndarray]) -> dict:
        """Every proposal of every frame through the network: its box, feature and predictions (float32),
        and each whole frame's feature."""
        images, sizes = self.prepare(frames)
        config, model = self.config, self.model
        with autocast(self.device, self.autocast_dtype):
            res4 = model.backbone(images)  # (B, 1024, H/16, W/16)
            proposals = model.proposal_generator(res4, sizes, config.pre_nms_proposals, config.proposals,
                                                 config.proposal_nms_iou)
            rois = [torch.cat((proposals_b.new_tensor([[0.0, 0.0, w, h]]), proposals_b)) for proposals_b, (h, w)
                    in zip(proposals, sizes)]  # whole frame first, (1 + P_b, 4)
            indexed = torch.cat([F.pad(r, (1, 0), value=b) for b, r in enumerate(rois)])  # (R, 5)
            pooled = model.roi_heads.pooled_features(res4, indexed, config.roi_chunk).float()  # (R, 2048)
        firsts = np.cumsum([0] + [len(r) for r in rois])[:-1]
        frame_rows = torch.as_tensor(firsts, device=pooled.device)
        proposal_rows = torch.ones(len(pooled), dtype=torch.bool, device=pooled.device)
        proposal_rows[frame_rows] = False
        features = pooled[proposal_rows]  # (P, 2048), frame after frame
        class_logits, deltas, attribute_logits = model.roi_heads.box_predictor(features)  # float32
        counts = [len(p) for p in proposals]
        attribute_scores, attributes = attribute_logits[:, :-1].softmax(-1).max(-1)  # "none" left out
        return {"sizes": sizes, "frame_features": pooled[frame_rows], "proposals": proposals,
                "features": features.split(counts), "deltas": deltas.split(counts),
                "class_probs": class_logits.softmax(-1)[:, :-1].split(counts),  # background left out
                "attributes": attributes.split(counts), "attribute_scores": attribute_scores.split(counts)}

    @torch.inference_mode()
    def detect(self, frames: list[np.ndarray], max_detections: int) -> list[FrameRegions]:
        """Each frame's regions. The frames of one resized size go through the network together, each size apart:
        zero-padded to a larger frame's size, a frame's regions changed (the deep features at its edges, proposals
        from anchors in the padding), and a cache then depended on --batch-size and on which items shared a batch."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames):
            size = resized_size(frame.shape[0], frame.shape[1], self.config.min_size, self.config.max_size)
            groups.setdefault(size, []).append(i)
        results: list[FrameRegions | None] = [None] * len(frames)
        for rows in groups.values():
            regions = self.frame_regions(self.network([frames[i] for i in rows]), max_detections)
            for i, found in zip(rows, regions):
                results[i] = found
        return results

    @torch.inference_mode()
    def frame_regions(self, out: dict, max_detections: int) -> list[FrameRegions]:
        """The network's output for a batch (network()) -> each frame's regions, whole frame first."""
        chosen = self.choose(out, max_detections)  # per frame: (rows, boxes, scores, labels)
        results = []
        for b, (rows, boxes, scores, labels) in enumerate(chosen):
            h, w = out["sizes"][b]
            normalised = (boxes / boxes.new_tensor([w, h, w, h])).clamp_(0, 1)
            all_boxes, all_scores, all_labels = with_frame_region(*(t.cpu().numpy() for t in (normalised, scores, labels)))
            features = torch.cat((out["frame_features"][b : b + 1], out["features"][b][rows]))  # (1 + n, 2048)
            attributes = torch.cat((rows.new_tensor([NO_ATTRIBUTE]), out["attributes"][b][rows]))
            attribute_scores = torch.cat((scores.new_zeros(1), out["attribute_scores"][b][rows]))
            results.append(FrameRegions(all_boxes, all_scores, all_labels, features.cpu().numpy(),
                                        attributes.cpu().numpy(), attribute_scores.cpu().numpy()))
        return results

    def choose(self, out: dict, max_regions: int) -> list[tuple[torch.Tensor, ...]]:
        """Per frame, the regions kept, best first: (proposal rows, boxes in resized pixels, scores, labels)."""
        config = self.config
        if config.selection == "max-class":
            chosen = []
            for proposals, deltas, probs, size in zip(out["proposals"], out["deltas"], out["class_probs"], out["sizes"]):
                rows, boxes, scores, labels = max_class_candidates(proposals, deltas, probs, size, MAX_CLASS_NMS_IOU)
                kept = kept_by_confidence(scores, config.score_threshold, config.min_regions, max_regions)
                chosen.append((rows[kept], boxes[kept], scores[kept], labels[kept]))
            return chosen
        proposals = torch.nn.utils.rnn.pad_sequence(out["proposals"], batch_first=True)  # (B, R, 4)
        probs = torch.nn.utils.rnn.pad_sequence(out["class_probs"], batch_first=True, padding_value=-1.0)  # (B, R, C)
        confidence, labels = class_aware_confidence(proposals, probs, config.nms_iou)  # (B, R) each
        chosen = []
        for b, count in enumerate(len(p) for p in out["proposals"]):
            rows = kept_by_confidence(confidence[b, :count], config.score_threshold, config.min_regions, max_regions)
            chosen.append((rows, proposals[b, rows], confidence[b, rows], labels[b, rows]))
        return chosen
